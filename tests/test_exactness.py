"""The streaming session equals ONE offline transformers forward over the same frames.

The reference side uses only transformers: the PIL image processor for normalized patches,
the video processor's `_get_compression_mask` for DiffFP, the tokenizer's own chat template over
the whole prompt string, and `VideoLlama3ForConditionalGeneration.forward` / `.generate`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import compression_mask
from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import (
    VideoLlama3ImageProcessorPil,
)

from livelens.model.runner import ModelRunner
from livelens.model.session import SamplingParams, VideoSession

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
    processor = VideoLlama3ImageProcessorPil(do_resize=False, merge_size=2)
    pixel_values = torch.cat(
        [torch.from_numpy(processor(f, return_tensors="np")["pixel_values"]) for f in frames]
    )
    t, gh, gw = len(frames), HEIGHT // 14, WIDTH // 14
    grid = torch.tensor([[t, gh, gw]])
    merge = torch.tensor([2])
    mask = compression_mask(
        pixel_values_videos=pixel_values,
        video_grid_thw=grid,
        video_merge_sizes=merge,
        threshold=THRESHOLD,
        min_tokens=1,
    )
    kept = mask.view(t, -1).sum(dim=1).tolist()
    tok = loaded.tokenizer
    video_token = tok.convert_ids_to_tokens(loaded.video_token_id)
    video = ",".join(
        f"Time {ts:.1f}s:" + video_token * n for ts, n in zip(times, kept, strict=True)
    )
    text = tok.apply_chat_template(
        [{"role": "user", "content": video + "\n" + QUESTION}],
        tokenize=False,
        add_generation_prompt=True,
    )
    input_ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    inputs = dict(
        input_ids=input_ids,
        pixel_values_videos=pixel_values,
        video_grid_thw=grid,
        video_merge_sizes=merge,
        video_compression_mask=mask,
    )
    with torch.inference_mode():
        logits = loaded.model(**inputs).logits[0, -1]
        generated = loaded.model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, attention_mask=None
        )
    answer = generated[0, input_ids.shape[1] :].tolist()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    if eos in answer:
        answer = answer[: answer.index(eos)]
    return {"logits": logits, "answer": answer, "kept": kept, "input_ids": input_ids[0].tolist()}


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
    assert session.cache.get_seq_length() == len(session.prompt_ids)
    # fp32 on CPU: only the summation order of attention differs between the two paths.
    torch.testing.assert_close(session.question_logits(QUESTION), ref["logits"], atol=1e-4, rtol=0)
    answer = session.answer(QUESTION, SamplingParams(max_new_tokens=NEW_TOKENS))
    assert answer.token_ids == ref["answer"]
    assert len(answer.token_ids) > 0


def test_questions_do_not_pollute_the_stream(tiny_model, reference):
    frames, times, _ = reference
    asked = _stream(tiny_model, frames[:4], times[:4], 2)
    video_len = asked.cache.get_seq_length()
    first = asked.answer("what happened?", SamplingParams(max_new_tokens=5))
    assert asked.cache.get_seq_length() == video_len
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
    video_len = session.cache.get_seq_length()
    stream = session.ask(QUESTION, SamplingParams(max_new_tokens=20))
    next(stream)
    stream.close()
    assert session.cache.get_seq_length() == video_len


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
