// LiveLens browser console: publish over WHIP, pick a session, ask questions over the
// websocket, see answers' segments on a timeline and the frames kept at those times.
// Plain ES module, no dependencies; the protocol is in docs/api.md.

const TOKEN_KEY = "livelens.token";
const ICE_GATHER_TIMEOUT_MS = 3000;
const SESSIONS_REFRESH_MS = 5000;
const RECONNECT_MIN_MS = 500;
const RECONNECT_MAX_MS = 15000;
const MAX_FRAMES_SHOWN = 8;
const ALERTS_REFRESH_MS = 3000;
const MAX_ALERT_FEED = 50;

const $ = (id) => document.getElementById(id);

const state = {
  token: localStorage.getItem(TOKEN_KEY) || "",
  sessionId: null,
  sessions: [],
  status: null,
  ws: null,
  wsGeneration: 0,
  reconnectDelay: RECONNECT_MIN_MS,
  reconnectTimer: null,
  pending: null, // {id, question, text, tokens}
  answers: [], // oldest first: {id, question, text, segments, asked_at, latency_ms}
  selectedSegment: null, // "answerId:index"
  frameUrls: [],
  framesRequest: 0,
  publish: null, // {pc, stream, location, sessionId}
  questionCounter: 0,
  alerts: [], // the selected session's alerts, as GET /alerts lists them
  alertEvents: new Map(), // event_id -> {event_id, alert_id, condition, started, ended, ...}
  alertFeed: [], // newest first: {key, event} (one entry per edge), at most MAX_ALERT_FEED
  alertNodes: new Map(), // feed key -> its <li>, kept so thumbnails are not reloaded
  alertThumbs: new Map(), // event_id -> object URL of its evidence thumbnail
  alertClips: new Map(), // event_id -> object URL of its clip
};

// ------------------------------------------------------------------ small helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

const seconds = (value, digits = 1) =>
  value === null || value === undefined ? "–" : `${Number(value).toFixed(digits)} s`;

const clock = (iso) => {
  if (!iso) return "";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString([], { hour12: false });
};

const shortId = (id) => (id ? id.slice(0, 8) : "");

function bytes(value) {
  if (!value) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  let v = value;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(v < 10 && i ? 1 : 0)} ${units[i]}`;
}

function segmentLabel(segment) {
  const a = Number(segment.start).toFixed(1);
  const b = Number(segment.end).toFixed(1);
  return segment.start === segment.end ? `at ${a} s` : `${a} to ${b} s`;
}

// ------------------------------------------------------------------ notices and auth
function notify(message, kind = "error") {
  $("notice").hidden = false;
  $("notice").dataset.kind = kind;
  $("notice-text").textContent = message;
}

function clearNotice() {
  $("notice").hidden = true;
  $("notice-text").textContent = "";
}

const TOKEN_MESSAGE =
  "The server refused the API key (401 unauthorized). Enter an API key (or the token the " +
  "server was started with, --token or LIVELENS_TOKEN) in the API key field and press Save.";

function tokenRefused() {
  notify(TOKEN_MESSAGE);
  document.body.dataset.auth = "refused";
  $("token-input").setAttribute("aria-invalid", "true");
  $("token-input").focus();
}

/** A 403: the key is valid but lacks a scope; the server's message names the scope. */
function scopeRefused(message) {
  notify(`This API key may not do that: ${message}. Ask for a key with that scope.`);
  document.body.dataset.auth = "scope";
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function authHeaders(extra = {}) {
  return state.token ? { ...extra, Authorization: `Bearer ${state.token}` } : extra;
}

/** fetch() with the bearer token; a non-2xx answer throws ApiError (401 also asks for a token). */
async function api(path, { method = "GET", body, headers = {}, raw = false } = {}) {
  const init = { method, headers: authHeaders(headers) };
  if (body !== undefined) {
    init.body = typeof body === "string" ? body : JSON.stringify(body);
    if (typeof body !== "string") init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ApiError(0, "network", `cannot reach the server (${error.message})`);
  }
  if (!response.ok) {
    let code = "http_error";
    let message = `${method} ${path} answered ${response.status}`;
    try {
      const data = await response.json();
      if (data && data.error) ({ code, message } = data.error);
    } catch {
      // not JSON: keep the generic message
    }
    if (response.status === 401) tokenRefused();
    if (response.status === 403 && code === "forbidden_scope") scopeRefused(message);
    throw new ApiError(response.status, code, message);
  }
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

function tokenAccepted() {
  if (document.body.dataset.auth === "refused") clearNotice();
  document.body.dataset.auth = "ok";
  $("token-input").removeAttribute("aria-invalid");
}

// ------------------------------------------------------------------ sessions
async function refreshSessions() {
  try {
    const data = await api("/v1/sessions");
    tokenAccepted();
    state.sessions = data.sessions;
    renderSessions();
  } catch (error) {
    if (error.status !== 401) $("sessions-empty").textContent = `Could not list sessions: ${error.message}`;
  }
}

function renderSessions() {
  const list = $("session-list");
  // The list is rebuilt on every refresh: keep keyboard focus on the same session.
  const focused = list.contains(document.activeElement) ? document.activeElement.dataset.session : null;
  list.replaceChildren();
  const sessions = [...state.sessions].sort((a, b) => (a.created < b.created ? 1 : -1));
  for (const session of sessions) {
    const selected = session.id === state.sessionId;
    const button = el(
      "button",
      {
        type: "button",
        class: "session-item",
        "aria-current": selected ? "true" : null,
        "data-session": session.id,
        title: session.source,
        onclick: () => selectSession(session.id),
      },
      el(
        "span",
        { class: "session-line" },
        el("span", { class: "session-id", text: shortId(session.id) }),
        el("span", { class: `badge badge-kind`, text: session.kind }),
        el("span", { class: `badge badge-state`, "data-state": session.state, text: session.state }),
      ),
      el("span", { class: "session-source", text: session.source }),
    );
    button.setAttribute(
      "aria-label",
      `Session ${shortId(session.id)}, ${session.kind}, ${session.state}, ${session.source}`,
    );
    list.append(el("li", {}, button));
  }
  if (focused) list.querySelector(`[data-session="${CSS.escape(focused)}"]`)?.focus();
  $("sessions-empty").hidden = sessions.length > 0;
  $("sessions-empty").textContent = "No sessions yet.";
}

async function selectSession(id, { fromHash = false } = {}) {
  if (!id) return;
  if (id === state.sessionId && state.ws) return;
  closeSocket();
  resetSessionView();
  state.sessionId = id;
  if (!fromHash) history.replaceState(null, "", `#session=${encodeURIComponent(id)}`);
  $("current-session").textContent = `Session ${shortId(id)}`;
  $("current-session").title = id;
  renderSessions();
  let record;
  try {
    record = await api(`/v1/sessions/${encodeURIComponent(id)}`);
  } catch (error) {
    if (state.sessionId !== id) return;
    if (error.status === 404) {
      notify(
        `Session "${id}" was not found on this server (unknown_session). It may have expired ` +
          "or the link is wrong; pick a session from the list or publish a new one.",
      );
      document.body.dataset.session = "unknown";
      state.sessionId = null;
      updateAlertControls();
      $("current-session").textContent = "No session selected";
      renderSessions();
    } else if (error.status !== 401) {
      notify(`Could not open session ${shortId(id)}: ${error.message}`);
    }
    return;
  }
  if (state.sessionId !== id) return;
  tokenAccepted();
  document.body.dataset.session = "selected";
  // A WHIP source is "whip:<address> <user agent>": the address is enough up here.
  const source = record.kind === "whip" ? record.source.split(" ")[0] : record.source;
  $("current-session").textContent = `Session ${shortId(id)} · ${record.kind} · ${source}`;
  $("current-session").title = `${id}\n${record.source}`;
  if (record.status) applyStatus(record.status);
  else applyStatus({ state: record.state, reason: record.reason, ...record.stats });
  updateAlertControls();
  refreshAlerts();
  loadAlertEvents(id);
  await loadHistory(id);
  connectSocket(id);
}

