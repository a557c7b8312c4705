"""The closure worker (model/worker.py): ordering, fairness, bounded buffers, flush-before-answer,
cancellation. It goes when the step engine (model/scheduler.py) drives the service."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from livelens.model.runner import ModelRunner
from livelens.model.sampling import SamplingParams, SessionError
from livelens.model.session import Answer, VideoSession
from livelens.model.worker import FrameCallbacks, QuestionJob, Scheduler

HEIGHT, WIDTH = 56, 56
GREEDY = SamplingParams(max_new_tokens=6)


def _frame(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


class Recorder:
    """Collects what the scheduler reports for one session (a real sink, used from two threads)."""

    def __init__(self) -> None:
        self.appended: list[int] = []
        self.errors: list[Exception] = []
        self.done = threading.Event()
        self.gate: threading.Event | None = None
        """When set, the first append blocks the worker until the gate opens."""

    def callbacks(self) -> FrameCallbacks:
        def on_appended(result) -> None:
            self.appended.append(result.frames)
            if self.gate is not None and len(self.appended) == 1:
                assert self.gate.wait(10)

        return FrameCallbacks(on_appended, self.errors.append)


class Question:
    def __init__(self, text: str = "what happened?", params: SamplingParams = GREEDY) -> None:
        self.tokens: list[str] = []
        self.answer: Answer | None = None
        self.error: Exception | None = None
        self.started_at: float | None = None
        self.done = threading.Event()
        self.job = QuestionJob(
            text, params, self._start, self.tokens.append, self._done, self._error
        )

    def _start(self) -> None:
        self.started_at = time.perf_counter()

    def _done(self, answer: Answer) -> None:
        self.answer = answer
        self.done.set()

    def _error(self, exc: Exception) -> None:
        self.error = exc
        self.done.set()


@pytest.fixture
def runner(tiny_model) -> ModelRunner:
    return ModelRunner(tiny_model)


@pytest.fixture
def scheduler():
    s = Scheduler(max_pending_frames=3)
    s.start()
    yield s
    s.stop()


def _session(runner: ModelRunner) -> VideoSession:
    return VideoSession(runner, height=HEIGHT, width=WIDTH, threshold=0.0)


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_answer_equals_direct_session(runner, scheduler) -> None:
    """Frames and a question through the scheduler give the same answer as calling the session."""
    direct = _session(runner)
    direct.append(np.stack([_frame(i) for i in range(4)]), [0.0, 1.0, 2.0, 3.0])
    expected = direct.answer("what happened?", GREEDY)

    session, rec = _session(runner), Recorder()
    scheduler.open("a", session, rec.callbacks())
    for i in range(4):
        assert scheduler.submit_frame("a", _frame(i), float(i))
        _wait(lambda i=i: sum(rec.appended) == i + 1)  # one at a time: nothing dropped
    q = Question()
    scheduler.submit_question("a", q.job)
    assert q.done.wait(30)
    assert q.error is None
    assert q.answer.token_ids == expected.token_ids
    assert "".join(q.tokens) == expected.text
    assert session.prompt_ids == direct.prompt_ids


def test_pending_frames_are_bounded_and_oldest_dropped(runner, scheduler) -> None:
    session, rec = _session(runner), Recorder()
    rec.gate = threading.Event()
    scheduler.open("a", session, rec.callbacks())
    scheduler.submit_frame("a", _frame(0), 0.0)
    _wait(lambda: rec.appended == [1])  # the worker now blocks inside the first step
    for i in range(1, 11):
        scheduler.submit_frame("a", _frame(i), float(i))
    assert scheduler.pending("a") == 3
    assert scheduler.dropped("a") == 7
    rec.gate.set()
    _wait(lambda: sum(rec.appended) == 4)
    assert session.times == [0.0, 8.0, 9.0, 10.0]  # the newest three, in one chunk
    assert rec.appended == [1, 3]


def test_question_sees_frames_sampled_before_it(runner, scheduler) -> None:
    """Pending frames are appended before the answer starts: the answer is at the live edge."""
    session, rec = _session(runner), Recorder()
    rec.gate = threading.Event()
    scheduler.open("a", session, rec.callbacks())
    scheduler.submit_frame("a", _frame(0), 0.0)
    _wait(lambda: rec.appended == [1])
    scheduler.submit_frame("a", _frame(1), 1.0)
    scheduler.submit_frame("a", _frame(2), 2.0)
    q = Question()
    scheduler.submit_question("a", q.job)
    assert scheduler.questions("a") == 1
    rec.gate.set()
    assert q.done.wait(30)
    assert q.answer is not None and q.answer.stream_position == 2.0
    _wait(lambda: scheduler.questions("a") == 0)


def test_long_answer_does_not_stall_other_sessions(runner, scheduler) -> None:
    a, rec_a = _session(runner), Recorder()
    scheduler.open("a", a, rec_a.callbacks())
    scheduler.submit_frame("a", _frame(0), 0.0)
    _wait(lambda: rec_a.appended == [1])
    long = Question(params=SamplingParams(max_new_tokens=200, temperature=1.0, seed=1))
    answering_when_b_appended: list[bool] = []

    def b_appended(result) -> None:
        answering_when_b_appended.append(not long.done.is_set())

    scheduler.open("b", _session(runner), FrameCallbacks(b_appended, Recorder().errors.append))
    scheduler.submit_question("a", long.job)
    _wait(lambda: len(long.tokens) >= 2)
    scheduler.submit_frame("b", _frame(1), 0.0)
    _wait(lambda: answering_when_b_appended)
    # A scheduler that ran each answer to its end first would append b's frame only after it.
    assert answering_when_b_appended == [True]
    assert long.done.wait(60) and len(long.answer.token_ids) > 2


def test_questions_on_one_session_are_answered_in_order(runner, scheduler) -> None:
    session, rec = _session(runner), Recorder()
    scheduler.open("a", session, rec.callbacks())
    scheduler.submit_frame("a", _frame(0), 0.0)
    _wait(lambda: rec.appended == [1])
    order: list[int] = []
    questions = [Question(f"question {i}") for i in range(3)]
    for i, q in enumerate(questions):
        done = q.job.on_done
        q.job.on_done = lambda ans, i=i, done=done: (order.append(i), done(ans))
        assert scheduler.submit_question("a", q.job) == i
    for q in questions:
        assert q.done.wait(30)
    assert order == [0, 1, 2]


def test_cancel_mid_answer_restores_the_cache(runner, scheduler) -> None:
    session, rec = _session(runner), Recorder()
    scheduler.open("a", session, rec.callbacks())
    scheduler.submit_frame("a", _frame(0), 0.0)
    _wait(lambda: rec.appended == [1])
    video_tokens = session.cache.get_seq_length()
    q = Question(params=SamplingParams(max_new_tokens=500, temperature=1.0, seed=3))
    scheduler.submit_question("a", q.job)
    _wait(lambda: len(q.tokens) >= 2)
    q.job.cancel()
    _wait(lambda: session.cache.get_seq_length() == video_tokens)
    assert not q.done.is_set()  # a cancelled question reports nothing
    after = Question()
    scheduler.submit_question("a", after.job)
    assert after.done.wait(30) and after.error is None


def test_errors_reach_the_callbacks_and_the_worker_survives(runner, scheduler) -> None:
    session, rec = _session(runner), Recorder()
    scheduler.open("a", session, rec.callbacks())
    q = Question()
    scheduler.submit_question("a", q.job)  # no frames yet
    assert q.done.wait(30)
    assert isinstance(q.error, SessionError) and "no frames" in str(q.error)

    session.max_tokens = session.cache.get_seq_length() + 1  # the next append overflows
    scheduler.submit_frame("a", _frame(0), 0.0)
    _wait(lambda: len(rec.errors) == 1)
    assert isinstance(rec.errors[0], SessionError) and "context is full" in str(rec.errors[0])
    assert not scheduler.submit_frame("a", _frame(1), 1.0)  # takes no more frames


def test_close_during_answer_cancels_it(runner, scheduler) -> None:
    session, rec = _session(runner), Recorder()
    scheduler.open("a", session, rec.callbacks())
    scheduler.submit_frame("a", _frame(0), 0.0)
    _wait(lambda: rec.appended == [1])
    q = Question(params=SamplingParams(max_new_tokens=500, temperature=1.0, seed=5))
    scheduler.submit_question("a", q.job)
    _wait(lambda: len(q.tokens) >= 1)
    scheduler.close("a")
    _wait(lambda: scheduler.pending("a") == 0 and "a" not in scheduler._slots)
    assert not scheduler.submit_frame("a", _frame(1), 1.0)
    with pytest.raises(KeyError):
        scheduler.submit_question("a", Question().job)
