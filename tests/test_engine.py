"""The serving engine (model/engine.py): batched steps stay exact, and its threaded behaviour.

Exactness: every answer of a batched step equals transformers' own offline forward / greedy
generate over the frames that answer saw (model/reference.py shares no code with the engine),
for sessions of different lengths batched together, questions forked while their session's
frames keep arriving, and two questions decoding on one session at once. Each test also asserts
that the steps really were batched, so a scheduler that ran sessions one by one would fail it.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from service_harness import wait_for
from test_exactness import HEIGHT, THRESHOLD, WIDTH

from livelens.model.engine import (
    Answer,
    Engine,
    EngineConfig,
    FrameCallbacks,
    QuestionJob,
)
from livelens.model.reference import OfflineReference
from livelens.model.runner import ModelRunner
from livelens.model.sampling import SamplingParams, SessionError
from livelens.model.scheduler import Refused, SchedulerConfig, StepPlan

NEW_TOKENS = 8
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS)
QUESTIONS = ("when did the white van park?", "what moved first?")


def _clip(seed: int, n: int) -> tuple[np.ndarray, list[float]]:
    """A noisy background and a square that moves (DiffFP keeps some tokens, drops others)."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    frames = []
    for i in range(n):
        frame = background.copy()
        y, x = (i * 17) % (HEIGHT - 20), (i * 29) % (WIDTH - 20)
        frame[y : y + 20, x : x + 20] = (255, (40 * i) % 256, seed * 50 % 256)
        frames.append(frame)
    return np.stack(frames), [round(0.5 + 1.25 * i, 2) for i in range(n)]


class Recorder:
    """What the engine reports for one question (a real sink, from the engine's thread)."""

    def __init__(self, question: str = QUESTIONS[0], params: SamplingParams = GREEDY) -> None:
        self.tokens: list[str] = []
        self.first_logits: torch.Tensor | None = None
        self.answer: Answer | None = None
        self.error: Exception | None = None
        self.done = threading.Event()
        self.job = QuestionJob(
            question,
            params,
            on_start=lambda: None,
            on_token=self.tokens.append,
            on_done=self._done,
            on_error=self._error,
            on_logits=self._logits,
        )

    def _logits(self, logits: torch.Tensor) -> None:
        self.first_logits = logits

    def _done(self, answer: Answer) -> None:
        self.answer = answer
        self.done.set()

    def _error(self, exc: Exception) -> None:
        self.error = exc
        self.done.set()


class Frames:
    def __init__(self) -> None:
        self.appended: list[int] = []
        self.errors: list[Exception] = []
        self.gate: threading.Event | None = None
        """When set, the first report blocks the engine thread until the gate opens."""

    def callbacks(self) -> FrameCallbacks:
        def on_appended(result) -> None:
            self.appended.append(result.frames)
            if self.gate is not None and len(self.appended) == 1:
                assert self.gate.wait(10)

        return FrameCallbacks(on_appended, self.errors.append)


class Plans:
    """Records every plan the engine's own scheduler makes (wraps the real method)."""

    def __init__(self, engine: Engine) -> None:
        self.plans: list[StepPlan] = []
        schedule = engine.scheduler.schedule

        def recording() -> StepPlan:
            plan = schedule()
            self.plans.append(plan)
            return plan

        engine.scheduler.schedule = recording  # type: ignore[method-assign]

    def most(self, what: str) -> int:
        return max((len(getattr(p, what)) for p in self.plans), default=0)


def _engine(tiny_model, **config) -> Engine:
    return Engine(
        ModelRunner(tiny_model),
        EngineConfig(max_pending_frames=config.pop("max_pending_frames", 64), **config),
        num_blocks=4096,
    )


def _open(
    engine: Engine,
    key: str,
    frames: Frames | None = None,
    window_s: float | None = None,
    min_tokens: int = 1,
) -> Frames:
    frames = frames or Frames()
    engine.open_session(key)
    engine.configure(
        key,
        height=HEIGHT,
        width=WIDTH,
        threshold=THRESHOLD,
        min_tokens=min_tokens,
        callbacks=frames.callbacks(),
        window_s=window_s,
    )
    return frames