function resetSessionView() {
  state.status = null;
  state.answers = [];
  state.pending = null;
  state.selectedSegment = null;
  clearFrames();
  clearAlerts();
  $("frames-hint").textContent = "Click a segment on the timeline to see its frames.";
  resetAnswerCard();
  renderHistory();
  renderTimeline();
  renderStats();
  updateAskControls();
}

// ------------------------------------------------------------------ history
async function loadHistory(id) {
  try {
    const data = await api(`/v1/sessions/${encodeURIComponent(id)}/history`);
    if (state.sessionId !== id) return;
    const known = new Set(state.answers.map((a) => a.id));
    const entries = data.entries
      .map((entry) => ({ ...entry, id: entry.question_id || entry.id }))
      .filter((entry) => !known.has(entry.id));
    state.answers = [...entries, ...state.answers];
    renderHistory();
    renderTimeline();
  } catch (error) {
    if (error.status !== 401) notify(`Could not load the history: ${error.message}`);
  }
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  const answers = [...state.answers].reverse();
  answers.forEach((answer, i) => {
    const latest = i === 0;
    const chips = el("div", { class: "chips" });
    answer.segments.forEach((segment, index) => {
      chips.append(segmentButton(answer, segment, index, "chip", latest));
    });
    const meta = [clock(answer.asked_at)];
    if (answer.latency_ms) meta.push(`${Math.round(answer.latency_ms.total)} ms`);
    list.append(
      el(
        "li",
        { class: "history-item", "data-answer": answer.id },
        el("p", { class: "history-q", text: answer.question }),
        el("p", { class: "history-a", text: answer.text || "(empty answer)" }),
        answer.segments.length ? chips : null,
        el("p", { class: "history-meta muted small", text: meta.filter(Boolean).join(" · ") }),
      ),
    );
  });
  $("history-empty").hidden = answers.length > 0;
  $("history-count").textContent = answers.length ? `${answers.length}` : "";
}

// ------------------------------------------------------------------ websocket
function setConnection(kind, text) {
  $("ws-state").dataset.state = kind;
  $("ws-state-text").textContent = text;
}

function closeSocket() {
  state.wsGeneration += 1;
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = null;
  if (state.ws) {
    state.ws.onclose = null;
    state.ws.close(1000, "console switched session");
    state.ws = null;
  }
  setConnection("idle", "Not connected");
  updateAskControls();
}

/** A single-use websocket ticket (30 s), asked for with the key in a header: the key itself
 *  never goes into a URL, which access logs would keep. */
async function socketTicket(id) {
  const data = await api(`/v1/sessions/${encodeURIComponent(id)}/ticket`, { method: "POST" });
  return data.ticket;
}

