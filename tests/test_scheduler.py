"""The engine's step scheduler, with no model and no tensors: exact plans, step by step.

Blocks hold 4 tokens; the pool hands out block ids in order, so every plan is predictable.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from livelens.model.kv import BlockCopy, BlockPool, BlockWrite, KVCacheManager, Placement
from livelens.model.sampling import SamplingParams
from livelens.model.scheduler import (
    FinishReason,
    Frame,
    FullReason,
    PoolView,
    Refusal,
    Refused,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    SessionFull,
    SessionState,
    StepOutput,
    StepPlan,
)

CONFIG = SchedulerConfig(
    max_tokens_per_step=64,
    max_frames_per_step=4,
    max_concurrent_decodes=4,
    max_model_len=64,
    answer_reserve_tokens=8,
    session_min_tokens=8,
)
STOP = 0


def _scheduler(blocks: int = 64, **changes: int) -> Scheduler:
    config = dataclasses.replace(CONFIG, **changes)
    return Scheduler(KVCacheManager(BlockPool(blocks, block_size=4)), config)


def _frames(plan: StepPlan) -> dict[str, list[int]]:
    return {f.session_id: [frame.index for frame in f.frames] for f in plan.frames}


def _step(s: Scheduler, **sampled: int) -> StepPlan:
    """Finish the step in flight (with these sampled tokens) and plan the next one."""
    if s.in_flight is not None:
        s.update(StepOutput(s.in_flight.step, sampled))
    return s.schedule()


def _ask(s: Scheduler, rid: str, session: str, prompt: int, new: int):
    return s.add_request(
        rid, session, list(range(100, 100 + prompt)), SamplingParams(max_new_tokens=new), {STOP}
    )


# ------------------------------------------------------------------------------- fairness
def test_frames_round_robin_one_per_session_per_pass_starting_one_later_each_step() -> None:
    s = _scheduler()
    for sid in "abc":
        s.add_session(sid)
        for t in range(3):
            s.add_frame(sid, float(t), tokens=1)
    first = _step(s)
    assert _frames(first) == {"a": [0, 1], "b": [0], "c": [0]}
    assert [f.placement for f in first.frames] == [
        Placement(0, 2, (BlockWrite(0, 0, 2),), None, (0,)),
        Placement(0, 1, (BlockWrite(1, 0, 1),), None, (1,)),
        Placement(0, 1, (BlockWrite(2, 0, 1),), None, (2,)),
    ]
    assert _frames(_step(s)) == {"b": [1, 2], "c": [1], "a": [2]}
    assert _frames(_step(s)) == {"c": [2]}
    assert _step(s).empty


def test_the_session_served_first_rotates_so_the_extra_frame_alternates() -> None:
    s = _scheduler(max_frames_per_step=3)
    for sid in "ab":
        s.add_session(sid)
        for t in range(4):
            s.add_frame(sid, float(t), tokens=1)
    plans = [_step(s) for _ in range(3)]
    assert [[(f.session_id, [x.index for x in f.frames]) for f in p.frames] for p in plans] == [
        [("a", [0, 1]), ("b", [0])],
        [("b", [1, 2]), ("a", [2])],
        [("a", [3]), ("b", [3])],
    ]


def test_token_budget_is_shared_and_a_sessions_frames_keep_their_order() -> None:
    s = _scheduler(max_tokens_per_step=10)
    s.add_session("a")
    s.add_session("b")
    for t in range(3):
        s.add_frame("a", float(t), tokens=6)
        s.add_frame("b", float(t), tokens=3)
    plans = [_step(s) for _ in range(4)]
    assert [_frames(p) for p in plans] == [
        {"a": [0], "b": [0]},  # 6 + 3; neither next frame fits the last token
        {"b": [1], "a": [1]},
        {"a": [2], "b": [2]},
        {},
    ]
    assert all(p.num_tokens <= 10 for p in plans)
    assert s.session("a").tokens == 18 and s.session("b").tokens == 9


def test_frame_budget_per_step() -> None:
    s = _scheduler(max_frames_per_step=2)
    s.add_session("a")
    for t in range(5):
        s.add_frame("a", float(t), tokens=1)
    assert [_frames(_step(s)) for _ in range(4)] == [
        {"a": [0, 1]},
        {"a": [2, 3]},
        {"a": [4]},
        {},
    ]


# -------------------------------------------------------------- questions fork off video
def test_question_sees_exactly_the_video_admitted_before_it_and_forks_with_copy_on_write():
    s = _scheduler()
    s.add_session("a")
    s.add_frame("a", 0.0, tokens=5)
    s.add_frame("a", 1.0, tokens=5)
    q = _ask(s, "q", "a", prompt=3, new=3)
    s.add_frame("a", 2.0, tokens=5)  # after the question: the answer must not see it

    first = _step(s)
    assert _frames(first) == {"a": [0, 1]}  # frame 2 waits for the question to fork
    assert first.frames[0].placement == Placement(
        0, 10, (BlockWrite(0, 0, 4), BlockWrite(1, 0, 4), BlockWrite(2, 0, 2)), None, (0, 1, 2)
    )
    assert q.status is RequestStatus.WAITING

    second = _step(s)
    (prefill,) = second.questions
    assert (prefill.request_id, prefill.token_ids) == ("q", (100, 101, 102))
    # It forks at the video's 10 tokens: blocks 0, 1 shared, the partial block 2 copied to 3.
    assert prefill.placement == Placement(
        start=10,
        tokens=3,
        writes=(BlockWrite(3, 2, 2), BlockWrite(4, 0, 1)),
        copy=BlockCopy(src=2, dst=3, count=2),
        allocated=(3, 4),
    )
    assert prefill.block_table == (0, 1, 3, 4)
    # Frame 2 goes in the same step, after the question, filling block 2 in place.
    assert _frames(second) == {"a": [2]}
    assert second.frames[0].placement == Placement(
        10, 5, (BlockWrite(2, 2, 2), BlockWrite(5, 0, 3)), None, (5,)
    )
    assert second.copies == (BlockCopy(2, 3, 2),)
    assert q.status is RequestStatus.RUNNING
    assert (q.frame_mark, q.stream_position) == (2, 1.0)

    third = _step(s, q=7)
    assert [(d.request_id, d.token_id, d.placement) for d in third.decodes] == [
        ("q", 7, Placement(13, 1, (BlockWrite(4, 1, 1),), None, ()))
    ]
    fourth = _step(s, q=8)
    assert fourth.decodes[0].placement == Placement(14, 1, (BlockWrite(4, 2, 1),), None, ())
    s.update(StepOutput(fourth.step, {"q": 9}))
    assert q.status is RequestStatus.FINISHED_LENGTH
    assert q.finish_reason is FinishReason.LENGTH
    assert q.output_ids == [7, 8, 9]
    # Its own blocks come back; the video's shared blocks stay.
    assert s.schedule().freed == (3, 4)
    assert s.session("a").blocks == 4


def test_questions_prefill_before_frames_take_the_budget() -> None:
    s = _scheduler(max_tokens_per_step=8)
    for sid in "ab":
        s.add_session(sid)
        s.add_frame(sid, 0.0, tokens=4)
    _ask(s, "q", "a", prompt=6, new=2)
    s.add_frame("a", 1.0, tokens=4)
    s.add_frame("b", 1.0, tokens=4)
    assert _frames(_step(s)) == {"a": [0], "b": [0]}
    second = _step(s)
    assert [q.request_id for q in second.questions] == ["q"]
    assert _frames(second) == {}  # 6 of 8 tokens went to the question
    third = _step(s, q=5)
    assert [d.request_id for d in third.decodes] == ["q"]
    assert _frames(third) == {"a": [1]}  # 1 + 4 tokens; b's frame waits for the next step
    assert _frames(_step(s, q=6)) == {"b": [1]}


def test_two_questions_on_one_session_decode_concurrently_while_frames_arrive() -> None:
    s = _scheduler()
    s.add_session("a")
    s.add_frame("a", 0.0, tokens=5)
    q1 = _ask(s, "q1", "a", prompt=2, new=4)
    q2 = _ask(s, "q2", "a", prompt=2, new=4)
    _step(s)
    both = _step(s)
    assert [(q.request_id, q.placement) for q in both.questions] == [
        ("q1", Placement(5, 2, (BlockWrite(2, 1, 2),), BlockCopy(1, 2, 1), (2,))),
        ("q2", Placement(5, 2, (BlockWrite(3, 1, 2),), BlockCopy(1, 3, 1), (3,))),
    ]
    s.add_frame("a", 1.0, tokens=3)
    third = _step(s, q1=10, q2=20)
    assert [(d.request_id, d.token_id, d.placement.writes) for d in third.decodes] == [
        ("q1", 10, (BlockWrite(2, 3, 1),)),
        ("q2", 20, (BlockWrite(3, 3, 1),)),
    ]
    assert _frames(third) == {"a": [1]}  # the video grows while both answers decode
    assert third.frames[0].placement.writes == (BlockWrite(1, 1, 3),)
    fourth = _step(s, q1=11, q2=STOP)
    assert q2.status is RequestStatus.FINISHED_STOPPED and q2.output_ids == [20]
    assert [d.request_id for d in fourth.decodes] == ["q1"]
    # q2's block, freed by its stop token, is the first one reused.
    assert fourth.decodes[0].placement == Placement(8, 1, (BlockWrite(3, 0, 1),), None, (3,))
    assert fourth.freed == (3,)
    assert q1.stream_position == q2.stream_position == 0.0
    assert q1.status is RequestStatus.RUNNING


def test_concurrent_decodes_are_capped_and_the_next_question_starts_when_one_ends() -> None:
    s = _scheduler(max_concurrent_decodes=1)
    s.add_session("a")
    s.add_frame("a", 0.0, tokens=4)
    _ask(s, "q1", "a", prompt=2, new=2)
    q2 = _ask(s, "q2", "a", prompt=2, new=2)
    _step(s)
    assert [q.request_id for q in _step(s).questions] == ["q1"]
    third = _step(s, q1=5)
    assert [d.request_id for d in third.decodes] == ["q1"] and not third.questions
    fourth = _step(s, q1=6)  # q1 has its 2 tokens: it ends, q2 starts in the same plan
    assert [q.request_id for q in fourth.questions] == ["q2"]
    assert q2.stream_position == 0.0


def test_the_oldest_question_waiting_for_memory_holds_back_younger_ones() -> None:
    s = _scheduler(blocks=6)
    s.add_session("a")
    s.add_frame("a", 0.0, tokens=6)  # blocks 0, 1
    _ask(s, "q0", "a", prompt=2, new=7)  # worst case 3 own blocks
    _ask(s, "q1", "a", prompt=2, new=7)
    q2 = _ask(s, "q2", "a", prompt=1, new=1)  # 1 block: would fit, but q1 is older
    _step(s)
    second = _step(s)
    assert [q.request_id for q in second.questions] == ["q0"]
    assert s.kv.available == 1 and q2.status is RequestStatus.WAITING
    third = _step(s, q0=STOP)
    assert third.freed == (2,)
    assert [(q.request_id, q.placement.allocated) for q in third.questions] == [
        ("q1", (2,)),  # q0's freed block first
        ("q2", (3,)),
    ]


# ------------------------------------------------------------------- admission, limits
def test_a_session_is_refused_when_the_pool_cannot_hold_its_minimum() -> None:
    # 7 blocks: each session is promised 2, and 3 stay free for an answer.
    s = _scheduler(blocks=7)
    s.add_session("a")
    s.add_session("b")
    assert s.pool() == PoolView(blocks_total=7, blocks_used=0, blocks_available=3)
    with pytest.raises(Refused) as refused:
        s.add_session("c")
    assert refused.value.reason is Refusal.KV_POOL_EXHAUSTED
    assert s.session("a").state is SessionState.ACTIVE  # nobody was evicted
    s.close_session("a")
    s.add_session("c")


def test_pool_exhaustion_marks_the_session_full_and_its_questions_still_run() -> None:
    s = _scheduler(blocks=7)
    s.add_session("a")
    for t in range(6):
        s.add_frame("a", float(t), tokens=4)
    assert _frames(_step(s)) == {"a": [0, 1, 2, 3]}
    second = _step(s)
    assert _frames(second) == {}
    assert second.full == (SessionFull("a", FullReason.KV_POOL, dropped_frames=2),)
    view = s.session("a")
    assert (view.state, view.full_reason, view.frames_dropped) == (
        SessionState.FULL,
        FullReason.KV_POOL,
        2,
    )
    assert (view.tokens, view.blocks, view.stream_position) == (16, 4, 3.0)
    with pytest.raises(Refused) as refused:
        s.add_frame("a", 9.0, tokens=4)
    assert refused.value.reason is Refusal.SESSION_FULL
    q = _ask(s, "q", "a", prompt=2, new=2)  # the headroom kept for answers serves it
    (prefill,) = _step(s).questions
    assert prefill.placement == Placement(16, 2, (BlockWrite(4, 0, 2),), None, (4,))
    assert (q.frame_mark, q.stream_position) == (4, 3.0)


def test_a_question_waiting_for_dropped_frames_sees_the_video_there_is() -> None:
    s = _scheduler(blocks=7, max_frames_per_step=8)
    s.add_session("a")
    for t in range(5):
        s.add_frame("a", float(t), tokens=4)
    q = _ask(s, "q", "a", prompt=2, new=2)
    first = _step(s)
    assert _frames(first) == {"a": [0, 1, 2, 3]}
    assert first.full == (SessionFull("a", FullReason.KV_POOL, dropped_frames=1),)
    assert [p.request_id for p in _step(s).questions] == ["q"]
    assert (q.frame_mark, q.stream_position) == (4, 3.0)


def test_context_full_marks_the_session_with_its_reason() -> None:
    s = _scheduler()  # video limit: 64 - 8 = 56 tokens
    s.add_session("a")
    for t in range(3):
        s.add_frame("a", float(t), tokens=20)
    plan = _step(s)
    assert _frames(plan) == {"a": [0, 1]}
    assert plan.full == (SessionFull("a", FullReason.CONTEXT, dropped_frames=1),)
    assert s.session("a").state is SessionState.FULL


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda s: s.add_session("a"), Refusal.SESSION_EXISTS),
        (lambda s: s.add_frame("zz", 0.0, 1), Refusal.UNKNOWN_SESSION),
        (lambda s: s.add_frame("a", 5.0, 65), Refusal.FRAME_TOO_LARGE),
        (lambda s: s.add_frame("a", 0.0, 1), Refusal.FRAME_OUT_OF_ORDER),
        (lambda s: s.add_frame("b", float("nan"), 1), Refusal.FRAME_OUT_OF_ORDER),
        (lambda s: s.add_frame("b", -1.0, 1), Refusal.FRAME_OUT_OF_ORDER),
        (lambda s: _ask(s, "q", "b", 2, 2), Refusal.NO_FRAMES),
        (lambda s: _ask(s, "q", "a", 7, 3), Refusal.QUESTION_TOO_LONG),
        (lambda s: _ask(s, "q", "a", 0, 3), Refusal.QUESTION_TOO_LONG),
        (lambda s: _ask(s, "old", "a", 2, 2), Refusal.REQUEST_EXISTS),
    ],
)
def test_refusals_carry_a_machine_readable_reason(call, reason: Refusal) -> None:
    s = _scheduler()
    s.add_session("a")
    s.add_session("b")
    s.add_frame("a", 0.0, tokens=1)
    _ask(s, "old", "a", 2, 2)
    with pytest.raises(Refused) as refused:
        call(s)
    assert refused.value.reason is reason


# ----------------------------------------------------------------- cancel, close, order
def test_cancel_frees_a_running_answer_and_drops_its_in_flight_output() -> None:
    s = _scheduler()
    s.add_session("a")
    s.add_frame("a", 0.0, tokens=5)
    q = _ask(s, "q", "a", prompt=2, new=6)
    _step(s)
    assert _step(s).questions[0].placement.allocated == (2,)
    assert s.cancel("q") is q
    assert q.status is RequestStatus.FINISHED_CANCELLED
    assert q.finish_reason is FinishReason.CANCELLED
    after = _step(s, q=5)  # the step that was running reports a token: ignored
    assert after.decodes == () and after.freed == (2,)
    assert q.output_ids == []


def test_cancel_a_waiting_question_and_close_a_session_with_answers_running() -> None:
    s = _scheduler()
    s.add_session("a")
    s.add_frame("a", 0.0, tokens=5)
    waiting = _ask(s, "w", "a", prompt=2, new=2)
    s.cancel("w")
    assert waiting.status is RequestStatus.FINISHED_CANCELLED and s.num_waiting == 0
    q = _ask(s, "q", "a", prompt=2, new=6)
    _step(s)
    _step(s)
    s.close_session("a")
    assert q.status is RequestStatus.FINISHED_CANCELLED
    assert sorted(_step(s, q=1).freed) == [0, 1, 2]
    assert s.kv.pool.num_free == 64


def test_a_plan_must_be_updated_before_the_next() -> None:
    s = _scheduler()
    s.schedule()
    with pytest.raises(RuntimeError, match="not been updated"):
        s.schedule()
    with pytest.raises(ValueError, match="does not match"):
        s.update(StepOutput(step=5))


def test_a_missing_token_or_a_runner_failure_is_reported() -> None:
    s = _scheduler()
    s.add_session("a")
    s.add_frame("a", 0.0, tokens=5)
    q = _ask(s, "q", "a", prompt=2, new=6)
    _step(s)
    plan = _step(s)
    with pytest.raises(ValueError, match="no token for q"):
        s.update(StepOutput(plan.step, {}))
    assert s.update(StepOutput(plan.step, failed={"q": "device error"})) == [q]
    assert (q.status, q.error) == (RequestStatus.FINISHED_ERROR, "device error")


def test_request_status_order_means_finished() -> None:
    assert [status.finished for status in RequestStatus] == [False, False, True, True, True, True]
    assert RequestStatus.RUNNING < RequestStatus.FINISHED_STOPPED


# --------------------------------------------------- a tensor-free execution of the plans
class SlotMemory:
    """Executes plans on labels instead of tensors: copies first, then every write.

    A label names the token a slot should hold (a session's frame token, a question's prompt
    token, an answer token), so reading a sequence back through its block table shows exactly
    which tokens its attention would see.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.slots: dict[int, tuple] = {}

    def slot(self, table: tuple[int, ...], position: int) -> int:
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def execute(self, plan: StepPlan, labels: dict[str, list[tuple]]) -> None:
        for copy in plan.copies:
            for i in range(copy.count):
                src = copy.src * self.block_size + i
                self.slots[copy.dst * self.block_size + i] = self.slots[src]
        for item in (*plan.decodes, *plan.questions, *plan.frames):
            key = getattr(item, "request_id", None) or item.session_id
            new = labels[key]
            written = [
                write.block * self.block_size + write.start + i
                for write in item.placement.writes
                for i in range(write.count)
            ]
            assert len(written) == len(new) == item.placement.tokens
            for slot, label in zip(written, new, strict=True):
                self.slots[slot] = label

    def read(self, table: tuple[int, ...], end: int) -> list[tuple]:
        return [self.slots.get(self.slot(table, p)) for p in range(end)]