def _run(engine: Engine, until) -> None:
    for _ in range(500):
        if until():
            return
        engine.step()
    raise AssertionError("the engine did not get there in 500 steps")


def _check(
    loaded, recorder: Recorder, frames: np.ndarray, times: list[float], min_tokens: int = 1
) -> None:
    """The answer equals transformers' offline forward and greedy generate over `frames`."""
    reference = OfflineReference(loaded, frames, times, threshold=THRESHOLD, min_tokens=min_tokens)
    question = recorder.job.question
    assert recorder.error is None and recorder.answer is not None
    assert recorder.answer.stream_position == times[-1]
    torch.testing.assert_close(recorder.first_logits, reference.logits(question), atol=1e-4, rtol=0)
    assert recorder.answer.token_ids == reference.generate(question, NEW_TOKENS)
    assert len(recorder.answer.token_ids) > 0


# ------------------------------------------------------------------------- exactness
def test_sessions_of_different_lengths_batch_exactly(tiny_model) -> None:
    engine = _engine(tiny_model)
    plans = Plans(engine)
    clips = {key: _clip(seed, n) for seed, (key, n) in enumerate({"a": 2, "b": 5, "c": 7}.items())}
    for key, (frames, times) in clips.items():
        _open(engine, key)
        for image, t in zip(frames, times, strict=True):
            assert engine.submit_frame(key, image, t)
    _run(engine, lambda: all(engine.pending(key) == 0 for key in clips))
    assert plans.most("frames") == 3, "one step prefills frames of all three sessions"

    recorders = {key: Recorder() for key in clips}
    for key, recorder in recorders.items():
        engine.submit_question(key, recorder.job)
    _run(engine, lambda: all(r.done.is_set() for r in recorders.values()))
    assert plans.most("questions") == 3 and plans.most("decodes") == 3
    for key, (frames, times) in clips.items():
        _check(tiny_model, recorders[key], frames, times)


def test_question_forked_while_frames_keep_arriving(tiny_model) -> None:
    engine = _engine(tiny_model)
    plans = Plans(engine)
    frames, times = _clip(3, 7)
    _open(engine, "a")
    for image, t in zip(frames[:4], times[:4], strict=True):
        engine.submit_frame("a", image, t)
    early = Recorder()
    engine.submit_question("a", early.job)
    engine.step()  # intake: the first four frames, then the question on them; they prefill
    engine.step()  # the question forks
    for image, t in zip(frames[4:], times[4:], strict=True):  # one new frame per decode step
        engine.submit_frame("a", image, t)
        engine.step()
    _run(engine, lambda: early.done.is_set() and engine.pending("a") == 0)
    # The video grew while the answer decoded, in the same steps.
    assert any(p.decodes and p.frames for p in plans.plans)
    _check(tiny_model, early, frames[:4], times[:4])

    late = Recorder()
    engine.submit_question("a", late.job)
    _run(engine, late.done.is_set)
    _check(tiny_model, late, frames, times)


def test_two_questions_on_one_session_decode_together(tiny_model) -> None:
    engine = _engine(tiny_model)
    plans = Plans(engine)
    frames, times = _clip(5, 5)
    _open(engine, "a")
    for image, t in zip(frames, times, strict=True):
        engine.submit_frame("a", image, t)
    recorders = [Recorder(q) for q in QUESTIONS]
    for recorder in recorders:
        engine.submit_question("a", recorder.job)
    _run(engine, lambda: all(r.done.is_set() for r in recorders))
    assert plans.most("questions") == 2 and plans.most("decodes") == 2
    for recorder in recorders:
        _check(tiny_model, recorder, frames, times)
    # Both answers' own blocks are back; only the video's remain.
    assert engine.pool_usage()[0] == engine.stats("a").kv_blocks


