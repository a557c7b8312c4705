"""The checkpoint's repetition penalty, applied as the original VideoLLaMA3 generate applies it.

The oracle is transformers' own: the whole prompt's embeddings as the native model builds them,
decoded by `generate(inputs_embeds=...)` (the call the original makes) with the checkpoint's
generation_config, and `RepetitionPenaltyLogitsProcessor` for the arithmetic.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_exactness import HEIGHT, QUESTION, THRESHOLD, WIDTH, _frames, _stream
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import (
    VideoLlama3ImageProcessorPil,
)

from livelens.model.engine import penalize
from livelens.model.loading import LoadedModel, load_model
from livelens.model.reference import OfflineReference, compression_mask
from livelens.model.sampling import SamplingParams, SessionError

PENALTY = 1.3
PENALTY_TOKENS = 12


def _whole_prompt_inputs(loaded: LoadedModel, frames: np.ndarray, times: list[float]) -> dict:
    """The model inputs of the whole prompt, from transformers' parts (as tests/test_exactness)."""
    processor = VideoLlama3ImageProcessorPil(do_resize=False, merge_size=2)
    pixel_values = torch.cat(
        [torch.from_numpy(processor(f, return_tensors="np")["pixel_values"]) for f in frames]
    )
    grid = torch.tensor([[len(frames), HEIGHT // 14, WIDTH // 14]])
    merge = torch.tensor([2])
    mask = compression_mask(
        pixel_values_videos=pixel_values,
        video_grid_thw=grid,
        video_merge_sizes=merge,
        threshold=THRESHOLD,
        min_tokens=1,
    )
    kept = mask.view(len(frames), -1).sum(dim=1).tolist()
    tok = loaded.tokenizer
    video_token = tok.convert_ids_to_tokens(loaded.video_token_id)
    video = ",".join(
        f"Time {ts:.1f}s:" + video_token * n for ts, n in zip(times, kept, strict=True)
    )
    text = tok.apply_chat_template(
        [{"role": "user", "content": video + "\n" + QUESTION}],
        tokenize=False,
        add_generation_prompt=True,
        add_system_prompt=True,
    )
    return dict(
        input_ids=tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"],
        pixel_values_videos=pixel_values,
        video_grid_thw=grid,
        video_merge_sizes=merge,
        video_compression_mask=mask,
    )


@pytest.fixture(scope="module")
def penalized_model(
    tiny_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory
) -> LoadedModel:
    """The tiny checkpoint with a repetition penalty in its generation_config.json, as the
    released checkpoints have (Qwen2.5-Instruct's 1.1 / 1.05)."""
    path = tmp_path_factory.mktemp("penalized") / "tiny"
    shutil.copytree(tiny_model.path, path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(
        json.dumps(config | {"repetition_penalty": PENALTY})
    )
    return load_model(str(path), device="cpu")


def _language_model_embeds(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The embeddings transformers' own forward feeds its LLM (visual features scattered in)."""
    captured: dict[str, torch.Tensor] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured["embeds"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        hook.remove()
    return captured["embeds"]


def test_checkpoint_repetition_penalty_matches_the_original_generate(
    penalized_model: LoadedModel,
) -> None:
    model, tok = penalized_model.model, penalized_model.tokenizer
    frames, times = _frames()
    inputs = _whole_prompt_inputs(penalized_model, frames, times)
    prompt_len = inputs["input_ids"].shape[1]
    embeds = _language_model_embeds(model, inputs)
    # The original VideoLLaMA3 `generate` hands transformers `inputs_embeds` and no `input_ids`,
    # so the checkpoint's penalty counts the generated tokens only (transformers says so).
    with torch.inference_mode(), pytest.warns(UserWarning, match="only to newly generated tokens"):
        original = model.generate(
            inputs_embeds=embeds, max_new_tokens=PENALTY_TOKENS, do_sample=False
        )[0].tolist()
    with torch.inference_mode():
        prompt_counted = model.generate(
            **inputs, max_new_tokens=PENALTY_TOKENS, do_sample=False, attention_mask=None
        )[0, prompt_len:].tolist()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert eos not in original

    session = _stream(penalized_model, frames, times, 3)
    assert session.default_repetition_penalty == PENALTY
    greedy = SamplingParams(max_new_tokens=PENALTY_TOKENS)
    answer = session.answer(QUESTION, greedy).token_ids
    unpenalized = session.answer(QUESTION, SamplingParams(PENALTY_TOKENS, repetition_penalty=1.0))

    assert answer == original
    # The package's oracle (benchmarks/grounding.py) decodes as the original does.
    oracle = OfflineReference(penalized_model, frames, times, threshold=THRESHOLD)
    assert oracle.generate(QUESTION, PENALTY_TOKENS) == original
    assert unpenalized.token_ids != answer, "the penalty must decide this answer"
    assert len(set(unpenalized.token_ids)) < len(unpenalized.token_ids)  # it repeats a token
    assert prompt_counted != answer, "penalizing the prompt's ids too must give another answer"
    explicit = SamplingParams(PENALTY_TOKENS, repetition_penalty=PENALTY)
    assert session.answer(QUESTION, explicit).token_ids == answer


def test_penalty_is_transformers_repetition_penalty_processor() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 4
    logits[[3, 7, 5, 40]] = torch.tensor([2.5, -1.25, 0.0, 3.0])  # positive, negative, zero
    answer = [3, 7, 7, 5, 40, 3]  # repeats count once
    seen = torch.zeros(50, dtype=torch.bool)
    seen[answer] = True
    ours = penalize(logits, seen, 1.7)
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([answer]), logits[None].clone())[0]
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert ours[3] == 2.5 / 1.7 and ours[7] == -1.25 * 1.7 and ours[1] == logits[1]


@pytest.mark.parametrize("penalty", [0.0, -1.0, 10.5, float("nan"), float("inf")])
def test_repetition_penalty_out_of_range(penalty: float) -> None:
    with pytest.raises(SessionError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=penalty)