async function connectSocket(id) {
  const generation = ++state.wsGeneration;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  setConnection("connecting", "Connecting…");
  let ticket;
  try {
    ticket = await socketTicket(id);
  } catch (error) {
    if (generation !== state.wsGeneration) return;
    if (error.status === 401 || error.status === 403) {
      setConnection("closed", error.status === 401 ? "Key refused" : "Key lacks the read scope");
      return;
    }
    if (error.status === 404) {
      sessionGone(id);
      return;
    }
    scheduleReconnect(id, generation, "");
    return;
  }
  if (generation !== state.wsGeneration) return;
  const query = `?ticket=${encodeURIComponent(ticket)}`;
  const ws = new WebSocket(`${scheme}://${location.host}/v1/sessions/${encodeURIComponent(id)}/ws${query}`);
  state.ws = ws;
  ws.onopen = () => {
    if (generation !== state.wsGeneration) return;
    state.reconnectDelay = RECONNECT_MIN_MS;
    setConnection("open", "Connected");
    updateAskControls();
  };
  ws.onmessage = (event) => {
    if (generation !== state.wsGeneration) return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    handleMessage(message);
  };
  ws.onclose = (event) => {
    if (generation !== state.wsGeneration) return;
    state.ws = null;
    updateAskControls();
    if (state.pending) {
      failPending("The connection dropped before the answer arrived; it will still appear in the history.");
    }
    if (event.code === 4401) {
      setConnection("closed", "Key refused");
      tokenRefused();
      return;
    }
    if (event.code === 4403) {
      setConnection("closed", "Key lacks the read scope");
      scopeRefused(event.reason || "this key lacks the read scope");
      return;
    }
    if (event.code === 4404) {
      sessionGone(id);
      return;
    }
    const why =
      event.code === 4408 ? "The server dropped this console for reading too slowly (4408). " : "";
    scheduleReconnect(id, generation, why);
  };
}

function sessionGone(id) {
  setConnection("closed", "Session gone");
  notify(
    `Session ${shortId(id)} is not held by this server any more (4404): it was deleted, ` +
      "expired, or runs on another node. Its history stays readable.",
  );
}

function scheduleReconnect(id, generation, why) {
  const delay = state.reconnectDelay;
  state.reconnectDelay = Math.min(delay * 2, RECONNECT_MAX_MS);
  setConnection("reconnecting", `${why}Reconnecting in ${(delay / 1000).toFixed(1)} s…`);
  state.reconnectTimer = setTimeout(() => {
    if (generation !== state.wsGeneration) return;
    loadHistory(id);
    loadAlertEvents(id); // what was sent while disconnected
    connectSocket(id);
  }, delay);
}

function send(message) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
  state.ws.send(JSON.stringify(message));
  return true;
}

function handleMessage(message) {
  switch (message.type) {
    case "status":
      applyStatus(message);
      break;
    case "token":
      onToken(message);
      break;
    case "answer":
      onAnswer(message);
      break;
    case "error":
      onError(message);
      break;
    case "alert":
      onAlertEvent(message);
      break;
    default:
      break;
  }
}

// ------------------------------------------------------------------ stats
function applyStatus(status) {
  const previous = state.status;
  state.status = status;
  renderStats();
  renderTimeline();
  const listed = state.sessions.find((x) => x.id === state.sessionId);
  if (listed && status.state && listed.state !== status.state) {
    listed.state = status.state; // keep the list in step without waiting for its refresh
    renderSessions();
  }
  if (previous && previous.state !== status.state) refreshSessions();
  updateAskControls();
}

function renderStats() {
  const s = state.status;
  const set = (id, value) => {
    $(id).textContent = value;
  };
  const pill = $("stat-state");
  if (!s) {
    pill.textContent = state.sessionId ? "loading" : "no session";
    pill.dataset.state = "none";
    for (const id of [
      "stat-frames-received",
      "stat-frames-sampled",
      "stat-frames-in-model",
      "stat-frames-dropped",
      "stat-kept-ratio",
      "stat-kv",
      "stat-live-edge",
      "stat-lag",
    ])
      set(id, "–");
    $("stat-reason").hidden = true;
    return;
  }
  pill.textContent = s.state;
  pill.dataset.state = s.state;
  const num = (v) => (v === undefined || v === null ? "–" : Number(v).toLocaleString());
  set("stat-frames-received", num(s.frames_received));
  set("stat-frames-sampled", num(s.frames_sampled));
  set("stat-frames-in-model", num(s.frames_in_model));
  set("stat-frames-dropped", num(s.frames_dropped));
  set(
    "stat-kept-ratio",
    s.kept_ratio === null || s.kept_ratio === undefined ? "–" : `${(s.kept_ratio * 100).toFixed(0)} %`,
  );
  $("stat-kv").replaceChildren(
    s.kv_bytes !== undefined ? bytes(s.kv_bytes) : "",
    el("small", { text: ` ${num(s.kv_tokens)} tok` }),
  );
  set("stat-live-edge", seconds(s.live_edge));
  set(
    "stat-window",
    s.window_start == null ? "–" : `${seconds(s.window_start)} – ${seconds(s.window_end)}`,
  );
  set("stat-memory", s.memory_start == null ? "–" : seconds(s.memory_start));
  set("stat-lag", seconds(s.lag, 2));
  const stats = $("stats");
  stats.dataset.framesInModel = String(s.frames_in_model ?? 0);
  stats.dataset.liveEdge = String(s.live_edge ?? 0);
  stats.dataset.streamPosition = String(s.stream_position ?? 0);
  $("stat-reason").hidden = !s.reason;
  $("stat-reason").textContent = s.reason ? `Reason: ${s.reason}` : "";
}

// ------------------------------------------------------------------ asking
function updateAskControls() {
  const open = !!state.ws && state.ws.readyState === WebSocket.OPEN;
  const frames = state.status ? state.status.frames_in_model > 0 : false;
  $("ask-button").disabled = !open || !!state.pending;
  $("cancel-button").disabled = !state.pending;
  $("ask-button").title = !open
    ? "Select a session first"
    : !frames
      ? "The session has no video in the model yet"
      : "";
}

function resetAnswerCard() {
  const card = $("answer-card");
  card.dataset.state = "empty";
  card.dataset.tokens = "0";
  $("answer-state").textContent = "No question yet";
  $("answer-question").textContent = "";
  $("answer-text").textContent = "";
  $("answer-text").setAttribute("aria-busy", "false");
  $("answer-error").hidden = true;
  $("answer-meta").replaceChildren();
}