# ------------------------------------------------------------------- admission, limits
def test_sessions_beyond_the_pool_are_refused_and_running_ones_kept(tiny_model) -> None:
    config = SchedulerConfig(session_min_tokens=64, answer_reserve_tokens=64)
    engine = Engine(ModelRunner(tiny_model), EngineConfig(scheduler=config), num_blocks=13)
    engine.open_session("a")  # 4 blocks promised, 5 kept for answers
    engine.open_session("b")
    with pytest.raises(Refused) as refused:
        engine.open_session("c")
    assert refused.value.reason == "kv_pool_exhausted"
    assert engine.refused_sessions == 1
    engine.close_session("a")
    engine.open_session("c")


def test_a_full_context_is_reported_and_stops_the_frames(tiny_model) -> None:
    config = SchedulerConfig(answer_reserve_tokens=32700)  # room for ~60 video tokens
    engine = Engine(ModelRunner(tiny_model), EngineConfig(scheduler=config), num_blocks=4096)
    frames = _open(engine, "a")
    clip, times = _clip(1, 12)
    for image, t in zip(clip, times, strict=True):
        engine.submit_frame("a", image, t)
    _run(engine, lambda: frames.errors)
    assert isinstance(frames.errors[0], SessionError)
    assert "context is full" in str(frames.errors[0])
    assert 0 < engine.stats("a").frames < 12
    assert not engine.submit_frame("a", clip[0], 100.0)
    recorder = Recorder(params=SamplingParams(max_new_tokens=2))
    engine.submit_question("a", recorder.job)  # still answered, over the video there is
    _run(engine, recorder.done.is_set)
    assert recorder.error is None


def test_max_new_tokens_is_cut_to_the_answer_reserve(tiny_model) -> None:
    config = SchedulerConfig(answer_reserve_tokens=40)
    engine = Engine(ModelRunner(tiny_model), EngineConfig(scheduler=config), num_blocks=4096)
    _open(engine, "a")
    clip, times = _clip(2, 2)
    for image, t in zip(clip, times, strict=True):
        engine.submit_frame("a", image, t)
    recorder = Recorder(params=SamplingParams(max_new_tokens=500, temperature=1.0, seed=0))
    engine.submit_question("a", recorder.job)
    _run(engine, recorder.done.is_set)
    assert recorder.error is None
    assert 0 < len(recorder.answer.token_ids) <= 40


# --------------------------------------------------------------------- on its thread
@pytest.fixture
def threaded(tiny_model):
    engine = _engine(tiny_model, max_pending_frames=3)
    engine.start()
    yield engine
    engine.stop()


def _gated(engine: Engine, clip: np.ndarray) -> Frames:
    """A session whose first frame is prefilled and whose report then holds the engine thread
    until `gate` is set: frames and questions pile up meanwhile."""
    frames = Frames()
    frames.gate = threading.Event()
    _open(engine, "a", frames)
    engine.submit_frame("a", clip[0], 0.0)
    wait_for(lambda: frames.appended == [1])
    return frames


def test_pending_frames_are_bounded_and_oldest_dropped(threaded) -> None:
    clip, _ = _clip(0, 12)
    frames = _gated(threaded, clip)
    for i in range(1, 12):
        threaded.submit_frame("a", clip[i], float(i))
    assert threaded.pending("a") == 3
    assert threaded.dropped("a") == 8
    frames.gate.set()
    wait_for(lambda: sum(frames.appended) == 4)
    assert threaded.session_record("a").times == [0.0, 9.0, 10.0, 11.0]  # the newest three


def test_question_sees_frames_sampled_before_it(threaded) -> None:
    clip, _ = _clip(0, 3)
    frames = _gated(threaded, clip)
    threaded.submit_frame("a", clip[1], 1.0)
    threaded.submit_frame("a", clip[2], 2.0)
    recorder = Recorder()
    threaded.submit_question("a", recorder.job)
    assert threaded.questions("a") == 1
    frames.gate.set()
    assert recorder.done.wait(30)
    assert recorder.answer is not None and recorder.answer.stream_position == 2.0
    wait_for(lambda: threaded.questions("a") == 0)


