"""One stream's VideoLLaMA3 state: its KV cache on the model's device, grown frame by frame.

`append` prefills `Time {t:.1f}s:` plus each frame's DiffFP-kept visual tokens; `ask` prefills a
question after the video, decodes, and crops the cache back to the video-only prefix, so the
cache always equals one offline forward over the frames seen so far (see tests/test_exactness.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from livelens.model.grounding import Segment, parse_segments
from livelens.model.kv import reserved_bytes
from livelens.model.prompt import PromptFormat
from livelens.model.pruner import DiffFramePruner
from livelens.model.runner import ModelRunner
from livelens.model.sampling import (
    MAX_QUESTION_CHARS,
    SamplingParams,
    SessionError,
)

logger = logging.getLogger(__name__)

# Tokens kept free after the video for the question and the answer.
ANSWER_RESERVE_TOKENS = 1024


@dataclass(frozen=True)
class AppendResult:
    frames: int
    kept_tokens: int
    total_tokens: int
    seconds: float


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    token_ids: list[int]
    segments: list[Segment]
    stream_position: float
    """Media time (s) of the last frame the answer saw."""
    prefill_seconds: float
    """Question prefill until the first token was chosen (time to first token)."""
    total_seconds: float


@dataclass(frozen=True)
class SessionStats:
    """A snapshot, derived from the session's frame records and cache."""

    frames: int
    kept_tokens: int
    total_tokens: int
    kv_tokens: int
    last_time: float | None

    @property
    def kept_ratio(self) -> float:
        return self.kept_tokens / self.total_tokens if self.total_tokens else 1.0


@dataclass
class _Prompt:
    """Token bookkeeping: ids committed to the cache, and text not yet tokenized."""

    ids: list[int] = field(default_factory=list)
    pending: str = ""