function ask(question) {
  question = question.trim();
  if (!question || state.pending) return;
  const maxTokens = Math.min(1024, Math.max(1, Number($("max-tokens").value) || 128));
  state.questionCounter += 1;
  const id = `c${Date.now().toString(36)}-${state.questionCounter}`;
  if (!send({ type: "ask", id, question, max_new_tokens: maxTokens })) {
    notify("Not connected to a session: select or publish one first.");
    return;
  }
  state.pending = { id, question, text: "", tokens: 0 };
  resetAnswerCard();
  const card = $("answer-card");
  card.dataset.state = "waiting";
  card.dataset.question = id;
  $("answer-state").textContent = "Waiting for the model…";
  $("answer-question").textContent = question;
  $("answer-text").setAttribute("aria-busy", "true");
  $("question").value = "";
  updateAskControls();
}

function onToken(message) {
  const pending = state.pending;
  if (!pending || message.id !== pending.id) return;
  pending.text += message.text;
  pending.tokens += 1;
  const card = $("answer-card");
  card.dataset.state = "streaming";
  card.dataset.tokens = String(pending.tokens);
  $("answer-state").textContent = "Answering…";
  $("answer-text").textContent = pending.text;
}

function onAnswer(message) {
  const pending = state.pending;
  const mine = pending && message.id === pending.id;
  const answer = {
    id: message.id,
    question: message.question,
    text: message.text,
    segments: message.segments,
    asked_at: message.asked_at,
    answered_at: message.answered_at,
    latency_ms: message.latency_ms,
    stream_position: message.stream_position,
    lag: message.lag,
  };
  state.answers = state.answers.filter((a) => a.id !== answer.id).concat(answer);
  if (mine) {
    state.pending = null;
    const card = $("answer-card");
    card.dataset.state = "done";
    $("answer-state").textContent = "Answered";
    $("answer-text").textContent = message.text || "(empty answer)";
    $("answer-text").setAttribute("aria-busy", "false");
    renderAnswerMeta(answer);
  }
  renderHistory();
  renderTimeline();
  updateAskControls();
}

function renderAnswerMeta(answer) {
  const meta = $("answer-meta");
  meta.replaceChildren();
  if (answer.segments.length) {
    const chips = el("div", { class: "chips" });
    answer.segments.forEach((segment, index) => {
      chips.append(segmentButton(answer, segment, index, "chip", true));
    });
    meta.append(chips);
  } else {
    meta.append(el("span", { class: "muted small", text: "No time segments in this answer." }));
  }
  const facts = [`saw up to ${seconds(answer.stream_position)}`];
  if (answer.lag !== null && answer.lag !== undefined) facts.push(`${seconds(answer.lag, 2)} behind live`);
  if (answer.latency_ms) {
    facts.push(`first token ${Math.round(answer.latency_ms.ttft)} ms`);
    facts.push(`total ${Math.round(answer.latency_ms.total)} ms`);
  }
  meta.append(el("span", { class: "muted small", text: facts.join(" · ") }));
}

function failPending(text, code = "") {
  const card = $("answer-card");
  card.dataset.state = "error";
  $("answer-state").textContent = code === "cancelled" ? "Cancelled" : "Failed";
  $("answer-text").setAttribute("aria-busy", "false");
  $("answer-error").hidden = false;
  $("answer-error").textContent = text;
  state.pending = null;
  updateAskControls();
}

function onError(message) {
  const pending = state.pending;
  if (pending && message.id === pending.id) {
    failPending(`${message.message} (${message.code})`, message.code);
    return;
  }
  if (message.code === "unauthorized") return; // the 4401 close that follows says it
  if (message.code === "unknown_session") return; // likewise 4404
  if (message.code === "unknown_question") return; // a cancel that raced the answer
  notify(`The server refused a message: ${message.message} (${message.code})`);
}

function cancel() {
  const pending = state.pending;
  if (!pending) return;
  send({ type: "cancel", id: pending.id });
  failPending("Cancelled: the question was withdrawn.", "cancelled");
  state.answers = state.answers.filter((a) => a.id !== pending.id);
}

// ------------------------------------------------------------------ timeline
function timelineLength() {
  let end = state.status && state.status.live_edge ? state.status.live_edge : 0;
  for (const answer of state.answers) for (const s of answer.segments) end = Math.max(end, s.end);
  for (const event of state.alertEvents.values()) end = Math.max(end, event.ended ?? event.started);
  return Math.max(end, 1);
}

function segmentButton(answer, segment, index, kind, latest) {
  const key = `${answer.id}:${index}`;
  const label = `segment ${segmentLabel(segment)}`;
  const button = el("button", {
    type: "button",
    class: kind === "chip" ? "chip" : "segment",
    "data-segment": key,
    "data-start": segment.start,
    "data-end": segment.end,
    "data-latest": latest ? "true" : "false",
    "aria-pressed": state.selectedSegment === key ? "true" : "false",
    "aria-label": label,
    title: `${answer.question}\n${segmentLabel(segment)}`,
    onclick: () => showSegment(answer, segment, key),
  });
  const a = Number(segment.start).toFixed(1);
  const b = Number(segment.end).toFixed(1);
  button.textContent = kind === "chip" ? segmentLabel(segment) : segment.start === segment.end ? a : `${a}–${b}`;
  return button;
}