def test_long_answer_does_not_stall_other_sessions(threaded) -> None:
    _open(threaded, "a")
    clip, _ = _clip(0, 2)
    threaded.submit_frame("a", clip[0], 0.0)
    wait_for(lambda: threaded.pending("a") == 0)
    long = Recorder(params=SamplingParams(max_new_tokens=200, temperature=1.0, seed=1))
    answering_when_b_appended: list[bool] = []
    b = Frames()
    b.callbacks = lambda: FrameCallbacks(  # type: ignore[method-assign]
        lambda _: answering_when_b_appended.append(not long.done.is_set()), b.errors.append
    )
    _open(threaded, "b", b)
    threaded.submit_question("a", long.job)
    wait_for(lambda: len(long.tokens) >= 2)
    threaded.submit_frame("b", clip[1], 0.0)
    wait_for(lambda: answering_when_b_appended)
    assert answering_when_b_appended == [True]
    assert long.done.wait(60) and len(long.answer.token_ids) > 2


def test_cancel_mid_answer_frees_its_blocks(threaded) -> None:
    _open(threaded, "a")
    clip, _ = _clip(0, 1)
    threaded.submit_frame("a", clip[0], 0.0)
    wait_for(lambda: threaded.pending("a") == 0)
    video_blocks = threaded.stats("a").kv_blocks
    recorder = Recorder(params=SamplingParams(max_new_tokens=500, temperature=1.0, seed=3))
    threaded.submit_question("a", recorder.job)
    wait_for(lambda: len(recorder.tokens) >= 2)
    assert threaded.pool_usage()[0] > video_blocks
    recorder.job.cancel()
    wait_for(lambda: threaded.pool_usage()[0] == video_blocks)
    assert not recorder.done.is_set()  # a cancelled question reports nothing
    after = Recorder()
    threaded.submit_question("a", after.job)
    assert after.done.wait(30) and after.error is None


def test_errors_reach_the_callbacks_and_the_engine_survives(threaded) -> None:
    _open(threaded, "a")
    recorder = Recorder()
    threaded.submit_question("a", recorder.job)  # no frames yet
    assert recorder.done.wait(30)
    assert isinstance(recorder.error, SessionError) and "no frames" in str(recorder.error)
    empty = Recorder("   ")
    threaded.submit_question("a", empty.job)
    assert empty.done.wait(30) and "empty" in str(empty.error)


def test_close_during_answer_cancels_it(threaded) -> None:
    _open(threaded, "a")
    clip, _ = _clip(0, 2)
    threaded.submit_frame("a", clip[0], 0.0)
    recorder = Recorder(params=SamplingParams(max_new_tokens=500, temperature=1.0, seed=5))
    threaded.submit_question("a", recorder.job)
    wait_for(lambda: len(recorder.tokens) >= 1)
    threaded.close_session("a")
    wait_for(lambda: threaded.pool_usage()[0] == 0)
    assert not threaded.submit_frame("a", clip[1], 1.0)
    with pytest.raises(KeyError):
        threaded.submit_question("a", Recorder().job)


# ------------------------------------------------------------------------ sliding window
def _windowed(tiny_model, window_s: float) -> tuple[Engine, Plans]:
    engine = _engine(tiny_model)
    plans = Plans(engine)
    _open(engine, "a", window_s=window_s)
    return engine, plans