def test_random_traffic_every_sequence_reads_exactly_its_own_tokens() -> None:
    """Sessions, frames, questions, answers, cancels and closes at random over a small pool:
    after every step each scheduled sequence reads back exactly its tokens (a question: the
    frames admitted before it, its prompt, its answer so far), budgets hold, and nothing leaks."""
    rng = random.Random(7)
    config = dataclasses.replace(
        CONFIG, max_tokens_per_step=24, max_concurrent_decodes=3, max_model_len=200
    )
    s = Scheduler(KVCacheManager(BlockPool(40, block_size=4)), config)
    memory = SlotMemory(4)
    videos: dict[str, list[tuple]] = {}  # session -> labels of its prefilled tokens
    frames_seen: dict[str, list[int]] = {}  # session -> indices of its prefilled frames
    admitted: dict[str, int] = {}
    asked: dict[str, tuple[str, int]] = {}  # request -> (session, frames admitted before it)
    expected: dict[str, list[tuple]] = {}  # request -> labels its table must hold
    clock = 0.0
    forks = full_sessions = finished = 0
    sampled: dict[str, int] = {}
    for step in range(300):
        live = list(videos)
        if len(live) < 3 and rng.random() < 0.3:
            sid = f"s{step}"
            try:
                s.add_session(sid)
                videos[sid], frames_seen[sid], admitted[sid] = [], [], 0
            except Refused as refused:
                assert refused.reason is Refusal.KV_POOL_EXHAUSTED
        for sid in list(videos):
            for _ in range(rng.randrange(3)):  # bursts build a backlog under the token budget
                clock += 0.5
                if s.session(sid).state is SessionState.ACTIVE:
                    s.add_frame(sid, clock, tokens=rng.randrange(0, 9))
                    admitted[sid] += 1
                if rng.random() < 0.1 and admitted[sid] and len(asked) < 6:
                    rid = f"q{step}{sid}{clock}"
                    _ask(s, rid, sid, prompt=rng.randrange(1, 4), new=rng.randrange(1, 6))
                    asked[rid] = (sid, admitted[sid])
            full = s.session(sid).state is SessionState.FULL
            if rng.random() < (0.1 if full else 0.01):
                s.close_session(sid)
                del videos[sid]
                for rid in [r for r, (owner, _) in asked.items() if owner == sid]:
                    del asked[rid]
                    expected.pop(rid, None)
        if asked and rng.random() < 0.05:
            rid = rng.choice(list(asked))
            s.cancel(rid)
            del asked[rid]
            expected.pop(rid, None)
            sampled.pop(rid, None)

        plan = _step(s, **sampled)
        assert plan.num_tokens <= config.max_tokens_per_step
        assert plan.num_frames <= config.max_frames_per_step
        assert len(plan.decodes) + len(plan.questions) <= config.max_concurrent_decodes
        full_sessions += len(plan.full)
        labels: dict[str, list[tuple]] = {}
        for decode in plan.decodes:
            labels[decode.request_id] = [("answer", decode.request_id, decode.token_id)]
        for prefill in plan.questions:
            sid, before = asked[prefill.request_id]
            # Exactly the frames admitted before the question (fewer only if some were dropped).
            assert all(index < before for index in frames_seen[sid])
            assert len(frames_seen[sid]) == before or s.session(sid).frames_dropped
            expected[prefill.request_id] = list(videos[sid])
            labels[prefill.request_id] = [
                ("prompt", prefill.request_id, j) for j in range(len(prefill.token_ids))
            ]
            forks += 1
        for prefill in plan.frames:
            assert [f.index for f in prefill.frames] == sorted(f.index for f in prefill.frames)
            frames_seen[prefill.session_id] += [f.index for f in prefill.frames]
            labels[prefill.session_id] = [
                (prefill.session_id, f.index, j) for f in prefill.frames for j in range(f.tokens)
            ]
        memory.execute(plan, labels)
        for item in (*plan.decodes, *plan.questions, *plan.frames):
            key = getattr(item, "request_id", None) or item.session_id
            owner = expected if key in expected else videos
            owner[key] += labels[key]
            assert memory.read(item.block_table, len(owner[key])) == owner[key], key
        for sid in videos:
            assert frames_seen[sid] == list(range(len(frames_seen[sid])))  # never reordered
        sampled = {}
        for rid in [*(d.request_id for d in plan.decodes), *(q.request_id for q in plan.questions)]:
            sampled[rid] = STOP if rng.random() < 0.1 else rng.randrange(1, 50)
        for rid in list(asked):
            request = s.request(rid)
            if request is None or request.status.finished:
                del asked[rid]
                finished += 1
    for sid in list(videos):
        s.close_session(sid)
    s.update(StepOutput(s.in_flight.step, sampled))
    for rid in list(asked):
        s.cancel(rid)
    s.schedule()
    assert s.kv.pool.num_free == s.kv.pool.num_blocks  # every block came back
    # The traffic did exercise forks, answers, backlogs behind questions and full sessions.
    assert forks > 20 and finished > 10 and full_sessions > 0