function renderTimeline() {
  const length = timelineLength();
  const pct = (t) => `${Math.min(100, Math.max(0, (t / length) * 100))}%`;
  const latestLane = $("lane-latest");
  const earlierLane = $("lane-earlier");
  const model = $("lane-model");
  latestLane.replaceChildren(model);
  earlierLane.replaceChildren();
  // What the model holds now: its window, from window_start to its newest frame.
  const position = state.status ? state.status.stream_position || 0 : 0;
  const windowStart = state.status && state.status.window_start != null ? state.status.window_start : 0;
  model.style.left = pct(windowStart);
  model.style.width = `calc(${pct(position)} - ${pct(windowStart)})`;
  model.dataset.windowStart = String(windowStart);
  model.title = `The model holds ${windowStart.toFixed(1)}–${position.toFixed(1)} s`;
  const latest = state.answers.length ? state.answers[state.answers.length - 1] : null;
  for (const answer of state.answers) {
    const isLatest = answer === latest;
    answer.segments.forEach((segment, index) => {
      const button = segmentButton(answer, segment, index, "bar", isLatest);
      button.style.left = pct(segment.start);
      button.style.width = `max(10px, calc(${pct(segment.end)} - ${pct(segment.start)}))`;
      (isLatest ? latestLane : earlierLane).append(button);
    });
  }
  renderAlertMarkers(pct);
  const axis = $("axis");
  axis.replaceChildren();
  const step = niceStep(length / 6);
  for (let t = 0; t <= length + 1e-9; t += step) {
    const edge = t === 0 ? "start" : t + step > length + 1e-9 && t / length > 0.94 ? "end" : null;
    axis.append(el("span", { class: "tick", "data-edge": edge, style: `left: ${pct(t)}`, text: formatTick(t) }));
  }
  const edge = state.status && state.status.live_edge != null ? state.status.live_edge : null;
  $("timeline-range").textContent =
    edge === null
      ? "media seconds"
      : `0 – ${edge.toFixed(1)} s (live edge); the model holds ${windowStart.toFixed(1)}–${position.toFixed(1)} s`;
}

function niceStep(raw) {
  const power = 10 ** Math.floor(Math.log10(Math.max(raw, 1e-3)));
  for (const m of [1, 2, 5, 10]) if (m * power >= raw) return m * power;
  return 10 * power;
}

function formatTick(t) {
  if (t >= 60) {
    const m = Math.floor(t / 60);
    const s = Math.round(t - m * 60);
    return `${m}:${String(s).padStart(2, "0")}`;
  }
  return `${Number.isInteger(t) ? t : t.toFixed(1)} s`;
}

// ------------------------------------------------------------------ frames
function clearFrames() {
  for (const url of state.frameUrls) URL.revokeObjectURL(url);
  state.frameUrls = [];
  $("frame-strip").replaceChildren();
}

function pickEvenly(items, count) {
  if (items.length <= count) return items;
  const picked = [];
  for (let i = 0; i < count; i += 1) picked.push(items[Math.round((i * (items.length - 1)) / (count - 1))]);
  return picked;
}

async function showSegment(answer, segment, key) {
  const id = state.sessionId;
  if (!id) return;
  state.selectedSegment = key;
  for (const node of document.querySelectorAll("[data-segment]")) {
    node.setAttribute("aria-pressed", node.dataset.segment === key ? "true" : "false");
  }
  const request = ++state.framesRequest;
  $("frames-title").textContent = `Frames ${segmentLabel(segment)}`;
  $("frames-hint").textContent = "Loading frames…";
  const base = `/v1/sessions/${encodeURIComponent(id)}`;
  let items = [];
  let nearest = false;
  try {
    const list = await api(`${base}/thumbnails?start=${segment.start}&end=${segment.end}`);
    items = pickEvenly(list.thumbnails, MAX_FRAMES_SHOWN).map((t) => ({ url: t.url, time: t.time, wall: t.wall_time }));
    if (!items.length) {
      nearest = true;
      const mid = (segment.start + segment.end) / 2;
      items = [{ url: `${base}/thumbnail?at=${mid.toFixed(3)}`, time: null, wall: null }];
    }
    const blobs = await Promise.all(
      items.map(async (item) => {
        const response = await api(item.url, { raw: true });
        const time = item.time ?? Number(response.headers.get("X-LiveLens-Time"));
        return { ...item, time, blob: await response.blob() };
      }),
    );
    if (request !== state.framesRequest) return;
    clearFrames();
    for (const item of blobs) {
      const url = URL.createObjectURL(item.blob);
      state.frameUrls.push(url);
      const caption = `${item.time.toFixed(2)} s${item.wall ? ` · ${clock(item.wall)}` : ""}`;
      $("frame-strip").append(
        el(
          "figure",
          { class: "frame", role: "listitem", "data-time": item.time },
          el("img", { src: url, alt: `Frame at ${item.time.toFixed(2)} s`, loading: "eager" }),
          el("figcaption", { text: nearest ? `nearest: ${caption}` : caption }),
        ),
      );
    }
    $("frames-hint").textContent = nearest
      ? "No frame kept inside this segment; showing the nearest kept frame."
      : `${blobs.length} kept frame${blobs.length === 1 ? "" : "s"} in this segment.`;
  } catch (error) {
    if (request !== state.framesRequest) return;
    clearFrames();
    $("frames-hint").textContent =
      error.status === 410 || error.status === 409
        ? `Frames are not available: ${error.message}.`
        : `Could not load frames: ${error.message}`;
  }
}

// ------------------------------------------------------------------ alerts
const alertsPath = (id) => `/v1/sessions/${encodeURIComponent(id)}/alerts`;

function clearAlerts() {
  for (const url of state.alertThumbs.values()) URL.revokeObjectURL(url);
  for (const url of state.alertClips.values()) URL.revokeObjectURL(url);
  state.alerts = [];
  state.alertEvents = new Map();
  state.alertFeed = [];
  state.alertNodes = new Map();
  state.alertThumbs = new Map();
  state.alertClips = new Map();
  showAlertError("");
  renderAlerts();
  renderAlertFeed();
  updateAlertControls();
}

function updateAlertControls() {
  $("alert-add").disabled = !state.sessionId;
  $("alert-add").title = state.sessionId ? "" : "Select a session first";
}

function showAlertError(text) {
  $("alert-error").hidden = !text;
  $("alert-error").textContent = text;
  if (text) $("alert-condition").setAttribute("aria-invalid", "true");
  else $("alert-condition").removeAttribute("aria-invalid");
}