def test_after_slides_the_video_is_one_forward_over_the_window(tiny_model) -> None:
    """Frames 1 s apart, a 4 s window sliding 2 s at a time: after every slide the cache equals
    transformers' forward over the window's frames alone (first frame with all its tokens,
    original time labels, positions from 0); the vision tower never sees a frame twice."""
    engine, plans = _windowed(tiny_model, 4.0)
    frames, times = _clip(4, 13)
    encoded = []
    encode = engine.runner.encode_frames

    def counting(patches, rows):
        encoded.append(sum(t for t, _, _ in rows))
        return encode(patches, rows)

    engine.runner.encode_frames = counting  # type: ignore[method-assign]
    checked = 0
    for i, (image, t) in enumerate(zip(frames, times, strict=True)):
        engine.submit_frame("a", image, t)
        _run(engine, lambda: engine.pending("a") == 0 and not _sliding(engine))
        record = engine.session_record("a")
        if i in (6, 12):  # after two and after four slides
            held = [times.index(t) for t in record.times]
            assert held == list(range(held[0], i + 1))
            recorder = Recorder()
            engine.submit_question("a", recorder.job)
            _run(engine, recorder.done.is_set)
            _check(tiny_model, recorder, frames[held[0] : i + 1], times[held[0] : i + 1])
            assert (
                record.prompt_ids
                == OfflineReference(
                    tiny_model, frames[held[0] : i + 1], times[held[0] : i + 1], threshold=THRESHOLD
                ).input_ids(QUESTIONS[0])[: len(record.prompt_ids)]
            )
            checked += 1
    stats = engine.stats("a")
    assert checked == 2 and stats.slides >= 4
    assert stats.frames_left + stats.frames == 13
    assert stats.window_start == engine.session_record("a").times[0] > times[0]
    assert sum(encoded) == 13  # rebuilds reuse the cached features
    assert any(any(f.rebuild for p in plan.frames for f in p.frames) for plan in plans.plans)


def _sliding(engine: Engine) -> bool:
    return engine.scheduler.session("a").sliding


def test_a_question_during_a_slide_answers_over_the_old_window(tiny_model) -> None:
    """A question asked while the window is being rebuilt forks off the old video at once,
    and its answer is the forward over the old window's frames."""
    engine, _ = _windowed(tiny_model, 4.0)
    frames, times = _clip(6, 12)
    for i in range(len(times)):
        engine.submit_frame("a", frames[i], times[i])
        _run(engine, lambda: engine.pending("a") == 0)
        if _sliding(engine):
            break
    else:
        raise AssertionError("the window never slid")
    old = [times.index(t) for t in engine.session_record("a").times]
    assert old[-1] == i
    recorder = Recorder()
    engine.submit_question("a", recorder.job)  # forks before the rebuilt window replaces the video
    _run(engine, lambda: recorder.done.is_set() and not _sliding(engine))
    _check(tiny_model, recorder, frames[old[0] : i + 1], times[old[0] : i + 1])
    assert engine.session_record("a").times[0] > times[old[0]]


def test_anchor_features_do_not_keep_their_step_alive(tiny_model) -> None:
    """The window keeps anchors' features for hours: each must own its memory, not be a view
    into the vision output of all frames encoded in its step."""
    engine, _ = _windowed(tiny_model, 4.0)
    frames, times = _clip(2, 6)
    for image, t in zip(frames, times, strict=True):
        engine.submit_frame("a", image, t)  # all in one step: one packed vision pass
    _run(engine, lambda: engine.pending("a") == 0)
    held = engine.session_record("a").window.held
    anchors = [h.full for h in held if h.full is not None]
    assert len(anchors) >= 2
    for full in anchors:
        assert full.untyped_storage().nbytes() == full.numel() * full.element_size()


def test_frames_that_keep_no_token_slide_exactly(tiny_model) -> None:
    """With min_tokens=0 a repeated frame keeps no token: live, its label joins the next frame's
    text; in a rebuilt window too (only the window's first frame shows all of its tokens)."""
    engine = _engine(tiny_model)
    _open(engine, "a", window_s=4.0, min_tokens=0)
    frames, times = _clip(8, 13)
    for i in (2, 3, 6, 7, 10, 12):
        frames[i] = frames[i - 1]  # unchanged: every token pruned
    checked = 0
    for i, (image, t) in enumerate(zip(frames, times, strict=True)):
        engine.submit_frame("a", image, t)
        _run(engine, lambda: engine.pending("a") == 0 and not _sliding(engine))
        record = engine.session_record("a")
        if 0 not in record.kept[:-1]:
            continue  # check the windows holding a frame with no token before their last
        first = times.index(record.times[0])
        recorder = Recorder()
        engine.submit_question("a", recorder.job)
        _run(engine, recorder.done.is_set)
        _check(tiny_model, recorder, frames[first : i + 1], times[first : i + 1], min_tokens=0)
        checked += 1
    assert checked >= 2 and engine.stats("a").slides >= 3