class _IncrementalDetokenizer:
    """Text deltas of a growing token list, decoding only a short window per token.

    Re-decoding the whole answer per token is O(n^2). Decoding from `prefix` (the last emitted
    boundary) keeps byte-level merges and spacing right; a trailing U+FFFD means a UTF-8
    character is still incomplete, so it waits for the next token.
    """

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.prefix = 0
        self.read = 0

    def push(self, ids: list[int]) -> str:
        decode = self.tokenizer.decode  # type: ignore[attr-defined]
        before = decode(ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(ids[self.prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(ids)
        return after[len(before) :]


class VideoSession:
    """A live stream's frames resident in the LLM KV cache, ready for questions."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        height: int,
        width: int,
        threshold: float = 0.1,
        min_tokens: int = 1,
        prompt: PromptFormat | None = None,
    ) -> None:
        unit = runner.patch_size * runner.merge_size
        if height <= 0 or width <= 0 or height % unit or width % unit:
            raise SessionError(f"frame grid {height}x{width} must be positive multiples of {unit}")
        self.runner = runner
        self.tokenizer = runner.loaded.tokenizer
        self.height, self.width = height, width
        self.gh, self.gw = height // runner.patch_size, width // runner.patch_size
        self.tokens_per_frame = (self.gh // runner.merge_size) * (self.gw // runner.merge_size)
        self.prompt = prompt or PromptFormat.from_tokenizer(
            self.tokenizer, runner.loaded.video_token_id
        )
        self.pruner = DiffFramePruner(
            threshold=threshold, min_tokens=min_tokens, device=runner.device
        )
        self.cache = runner.new_cache()
        self.times: list[float] = []
        self.kept_per_frame: list[int] = []
        self._prompt = _Prompt(pending=self.prompt.prefix)
        self.last_answer: Answer | None = None
        text_config = runner.model.config.text_config
        self.max_tokens = int(text_config.max_position_embeddings)
        self._eos_ids = self._stop_ids()
        # The checkpoint's generation_config.json (Qwen2.5-Instruct's 1.1 / 1.05 in the originals).
        penalty = runner.model.generation_config.repetition_penalty
        self.default_repetition_penalty = float(penalty) if penalty is not None else 1.0

    # ------------------------------------------------------------------ video
    def append(self, frames: torch.Tensor | np.ndarray, times: Sequence[float]) -> AppendResult:
        """Prefill a chunk of sampled frames (uint8 (T, H, W, 3) at the session grid)."""
        started = time.perf_counter()
        frames = torch.as_tensor(frames)
        self._check_frames(frames, times)
        pruned = self.pruner(frames)
        feats = self.runner.encode_frames(pruned.patches, len(times), self.gh, self.gw)
        feats = feats.view(len(times), self.tokens_per_frame, -1)
        keep = pruned.keep.to(feats.device)
        counts = keep.sum(dim=1).tolist()

        pieces: list[torch.Tensor] = []
        for i, (t, n) in enumerate(zip(times, counts, strict=True)):
            self._prompt.pending += self.prompt.frame_label(len(self.times) + i, t)
            if n == 0:
                continue  # the label text joins the next text segment, as in the full prompt
            ids = self._tokenize(self._prompt.pending)
            self._prompt.pending = ""
            self._prompt.ids += ids + [self.runner.loaded.video_token_id] * n
            pieces += [self.runner.embed_tokens(ids), feats[i][keep[i]]]
        new_tokens = sum(p.shape[0] for p in pieces)
        held = self.cache.get_seq_length()
        if held + new_tokens + ANSWER_RESERVE_TOKENS > self.max_tokens:
            raise SessionError(
                f"session context is full ({held} of {self.max_tokens} tokens); "
                "lower --fps or raise --prune-threshold"
            )
        if pieces:
            self.runner.prefill(torch.cat(pieces), self.cache)

        kept = int(sum(counts))
        self.times += [float(t) for t in times]
        self.kept_per_frame += counts
        return AppendResult(
            frames=len(times),
            kept_tokens=kept,
            total_tokens=len(times) * self.tokens_per_frame,
            seconds=time.perf_counter() - started,
        )

    def _check_frames(self, frames: torch.Tensor, times: Sequence[float]) -> None:
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise SessionError(f"frames must be uint8 (T, H, W, 3), got {tuple(frames.shape)}")
        if tuple(frames.shape[1:3]) != (self.height, self.width):
            raise SessionError(
                f"frame size {tuple(frames.shape[1:3])} differs from the session grid "
                f"{(self.height, self.width)}"
            )
        if len(times) != frames.shape[0] or not times:
            raise SessionError(f"{frames.shape[0]} frames but {len(times)} timestamps")
        last = self.times[-1] if self.times else None
        for t in times:
            if not math.isfinite(t) or t < 0 or (last is not None and t <= last):
                raise SessionError(f"frame times must increase from 0; got {t} after {last}")
            last = t

    # -------------------------------------------------------------- questions
    def question_logits(self, question: str) -> torch.Tensor:
        """Logits of the first answer token (the cache is restored afterwards)."""
        video_len = self.cache.get_seq_length()
        try:
            return self.runner.logits(self._prefill_question(question))
        finally:
            self._crop(video_len)

    def ask(self, question: str, params: SamplingParams | None = None) -> Iterator[str]:
        """Stream the answer's text as it decodes; `last_answer` holds the result afterwards.

        Whatever happens (exhaustion, an error, the consumer closing the generator), the
        cache is cropped back to the video-only prefix before control returns.
        """
        params = params or SamplingParams()
        started = time.perf_counter()
        video_len = self.cache.get_seq_length()
        generator = self._generator(params.seed)
        penalty = params.repetition_penalty
        penalty = self.default_repetition_penalty if penalty is None else penalty
        seen: torch.Tensor | None = None  # answer tokens so far, as a mask over the vocabulary
        ids: list[int] = []
        emitted = ""
        detok = _IncrementalDetokenizer(self.tokenizer)
        try:
            logits = self.runner.logits(self._prefill_question(question))
            prefill_seconds = time.perf_counter() - started
            for step in range(params.max_new_tokens):
                if seen is not None:
                    logits = self._penalize(logits, seen, penalty)
                token = self._choose(logits, params, generator)
                if token in self._eos_ids:
                    break
                ids.append(token)
                if penalty != 1.0:
                    if seen is None:
                        seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
                    seen[token] = True
                delta = detok.push(ids)
                if delta:
                    emitted += delta
                    yield delta
                if step + 1 < params.max_new_tokens:
                    hidden = self.runner.prefill(self.runner.embed_tokens([token]), self.cache)
                    logits = self.runner.logits(hidden)
        finally:
            self._crop(video_len)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text.startswith(emitted) and len(text) > len(emitted):
            yield text[len(emitted) :]  # characters held back at the end
        end = self.times[-1]
        self.last_answer = Answer(
            question=question,
            text=text,
            token_ids=ids,
            segments=parse_segments(text, stream_start=0.0, stream_end=end),
            stream_position=end,
            prefill_seconds=prefill_seconds,
            total_seconds=time.perf_counter() - started,
        )

    def answer(self, question: str, params: SamplingParams | None = None) -> Answer:
        """Blocking form of `ask`."""
        for _ in self.ask(question, params):
            pass
        assert self.last_answer is not None
        return self.last_answer

    def _prefill_question(self, question: str) -> torch.Tensor:
        question = self.validate_question(question)
        if not self.times:
            raise SessionError("the session has no frames yet")
        ids = self._tokenize(self._prompt.pending + self.prompt.question_text(question))
        return self.runner.prefill(self.runner.embed_tokens(ids), self.cache)

    @staticmethod
    def validate_question(question: str) -> str:
        if not isinstance(question, str) or not question.strip():
            raise SessionError("the question is empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise SessionError(
                f"the question has {len(question)} characters; the limit is {MAX_QUESTION_CHARS}"
            )
        return question

    # ---------------------------------------------------------------- helpers
    @property
    def stats(self) -> SessionStats:
        return SessionStats(
            frames=len(self.times),
            kept_tokens=sum(self.kept_per_frame),
            total_tokens=len(self.times) * self.tokens_per_frame,
            kv_tokens=self.cache.get_seq_length(),
            last_time=self.times[-1] if self.times else None,
        )

    @property
    def prompt_ids(self) -> list[int]:
        """Token ids committed to the cache so far (the video-only prefix)."""
        return list(self._prompt.ids)

    def kv_bytes(self) -> int:
        """Device memory held by this session's KV cache (including reserved growth)."""
        return reserved_bytes(self.cache)

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _crop(self, length: int) -> None:
        extra = self.cache.get_seq_length() - length
        if extra > 0:
            self.cache.crop(-extra)

    def _stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        eos = self.runner.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
        for token in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return {i for i in ids if i is not None}

    def _generator(self, seed: int | None) -> torch.Generator:
        gen = torch.Generator(device=self.runner.device)
        gen.manual_seed(seed if seed is not None else torch.seed())
        return gen

    @staticmethod
    def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
        """transformers' RepetitionPenaltyLogitsProcessor: the logits of tokens already in the
        answer are divided by `penalty` when positive, multiplied when negative.

        Only the answer's tokens count, not the prompt's: the original VideoLLaMA3 `generate`
        hands transformers `inputs_embeds` without `input_ids`, so the processor sees only the
        generated ids. Video placeholders, frame labels and the question are never penalized.
        """
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        return torch.where(seen, penalized, logits)

    @staticmethod
    def _choose(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
        if params.temperature == 0:
            return int(torch.argmax(logits))
        scores = logits / params.temperature
        if params.top_k:
            kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if params.top_p < 1:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            # Drop tokens once the mass before them already exceeds top_p (keeps at least one).
            drop = probs.cumsum(-1) - probs > params.top_p
            scores = scores.scatter(0, order[drop], -math.inf)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen))
