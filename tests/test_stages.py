"""FrameStage (stream/stages.py): a session's sampled frames are converted off the caller's
thread, in order, with a bounded backlog."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from service_harness import wait_for

from livelens.stream.stages import FrameStage


class Work:
    def __init__(self) -> None:
        self.done: list[int] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, frame) -> None:
        self.gate.wait(10)
        if frame == "bad":
            raise ValueError("a frame that cannot be converted")
        self.threads.add(threading.current_thread().name)
        self.done.append(frame)


def test_frames_run_in_order_on_the_pool_not_the_caller() -> None:
    work = Work()
    with ThreadPoolExecutor(4, thread_name_prefix="pool") as pool:
        stage = FrameStage(work, pool, max_waiting=1000)
        for i in range(200):
            stage.put(i)
        wait_for(lambda: len(work.done) == 200)
    assert work.done == list(range(200))
    assert threading.current_thread().name not in work.threads
    assert all(name.startswith("pool") for name in work.threads)


def test_a_stage_that_falls_behind_drops_the_oldest_and_counts_them() -> None:
    work = Work()
    work.gate.clear()  # the worker is stuck on the first frame
    with ThreadPoolExecutor(1) as pool:
        stage = FrameStage(work, pool, max_waiting=3)
        stage.put(0)
        wait_for(lambda: stage.waiting == 0)  # 0 is being converted
        for i in range(1, 8):
            stage.put(i)
        assert stage.waiting == 3 and stage.dropped == 4
        work.gate.set()
        wait_for(lambda: len(work.done) == 4)
    assert work.done == [0, 5, 6, 7]


def test_a_failing_frame_does_not_stop_the_stage_and_close_drops_the_rest() -> None:
    work = Work()
    with ThreadPoolExecutor(1) as pool:
        stage = FrameStage(work, pool)
        stage.put("bad")
        stage.put(1)
        wait_for(lambda: work.done == [1])
        work.gate.clear()  # 2 is being converted, 3 and 4 wait
        stage.put(2)
        wait_for(lambda: stage.waiting == 0)
        stage.put(3)
        stage.put(4)
        stage.close()  # drops 3 and 4; 2 finishes
        stage.put(5)  # ignored
        work.gate.set()
        wait_for(lambda: work.done == [1, 2])
    assert work.done == [1, 2]
    with pytest.raises(ValueError, match="max_waiting"):
        FrameStage(work, None, max_waiting=0)


def test_without_an_executor_the_work_runs_inline() -> None:
    work = Work()
    FrameStage(work, None).put(7)
    assert work.done == [7] and threading.current_thread().name in work.threads