def test_one_session_per_step_takes_turns_with_all_of_its_work() -> None:
    """The sequential baseline: a step holds one session's decodes, question and frames."""
    s = _scheduler(max_sessions_per_step=1)
    for sid in "ab":
        s.add_session(sid)
        s.add_frame(sid, 0.0, tokens=2)
        s.add_frame(sid, 1.0, tokens=2)
    assert _frames(_step(s)) == {"a": [0, 1]}
    assert _frames(_step(s)) == {"b": [0, 1]}
    _ask(s, "qa", "a", prompt=2, new=3)
    _ask(s, "qb", "b", prompt=2, new=3)
    plans = [_step(s, qa=5, qb=6) for _ in range(4)]
    owners = [
        {item.request_id for item in (*p.questions, *p.decodes)} | set(_frames(p)) for p in plans
    ]
    assert owners == [{"qa"}, {"qb"}, {"qa"}, {"qb"}]
    unlimited = _scheduler()
    for sid in "ab":
        unlimited.add_session(sid)
        unlimited.add_frame(sid, 0.0, tokens=2)
    assert _frames(_step(unlimited)) == {"a": [0], "b": [0]}


# --------------------------------------------------------------------------- sliding window
def test_a_slide_rebuilds_the_window_in_new_blocks_then_frees_the_old_video() -> None:
    s = _scheduler(max_frames_per_step=1)
    s.add_session("a")
    for i in range(3):
        s.add_frame("a", float(i), tokens=4)
    for _ in range(3):
        _step(s)  # blocks 0, 1, 2 hold frames 0-2
    assert s.session("a").tokens == 12
    # Frames 1 and 2 stay; frame 1, now first, is 6 tokens (all of its visual tokens).
    s.slide("a", [(1, 1.0, 6), (2, 2.0, 4)])
    assert s.session("a").sliding
    s.add_frame("a", 3.0, tokens=4)
    q = _ask(s, "q", "a", prompt=2, new=2)
    assert q.frame_mark == 3  # a question during the slide sees the video there is
    first = _step(s)
    assert [(q.request_id, q.placement.start) for q in first.questions] == [("q", 12)]
    assert first.frames[0].frames == (Frame(1, 1.0, 6, rebuild=True),)
    assert first.frames[0].placement == Placement(
        0, 6, (BlockWrite(4, 0, 4), BlockWrite(5, 0, 2)), None, (4, 5)
    )
    assert first.frames[0].block_table == (4, 5)  # q took block 3
    assert s.session("a").tokens == 12 and first.rebuilt == ()
    second = _step(s, q=9)
    # The window's last frame, the swap, then the waiting live frame in the same table.
    assert second.rebuilt == ("a",)
    assert [(f.index, f.rebuild) for f in second.frames[0].frames] == [(2, True)]
    third = _step(s, q=STOP)
    assert [(f.index, f.rebuild) for f in third.frames[0].frames] == [(3, False)]
    assert third.frames[0].placement.start == 10
    # The old video's blocks outlive the swap while q holds them, then go with q's own.
    assert sorted(third.freed) == [0, 1, 2, 3]
    view = s.session("a")
    assert view.tokens == 14 and not view.sliding and view.frames_prefilled == 4


def test_a_slide_needs_room_and_one_at_a_time() -> None:
    s = _scheduler(blocks=12)  # 2 for the session's minimum, 3 kept for an answer
    s.add_session("a")
    for i in range(4):
        s.add_frame("a", float(i), tokens=4)
    _step(s)
    with pytest.raises(Refused) as refused:
        s.slide("a", [(i, float(i), 6) for i in range(4)])  # 6 blocks: 12 - 4 used - 3 kept < 6
    assert refused.value.reason is Refusal.KV_POOL_EXHAUSTED
    s.slide("a", [(3, 3.0, 4)])
    with pytest.raises(Refused) as again:
        s.slide("a", [(3, 3.0, 4)])
    assert again.value.reason is Refusal.SLIDE_IN_PROGRESS
    assert _step(s).rebuilt == ("a",)
    s.close_session("a")
    assert s.pool().blocks_used == 0
