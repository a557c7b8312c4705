"""The streaming session equals ONE offline transformers forward over the same frames.

The reference side (livelens.model.reference) uses only transformers: the PIL image processor
for normalized patches, the video processor's `_get_compression_mask` for DiffFP, the tokenizer's
own chat template over the whole prompt string, and `VideoLlama3ForConditionalGeneration.forward`
/ `.generate`; it shares no code with the session.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livelens.model.reference import OfflineReference
from livelens.model.runner import ModelRunner
from livelens.model.sampling import SamplingParams
from livelens.model.session import VideoSession

HEIGHT, WIDTH = 56, 84  # 2 x 3 merged tokens per frame
THRESHOLD = 6.0
QUESTION = "when did the white van park?"
NEW_TOKENS = 8


def _frames() -> tuple[np.ndarray, list[float]]:
    """Static noisy background, a square that moves, one frame that repeats (min_tokens rule)."""
    rng = np.random.default_rng(7)
    background = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    frames = []
    for i, (y, x) in enumerate([(0, 0), (0, 28), (28, 28), (28, 28), (28, 56), (0, 56), (4, 4)]):
        frame = background.copy()
        frame[y : y + 20, x : x + 20] = (255, 255 - 30 * i, 0)
        frames.append(frame)
    times = [0.0, 1.0, 2.0, 3.0, 4.5, 5.0, 6.25]
    return np.stack(frames), times


def _offline(loaded, frames: np.ndarray, times: list[float]):
    """Whole-prompt forward and greedy generate, built only from transformers' own parts."""
    reference = OfflineReference(loaded, frames, times, threshold=THRESHOLD, min_tokens=1)
    return {
        "logits": reference.logits(QUESTION),
        "answer": reference.generate(QUESTION, NEW_TOKENS),
        "kept": reference.kept,
        "input_ids": reference.input_ids(QUESTION),
    }


@pytest.fixture(scope="module")
def reference(tiny_model):
    frames, times = _frames()
    return frames, times, _offline(tiny_model, frames, times)


def _stream(tiny_model, frames, times, chunk: int) -> VideoSession:
    session = VideoSession(ModelRunner(tiny_model), height=HEIGHT, width=WIDTH, threshold=THRESHOLD)
    for start in range(0, len(times), chunk):
        session.append(frames[start : start + chunk], times[start : start + chunk])
    return session


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_streaming_equals_offline_forward(tiny_model, reference, chunk):
    frames, times, ref = reference
    assert 0 < sum(ref["kept"]) < len(times) * 6, "the clip must exercise pruning"
    assert 1 in ref["kept"], "a repeated frame must fall back to min_tokens"

    session = _stream(tiny_model, frames, times, chunk)

    assert session.kept_per_frame == ref["kept"]
    # Condition 3: the separators were tokenized exactly as in the whole prompt.
    assert session.prompt_ids == ref["input_ids"][: len(session.prompt_ids)]
    assert session.kv_tokens == len(session.prompt_ids)
    # fp32 on CPU: only the summation order of attention differs between the two paths.
    torch.testing.assert_close(session.question_logits(QUESTION), ref["logits"], atol=1e-4, rtol=0)
    answer = session.answer(QUESTION, SamplingParams(max_new_tokens=NEW_TOKENS))
    assert answer.token_ids == ref["answer"]
    assert len(answer.token_ids) > 0


def test_questions_do_not_pollute_the_stream(tiny_model, reference):
    frames, times, _ = reference
    asked = _stream(tiny_model, frames[:4], times[:4], 2)
    video_len = asked.kv_tokens
    first = asked.answer("what happened?", SamplingParams(max_new_tokens=5))
    assert asked.kv_tokens == video_len
    assert asked.answer("what happened?", SamplingParams(max_new_tokens=5)).token_ids == (
        first.token_ids
    )
    asked.append(frames[4:], times[4:])

    fresh = _stream(tiny_model, frames, times, 7)
    torch.testing.assert_close(
        asked.question_logits(QUESTION), fresh.question_logits(QUESTION), atol=1e-4, rtol=0
    )


def test_answer_stream_closed_early_restores_cache(tiny_model, reference):
    frames, times, _ = reference
    session = _stream(tiny_model, frames, times, 7)
    video_len = session.kv_tokens
    video_blocks = session.engine.pool_usage()[0]
    stream = session.ask(QUESTION, SamplingParams(max_new_tokens=20))
    next(stream)
    assert session.engine.pool_usage()[0] > video_blocks  # the answer holds blocks of its own
    stream.close()
    assert session.kv_tokens == video_len
    assert session.engine.pool_usage()[0] == video_blocks


def test_streamed_pieces_join_to_the_answer_text(tiny_model, reference):
    frames, times, _ = reference
    session = _stream(tiny_model, frames, times, 7)
    # Sampling at a high temperature emits split UTF-8 byte tokens, the case that must be held back.
    params = SamplingParams(max_new_tokens=200, temperature=2.0, seed=1)
    pieces = list(session.ask(QUESTION, params))
    answer = session.last_answer
    assert "".join(pieces) == answer.text
    assert answer.text == tiny_model.tokenizer.decode(answer.token_ids, skip_special_tokens=True)
    assert len(pieces) > 10


def test_sampling_is_seeded(tiny_model, reference):
    frames, times, _ = reference
    session = _stream(tiny_model, frames, times, 7)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, top_k=50, seed=3)
    assert session.answer(QUESTION, params).token_ids == session.answer(QUESTION, params).token_ids
