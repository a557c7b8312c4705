"""Answers about the past beyond the window (model/engine.py, "memory"): frames that leave the
window stay in host memory; a question that recalls them is answered over the best-matching
older frames + the window, as one context prefilled again from cached features.

Exactness: that answer equals transformers' own forward over exactly those frames, each keeping
the tokens it kept live (the window's first frame all of them), with their original time labels.
"""

from __future__ import annotations

import torch
from test_engine import GREEDY, NEW_TOKENS, Recorder, _clip, _engine, _run
from test_exactness import HEIGHT, THRESHOLD, WIDTH

from livelens.model.engine import Engine, FrameCallbacks, wants_memory
from livelens.model.reference import OfflineReference
from livelens.model.sampling import SamplingParams

QUESTION = "When did the red square first appear?"


def _feed(tiny_model, memory_s: float, n: int, seed: int, **config) -> tuple[Engine, list]:
    """A session with a 2.5 s window (frames every 1.25 s: it slides every other frame) and
    `memory_s` of memory, fed `n` frames one at a time."""
    engine = _engine(tiny_model, **config)
    engine.open_session("a")
    engine.configure(
        "a",
        height=HEIGHT,
        width=WIDTH,
        threshold=THRESHOLD,
        min_tokens=1,
        callbacks=FrameCallbacks(lambda _: None, lambda exc: None),
        window_s=2.5,
        memory_s=memory_s,
    )
    frames, times = _clip(seed, n)
    for image, t in zip(frames, times, strict=True):
        engine.submit_frame("a", image, t)
        _run(engine, lambda: engine.pending("a") == 0 and engine.settled("a"))
    return engine, [frames, times]


def _windowed(tiny_model) -> tuple[Engine, list]:
    return _feed(tiny_model, 100.0, 9, 7, recall_frames=3)


def _live_mask(loaded, frames, times) -> torch.Tensor:
    """The tokens DiffFP keeps live: each frame against the previous sampled one."""
    whole = OfflineReference(loaded, frames, times, threshold=THRESHOLD)
    return whole.mask.view(len(times), -1)


def test_a_recalling_answer_is_one_forward_over_recalled_frames_and_the_window(tiny_model):
    engine, (frames, times) = _windowed(tiny_model)
    stats = engine.stats("a")
    assert stats.slides >= 2 and stats.memory_frames >= 3
    assert stats.memory_start == times[0]
    window = list(engine.session_record("a").times)

    recorder = Recorder(QUESTION)
    recorder.job.memory = "recall"
    engine.submit_question("a", recorder.job)
    _run(engine, recorder.done.is_set)
    answer = recorder.answer
    assert recorder.error is None and answer is not None
    recalled = list(answer.recalled)
    assert len(recalled) == 3 and recalled == sorted(recalled)
    assert all(t < window[0] for t in recalled)
    assert answer.stream_position == times[-1]

    # The reference: transformers' forward over recalled + window frames, each keeping what it
    # kept live, the window's first frame everything (as the window holds it).
    live = _live_mask(tiny_model, frames, times)
    used = [times.index(t) for t in [*recalled, *window]]
    mask = live[used].clone()
    mask[len(recalled)] = True
    for row, t in enumerate(recalled):  # a frame that was once the window's first kept all
        if _was_first(engine, t):
            mask[row] = True
    reference = OfflineReference(
        tiny_model, frames[used], [times[i] for i in used], threshold=THRESHOLD, mask=mask
    )
    torch.testing.assert_close(recorder.first_logits, reference.logits(QUESTION), atol=1e-4, rtol=0)
    assert answer.token_ids == reference.generate(QUESTION, NEW_TOKENS)
    # The recalling context is gone with its answer: only the window's blocks remain.
    assert engine.pool_usage()[0] == engine.stats("a").kv_blocks