async function refreshAlerts() {
  const id = state.sessionId;
  if (!id) return;
  try {
    const data = await api(alertsPath(id));
    if (state.sessionId !== id) return;
    state.alerts = data.alerts;
    renderAlerts();
  } catch (error) {
    if (state.sessionId !== id || error.status === 401) return;
    $("alerts-empty").hidden = false;
    $("alerts-empty").textContent = `Could not list the alerts: ${error.message}`;
  }
}

function renderAlerts() {
  const list = $("alert-list");
  list.replaceChildren();
  for (const alert of state.alerts) {
    const confidence =
      alert.confidence === null || alert.confidence === undefined
        ? "not evaluated yet"
        : `confidence ${Number(alert.confidence).toFixed(2)}`;
    const events = `${alert.events} event${alert.events === 1 ? "" : "s"}`;
    list.append(
      el(
        "li",
        { class: "alert-item", "data-alert": alert.id, "data-active": alert.active ? "true" : "false" },
        el(
          "div",
          { class: "alert-line" },
          el("span", { class: "alert-condition", text: alert.condition, title: alert.question }),
          el("span", {
            class: "badge badge-alert",
            "data-active": alert.active ? "true" : "false",
            text: alert.active ? "active" : "inactive",
          }),
        ),
        el(
          "div",
          { class: "alert-line" },
          el("span", {
            class: "alert-facts muted small",
            text: `${confidence} · ${events} · every ${alert.every} s`,
          }),
          el("button", {
            type: "button",
            class: "btn btn-small btn-danger",
            "aria-label": `Remove alert: ${alert.condition}`,
            text: "Remove",
            onclick: () => removeAlert(alert),
          }),
        ),
      ),
    );
  }
  $("alerts-empty").hidden = state.alerts.length > 0;
  $("alerts-empty").textContent = "No alerts on this session.";
  $("alerts-count").textContent = state.alerts.length ? `${state.alerts.length}` : "";
}

/** A number field's value, or undefined when left empty (the server's default applies). */
function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

async function addAlert() {
  const id = state.sessionId;
  if (!id) return;
  const body = {
    condition: $("alert-condition").value,
    every: numberField("alert-every"),
    cooldown: numberField("alert-cooldown"),
    threshold: numberField("alert-threshold"),
  };
  showAlertError("");
  $("alert-add").disabled = true;
  try {
    await api(alertsPath(id), { method: "POST", body });
    if (state.sessionId !== id) return;
    $("alert-condition").value = "";
  } catch (error) {
    if (state.sessionId === id) showAlertError(`${error.message} (${error.status} ${error.code})`);
  } finally {
    updateAlertControls();
  }
  await refreshAlerts();
}

async function removeAlert(alert) {
  const id = state.sessionId;
  if (!id) return;
  showAlertError("");
  try {
    await api(`${alertsPath(id)}/${encodeURIComponent(alert.id)}`, { method: "DELETE" });
  } catch (error) {
    if (state.sessionId === id) showAlertError(`Could not remove it: ${error.message} (${error.status} ${error.code})`);
  }
  await refreshAlerts();
}

/** Earlier events (from the session's Redis Stream), so a reload shows them too. */
async function loadAlertEvents(id) {
  try {
    const data = await api(`/v1/sessions/${encodeURIComponent(id)}/alert-events?count=${MAX_ALERT_FEED}`);
    if (state.sessionId !== id) return;
    for (const event of data.events) addAlertEdge(event, { fetchThumbnail: true });
    renderAlertFeed();
    renderTimeline();
  } catch (error) {
    // The feed still fills from the websocket; a 401 is reported by the session list.
  }
}

function onAlertEvent(message) {
  if (message.session_id && message.session_id !== state.sessionId) return;
  addAlertEdge(message, { fetchThumbnail: true });
  renderAlertFeed();
  renderTimeline();
  refreshAlerts(); // its state and event count changed
}

/** Record one edge: the event (for the timeline) and a feed entry, newest first. */
function addAlertEdge(event, { fetchThumbnail }) {
  const known = state.alertEvents.get(event.event_id);
  state.alertEvents.set(event.event_id, { ...known, ...event, ended: event.ended ?? known?.ended ?? null });
  const key = `${event.event_id}:${event.edge}`;
  if (state.alertFeed.some((entry) => entry.key === key)) return;
  state.alertFeed.push({ key, event });
  state.alertFeed.sort((a, b) => (a.event.time < b.event.time ? 1 : a.event.time > b.event.time ? -1 : 0));
  const dropped = state.alertFeed.splice(MAX_ALERT_FEED);
  for (const entry of dropped) state.alertNodes.delete(entry.key);
  const shown = new Set(state.alertFeed.map((entry) => entry.event.event_id));
  for (const eventId of [...state.alertEvents.keys()]) {
    if (shown.has(eventId)) continue;
    state.alertEvents.delete(eventId);
    for (const cache of [state.alertThumbs, state.alertClips]) {
      if (cache.has(eventId)) URL.revokeObjectURL(cache.get(eventId));
      cache.delete(eventId);
    }
  }
  if (fetchThumbnail && event.edge === "rise" && shown.has(event.event_id)) loadAlertThumbnail(event);
}

async function loadAlertThumbnail(event) {
  const id = state.sessionId;
  if (state.alertThumbs.has(event.event_id)) return;
  state.alertThumbs.set(event.event_id, null); // loading
  let url = null;
  let failure = "";
  try {
    const response = await api(event.thumbnail_url, { raw: true });
    const blob = await response.blob();
    if (state.sessionId !== id || !state.alertThumbs.has(event.event_id)) return;
    url = URL.createObjectURL(blob);
    state.alertThumbs.set(event.event_id, url);
  } catch (error) {
    if (state.sessionId !== id) return;
    failure = error.status === 410 ? "Evidence expired." : `No thumbnail: ${error.message}`;
  }
  const node = state.alertNodes.get(`${event.event_id}:rise`);
  if (node) fillEvidence(node, event, url, failure);
}

