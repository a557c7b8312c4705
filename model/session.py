"""One stream's video in the LLM KV cache, driven synchronously: the offline face of the engine.

`VideoSession` is what `livelens ask`, the grounding benchmark, training's evaluation and the
exactness tests use: a private `Engine` (model/engine.py) with one session, stepped on the
caller's thread. `append` prefills `Time {t:.1f}s:` plus each frame's DiffFP-kept visual tokens
into paged KV blocks; `ask` forks a question off the video, decodes, and frees the question's
blocks, so the video always equals one offline forward over the frames seen so far (see
tests/test_exactness.py). The live service runs the same engine on its own thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from livelens.model.engine import (
    Answer,
    AppendResult,
    Engine,
    EngineConfig,
    FrameCallbacks,
    QuestionJob,
    SessionStats,
    validate_question,
)
from livelens.model.kv import blocks_for
from livelens.model.runner import ModelRunner
from livelens.model.sampling import SamplingParams, SessionError
from livelens.model.scheduler import SchedulerConfig

__all__ = ["Answer", "AppendResult", "SessionStats", "VideoSession"]

_KEY = "video"


class VideoSession:
    """A stream's frames resident in the LLM KV cache, ready for questions."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        height: int,
        width: int,
        threshold: float = 0.1,
        min_tokens: int = 1,
        max_concurrent_questions: int = 4,
    ) -> None:
        max_len = int(runner.text_config.max_position_embeddings)
        scheduler = SchedulerConfig()
        block = EngineConfig().block_size
        # The whole context of one session, plus room for a few answers forked at once.
        answer = blocks_for(scheduler.answer_reserve_tokens, block) + 1
        blocks = blocks_for(max_len, block) + max_concurrent_questions * answer
        self.engine = Engine(
            runner,
            EngineConfig(max_pending_frames=1 << 30, scheduler=scheduler),
            num_blocks=blocks,
        )
        self.runner = runner
        self.tokenizer = runner.loaded.tokenizer
        self.prompt = self.engine.prompt
        self.height, self.width = height, width
        self.default_repetition_penalty = self.engine.default_repetition_penalty
        self.last_answer: Answer | None = None
        self._full: Exception | None = None
        self._done = False
        """The question being driven finished (answered or failed)."""
        self._error: Exception | None = None
        self.engine.open_session(_KEY)
        self.engine.configure(
            _KEY,
            height=height,
            width=width,
            threshold=threshold,
            min_tokens=min_tokens,
            callbacks=FrameCallbacks(lambda _: None, self._frames_closed),
        )
        self.tokens_per_frame = self._record.tokens_per_frame

    # ------------------------------------------------------------------ video
    def append(self, frames: torch.Tensor | np.ndarray, times: Sequence[float]) -> AppendResult:
        """Prefill a chunk of sampled frames (uint8 (T, H, W, 3) at the session grid)."""
        frames_np = np.asarray(torch.as_tensor(frames))
        self._check_frames(frames_np, times)
        if self._full is not None:
            raise SessionError(str(self._full))
        before = self.stats
        for image, t in zip(frames_np, times, strict=True):
            self.engine.submit_frame(_KEY, image, float(t))
        started = time.perf_counter()
        while self.engine.pending(_KEY):
            self.engine.step()
        if self._full is not None:
            raise SessionError(str(self._full))
        after = self.stats
        return AppendResult(
            frames=after.frames - before.frames,
            kept_tokens=after.kept_tokens - before.kept_tokens,
            total_tokens=after.total_tokens - before.total_tokens,
            seconds=time.perf_counter() - started,
        )

    def _frames_closed(self, exc: Exception) -> None:
        self._full = exc

    def _check_frames(self, frames: np.ndarray, times: Sequence[float]) -> None:
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise SessionError(f"frames must be uint8 (T, H, W, 3), got {tuple(frames.shape)}")
        if tuple(frames.shape[1:3]) != (self.height, self.width):
            raise SessionError(
                f"frame size {tuple(frames.shape[1:3])} differs from the session grid "
                f"{(self.height, self.width)}"
            )
        if len(times) != frames.shape[0] or not len(times):
            raise SessionError(f"{frames.shape[0]} frames but {len(times)} timestamps")
        record = self._record
        last = record.times[-1] if record.times else None
        for t in times:
            if not math.isfinite(t) or t < 0 or (last is not None and t <= last):
                raise SessionError(f"frame times must increase from 0; got {t} after {last}")
            last = t

    # -------------------------------------------------------------- questions
    def question_logits(self, question: str) -> torch.Tensor:
        """Logits of the first answer token (nothing of the question stays in the cache)."""
        seen: list[torch.Tensor] = []
        job = self._job(question, SamplingParams(max_new_tokens=1), on_logits=seen.append)
        self._drive(job)
        return seen[0]

    def ask(self, question: str, params: SamplingParams | None = None) -> Iterator[str]:
        """Stream the answer's text as it decodes; `last_answer` holds the result afterwards.

        Closing the generator early cancels the answer and frees its blocks.
        """
        deltas: list[str] = []
        job = self._job(question, params or SamplingParams(), on_token=deltas.append)
        finished = False
        try:
            for _ in self._steps(job):
                yield from deltas
                deltas.clear()
            yield from deltas
            finished = True
        finally:
            if not finished:
                job.cancel()
                self.engine.step()  # takes the cancel in: the question's blocks are freed

    def answer(self, question: str, params: SamplingParams | None = None) -> Answer:
        """Blocking form of `ask`."""
        for _ in self.ask(question, params):
            pass
        assert self.last_answer is not None
        return self.last_answer

    def _job(self, question: str, params: SamplingParams, **callbacks) -> QuestionJob:
        validate_question(question)
        if not self._record.times:
            raise SessionError("the session has no frames yet")
        self.last_answer = None
        self._done = False
        self._error = None

        def done(answer: Answer) -> None:
            self.last_answer = answer
            self._done = True

        def failed(exc: Exception) -> None:
            self._error = exc
            self._done = True

        return QuestionJob(
            question,
            params,
            on_start=lambda: None,
            on_token=callbacks.get("on_token", lambda _: None),
            on_done=done,
            on_error=failed,
            on_logits=callbacks.get("on_logits"),
        )

    def _steps(self, job: QuestionJob) -> Iterator[None]:
        self.engine.submit_question(_KEY, job)
        while not self._done:
            self.engine.step()
            yield
        if self._error is not None:
            raise self._error

    def _drive(self, job: QuestionJob) -> None:
        for _ in self._steps(job):
            pass

    validate_question = staticmethod(validate_question)

    # ---------------------------------------------------------------- views
    @property
    def _record(self):
        return self.engine.session_record(_KEY)

    @property
    def stats(self) -> SessionStats:
        stats = self.engine.stats(_KEY)
        assert stats is not None
        return stats

    @property
    def times(self) -> list[float]:
        return list(self._record.times)

    @property
    def kept_per_frame(self) -> list[int]:
        return list(self._record.kept)

    @property
    def prompt_ids(self) -> list[int]:
        """Token ids of the video in the cache (labels and visual placeholders)."""
        return list(self._record.prompt_ids)

    @property
    def pending_text(self) -> str:
        """Text after the video not yet in the cache (labels of fully pruned frames); a question
        is tokenized together with it."""
        return self._record.pending_text

    @property
    def kv_tokens(self) -> int:
        return self.stats.kv_tokens

    def kv_bytes(self) -> int:
        """KV memory held by this session's blocks."""
        return self.stats.kv_bytes