def _was_first(engine: Engine, t: float) -> bool:
    memory = engine.session_record("a").window.memory
    recalled = next(r for r in memory.frames if r.time == t)
    return int(recalled.features.shape[0]) == (HEIGHT // 28) * (WIDTH // 28)


def test_routing_is_explicit(tiny_model) -> None:
    assert wants_memory("When did the red ball first appear?")
    assert wants_memory("What happened before the truck left?")
    assert not wants_memory("Is a red ball visible now?")
    assert not wants_memory("What is currently in the scene?")
    engine, _ = _windowed(tiny_model)
    answers = {}
    for name, question, memory in (
        ("now", "Is a red square visible now?", "auto"),
        ("auto", QUESTION, "auto"),
        ("window", QUESTION, "window"),
    ):
        recorder = Recorder(question, SamplingParams(max_new_tokens=2))
        recorder.job.memory = memory
        engine.submit_question("a", recorder.job)
        _run(engine, recorder.done.is_set)
        answers[name] = recorder.answer
    assert answers["now"].recalled == () and answers["window"].recalled == ()
    assert len(answers["auto"].recalled) == 3


def test_memory_is_bounded_by_its_seconds(tiny_model) -> None:
    engine, (_, times) = _feed(tiny_model, 3.0, 12, 8)
    memory = engine.session_record("a").window.memory
    kept = [r.time for r in memory.frames]
    assert kept and kept[-1] - kept[0] <= 3.0
    assert engine.stats("a").memory_start == kept[0] > times[0]
    recorder = Recorder(QUESTION, GREEDY)
    engine.submit_question("a", recorder.job)
    _run(engine, recorder.done.is_set)
    assert recorder.answer.recalled and set(recorder.answer.recalled) <= set(kept)


def test_the_service_answers_over_memory(tiny_model, tmp_path, redis_server) -> None:
    """Through the service: a session with a 2 s window and memory; `memory: "recall"` brings
    older frames into the answer (`recalled`), `"window"` does not; status shows memory_start."""
    from service_harness import ask, fast_config, running_app, wait_for
    from videos import make_video

    from livelens.model.runner import ModelRunner

    clip = make_video(tmp_path / "clip.mp4", frames=80, fps=10, width=320, height=240)
    config = fast_config(redis_server.url, media_root=tmp_path, window_s=2.0, memory_s=60.0)
    auth = {"Authorization": "Bearer m"}
    with running_app(ModelRunner(tiny_model), config, token="m") as (client, service):
        too_much = client.post(
            "/v1/sessions", json={"source": str(clip.path), "memory": 61}, headers=auth
        )
        assert too_much.status_code == 422
        assert too_much.json()["error"]["code"] == "memory_too_large"
        sid = client.post(
            "/v1/sessions", json={"source": str(clip.path), "realtime": False}, headers=auth
        ).json()["id"]
        session = service.sessions[sid]
        status = wait_for(
            lambda: (
                (s := session.status())["memory_start"] is not None
                and s["state"] == "ended"
                and service.engine.settled(sid)
                and s
            )
        )
        assert status["memory_start"] == 0.0 and status["window_start"] > 0.0
        with client.websocket_connect(f"/v1/sessions/{sid}/ws", headers=auth) as ws:
            recalled, _ = ask(ws, "r", QUESTION, memory="recall", max_new_tokens=2)
            window, _ = ask(ws, "w", QUESTION, memory="window", max_new_tokens=2)
        assert recalled["recalled"] and max(recalled["recalled"]) < status["window_start"]
        assert window["recalled"] == []
        history = client.get(f"/v1/sessions/{sid}/history", headers=auth).json()["entries"]
        assert [h["recalled"] for h in history] == [recalled["recalled"], []]


def test_recall_scores_rank_the_frame_showing_the_asked_thing_over_a_mean_look_alike():
    """A frame with one token on the asked word outranks a frame whose tokens all lean a little
    toward it (the higher mean cosine); groups of frames are scored as one frame at a time."""
    from livelens.model.engine import recall_scores

    generator = torch.Generator().manual_seed(0)
    words = torch.eye(16)[:2] * 3.0  # "red", "ball"
    background = torch.zeros(12, 16)
    background[:, 8:] = torch.randn(12, 8, generator=generator)
    shows = background.clone()
    shows[5] = words[0] + words[1]  # one token: a red ball
    leans = background + 0.4 * (words[0] + words[1]) / 3.0  # every token a little red and round
    mean = [torch.nn.functional.normalize(f.mean(0), dim=0) for f in (shows, leans)]
    query = torch.nn.functional.normalize(words.mean(0), dim=0)
    assert float(mean[1] @ query) > float(mean[0] @ query)  # the mean rule picks the wrong one
    scores = recall_scores([background, shows, leans], words)
    assert scores.argmax().item() == 1
    many = [torch.randn(int(n), 16, generator=generator) for n in torch.randint(1, 40, (600,))]
    alone = torch.stack([recall_scores([f], words)[0] for f in many])
    torch.testing.assert_close(recall_scores(many, words), alone)