function fillEvidence(node, event, url, failure) {
  const box = node.querySelector(".alert-evidence");
  if (!box) return;
  if (url) {
    const img = box.querySelector("img") || el("img", { alt: `Frame at ${Number(event.started).toFixed(2)} s` });
    img.src = url;
    if (!img.isConnected) box.prepend(img);
  } else if (failure) {
    box.replaceChildren(el("span", { class: "muted small", text: failure }));
  }
}

async function playAlertClip(event, node) {
  const box = node.querySelector(".alert-clip");
  const id = state.sessionId;
  let url = state.alertClips.get(event.event_id);
  if (!url) {
    box.replaceChildren(el("span", { class: "muted small", text: "Loading the clip…" }));
    try {
      const response = await api(event.clip_url, { raw: true });
      const blob = await response.blob();
      if (state.sessionId !== id) return;
      url = URL.createObjectURL(blob);
      state.alertClips.set(event.event_id, url);
    } catch (error) {
      const text = error.status === 410 ? "The clip has expired." : `No clip: ${error.message}`;
      box.replaceChildren(el("span", { class: "muted small", text }));
      return;
    }
  }
  box.replaceChildren(
    el("video", { src: url, controls: true, autoplay: true, muted: true, playsinline: true, "aria-label": "Event clip" }),
  );
}

function alertFeedNode(entry) {
  const event = entry.event;
  const rise = event.edge === "rise";
  const confidence = event.confidence == null ? "" : ` · confidence ${Number(event.confidence).toFixed(2)}`;
  const media = rise
    ? `at ${Number(event.started).toFixed(1)} s`
    : `${Number(event.started).toFixed(1)}–${Number(event.ended).toFixed(1)} s`;
  const node = el(
    "li",
    { class: "alert-event", "data-event": event.event_id, "data-edge": event.edge },
    el(
      "div",
      { class: "alert-line" },
      el("span", { class: "badge badge-edge", "data-edge": event.edge, text: rise ? "rise" : "fall" }),
      el("span", { class: "alert-condition", text: event.condition }),
    ),
    el("p", { class: "muted small", text: `${clock(event.time)} · ${media}${confidence}` }),
  );
  if (rise) {
    const box = el("div", { class: "alert-evidence" });
    const clip = el(
      "div",
      { class: "alert-clip" },
      el("button", { type: "button", class: "btn btn-small", text: "Play clip", onclick: () => playAlertClip(event, node) }),
    );
    box.append(clip);
    node.append(box);
    const url = state.alertThumbs.get(event.event_id);
    if (url) fillEvidence(node, event, url, "");
  }
  return node;
}

function renderAlertFeed() {
  const nodes = state.alertFeed.map((entry) => {
    let node = state.alertNodes.get(entry.key);
    if (!node) {
      node = alertFeedNode(entry);
      state.alertNodes.set(entry.key, node);
    }
    return node;
  });
  $("alert-feed").replaceChildren(...nodes);
  $("alert-feed-empty").hidden = nodes.length > 0;
}

function renderAlertMarkers(pct) {
  const lane = $("lane-alerts");
  lane.replaceChildren();
  for (const event of state.alertEvents.values()) {
    const ended = event.ended ?? null;
    const span = ended === null ? `from ${Number(event.started).toFixed(1)} s` : segmentLabel({ start: event.started, end: ended });
    const marker = el("button", {
      type: "button",
      class: "alert-marker",
      "data-event": event.event_id,
      "data-started": event.started,
      "data-ended": ended === null ? null : ended,
      "aria-label": `alert ${event.condition}, ${span}`,
      title: `${event.condition}\n${span}`,
      onclick: () =>
        showSegment(
          { id: event.event_id, question: event.condition },
          { start: event.started, end: ended ?? event.started },
          `alert:${event.event_id}`,
        ),
    });
    marker.style.left = pct(event.started);
    marker.style.width = ended === null ? "" : `max(4px, calc(${pct(ended)} - ${pct(event.started)}))`;
    lane.append(marker);
  }
}

// ------------------------------------------------------------------ publishing (WHIP)
function setPublishStatus(kind, text) {
  $("publish-status").dataset.state = kind;
  $("publish-status").textContent = text;
}

function updatePublishControls() {
  const busy = !!state.publish;
  $("publish-camera").disabled = busy;
  $("publish-screen").disabled = busy;
  $("publish-stop").disabled = !busy;
  $("preview-empty").hidden = busy;
}

/** Only VP8 and H.264 are accepted by the server; offer them first (VP8, then H.264). */
function preferCodecs(transceiver) {
  if (!RTCRtpSender.getCapabilities || !transceiver.setCodecPreferences) return;
  const codecs = RTCRtpSender.getCapabilities("video").codecs;
  const vp8 = codecs.filter((c) => c.mimeType.toLowerCase() === "video/vp8");
  const h264 = codecs.filter(
    (c) =>
      c.mimeType.toLowerCase() === "video/h264" &&
      /profile-level-id=42/.test(c.sdpFmtpLine || "") &&
      /packetization-mode=1/.test(c.sdpFmtpLine || ""),
  );
  const preferred = [...vp8, ...h264];
  if (preferred.length) transceiver.setCodecPreferences(preferred);
}

function iceGathered(pc) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    const timer = setTimeout(resolve, ICE_GATHER_TIMEOUT_MS); // send what we have
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}

async function publish(kind) {
  if (state.publish) return;
  clearNotice();
  const media = navigator.mediaDevices;
  if (!media || (kind === "screen" ? !media.getDisplayMedia : !media.getUserMedia)) {
    setPublishStatus("error", "This browser cannot capture video here (a secure context, https or localhost, is needed).");
    return;
  }
  setPublishStatus("busy", kind === "screen" ? "Choose a screen, window or tab…" : "Opening the camera…");
  let stream;
  try {
    stream =
      kind === "screen"
        ? await media.getDisplayMedia({ video: { frameRate: { ideal: 15 } }, audio: false })
        : await media.getUserMedia({
            video: { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } },
            audio: false,
          });
  } catch (error) {
    setPublishStatus("error", `No video: ${error.name === "NotAllowedError" ? "permission denied" : error.message}.`);
    return;
  }
  const [track] = stream.getVideoTracks();
  track.contentHint = kind === "screen" ? "text" : "detail"; // the model reads the pictures
  const pc = new RTCPeerConnection();
  const publication = { pc, stream, location: null, sessionId: null, kind };
  state.publish = publication;
  updatePublishControls();
  const preview = $("preview");
  preview.srcObject = stream;
  preview.play().catch(() => {});
  track.addEventListener("ended", () => stopPublishing("The capture ended."));
  pc.addEventListener("connectionstatechange", () => {
    if (state.publish !== publication) return;
    const s = pc.connectionState;
    if (s === "connected") setPublishStatus("live", `Publishing to ${shortId(publication.sessionId)}.`);
    else if (s === "failed") setPublishStatus("error", "The WebRTC connection failed.");
    else if (s === "disconnected") setPublishStatus("busy", "Connection interrupted; waiting for it to recover…");
  });
  try {
    const transceiver = pc.addTransceiver(track, { direction: "sendonly", streams: [stream] });
    preferCodecs(transceiver);
    await pc.setLocalDescription(await pc.createOffer());
    setPublishStatus("busy", "Gathering network candidates…");
    await iceGathered(pc); // non-trickle WHIP: every candidate goes in the offer
    setPublishStatus("busy", "Sending the offer…");
    const response = await api("/whip", {
      method: "POST",
      body: pc.localDescription.sdp,
      headers: { "Content-Type": "application/sdp" },
      raw: true,
    });
    const resource = new URL(response.headers.get("Location"), response.url).href;
    publication.location = resource;
    publication.sessionId =
      response.headers.get("X-LiveLens-Session") || resource.split("/").filter(Boolean).pop();
    await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
    if (state.publish !== publication) return; // stopped meanwhile
    setPublishStatus("busy", `Connecting to session ${shortId(publication.sessionId)}…`);
    await refreshSessions();
    await selectSession(publication.sessionId);
  } catch (error) {
    const text = error.status === 401 ? "The API key was refused." : error.message;
    await stopPublishing(`Could not publish: ${text}`, "error");
  }
}

async function stopPublishing(text = "Stopped.", kind = "idle") {
  const publication = state.publish;
  if (!publication) return;
  state.publish = null;
  // DELETE first: closing the connection first would end the session by timeout instead.
  if (publication.location) {
    try {
      await api(publication.location, { method: "DELETE", raw: true });
    } catch (error) {
      if (error.status !== 404) text = `${text} (DELETE failed: ${error.message})`;
    }
  }
  publication.pc.close();
  for (const track of publication.stream.getTracks()) track.stop();
  $("preview").srcObject = null;
  updatePublishControls();
  setPublishStatus(kind, text);
  refreshSessions();
}

// ------------------------------------------------------------------ start-up
function sessionFromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  return params.get("session");
}

function wire() {
  $("token-input").value = state.token;
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token-input").value.trim();
    if (state.token) localStorage.setItem(TOKEN_KEY, state.token);
    else localStorage.removeItem(TOKEN_KEY);
    clearNotice();
    const id = state.sessionId || sessionFromHash();
    refreshSessions();
    if (id) {
      closeSocket();
      state.sessionId = null;
      selectSession(id, { fromHash: true });
    }
  });
  $("notice-close").addEventListener("click", clearNotice);
  $("sessions-refresh").addEventListener("click", refreshSessions);
  $("publish-camera").addEventListener("click", () => publish("camera"));
  $("publish-screen").addEventListener("click", () => publish("screen"));
  $("publish-stop").addEventListener("click", () => stopPublishing());
  $("ask-form").addEventListener("submit", (event) => {
    event.preventDefault();
    ask($("question").value);
  });
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (!$("ask-button").disabled) ask($("question").value);
    }
  });
  $("cancel-button").addEventListener("click", cancel);
  $("alert-form").addEventListener("submit", (event) => {
    event.preventDefault();
    addAlert();
  });
  $("pull-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const source = $("pull-source").value.trim();
    if (!source) return;
    $("pull-status").textContent = "Starting…";
    try {
      const record = await api("/v1/sessions", { method: "POST", body: { source } });
      $("pull-status").textContent = `Started session ${shortId(record.id)}.`;
      $("pull-source").value = "";
      await refreshSessions();
      await selectSession(record.id);
    } catch (error) {
      $("pull-status").textContent = `Could not start: ${error.message} (${error.code}).`;
    }
  });
  window.addEventListener("hashchange", () => {
    const id = sessionFromHash();
    if (id && id !== state.sessionId) selectSession(id, { fromHash: true });
  });
  // Leaving the page ends the publication at once rather than after the ICE timeout.
  window.addEventListener("pagehide", () => {
    const publication = state.publish;
    if (publication && publication.location) {
      fetch(publication.location, { method: "DELETE", headers: authHeaders(), keepalive: true });
    }
  });
  setInterval(() => {
    if (document.visibilityState === "visible" && document.body.dataset.auth !== "refused") refreshSessions();
  }, SESSIONS_REFRESH_MS);
  setInterval(() => {
    if (state.sessionId && document.visibilityState === "visible" && document.body.dataset.auth !== "refused") {
      refreshAlerts();
    }
  }, ALERTS_REFRESH_MS);
}

wire();
updatePublishControls();
updateAlertControls();
resetSessionView();
refreshSessions();
const initial = sessionFromHash();
if (initial) selectSession(initial, { fromHash: true });
