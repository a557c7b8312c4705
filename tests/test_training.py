"""The tiny model's training: same tokens as the live session, exact packing, a working script."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from livelens.model.loading import load_model
from livelens.model.prompt import PromptFormat
from livelens.model.qa import Kind
from livelens.model.runner import ModelRunner
from livelens.model.session import VideoSession
from livelens.model.training import (
    Stage,
    TrainConfig,
    build_model,
    clip_loss,
    make_clip,
    pack,
    train,
)

SMALL = TrainConfig(
    seed=3,
    batch=1,
    stages=(
        Stage("frames", 1, 0.0, 0.0, (1.0,), (Kind.SCENE,), questions=2),
        Stage("clips", 1, 3.0, 5.0, (2.0,), tuple(Kind), questions=3),
    ),
    vision_hidden=32,
    vision_layers=1,
    text_hidden=64,
    text_layers=1,
    text_heads=2,
)


@pytest.fixture(scope="module")
def built():
    tokenizer, model = build_model(SMALL)
    model.eval()
    prompt = PromptFormat.from_tokenizer(tokenizer, model.config.video_token_id)
    return tokenizer, model, prompt


def _ids(tokenizer, model):
    return int(model.config.video_token_id), int(tokenizer.convert_tokens_to_ids("<|im_end|>"))


@pytest.mark.parametrize("threshold", [0.1, 4.0])
def test_packed_clip_is_the_live_session_token_sequence(built, threshold: float) -> None:
    """The video part equals what VideoSession commits; each question block what it prefills."""
    tokenizer, model, prompt = built
    video_id, eos_id = _ids(tokenizer, model)
    clip = replace(make_clip(17, SMALL.stages[1], SMALL), threshold=threshold)
    packed = pack(clip, tokenizer, prompt, video_id, eos_id)

    from livelens.model.loading import LoadedModel

    loaded = LoadedModel(model, tokenizer, "t", None, torch.device("cpu"), torch.float32, video_id)
    session = VideoSession(
        ModelRunner(loaded), height=clip.grid.height, width=clip.grid.width, threshold=threshold
    )
    session.append(clip.frames, clip.times)
    video = session.prompt_ids
    assert packed.ids[: len(video)].tolist() == video
    assert packed.kept.sum(1).tolist() == session.kept_per_frame
    assert packed.positions[: len(video)].tolist() == list(range(len(video)))
    # The first question block: the question as the session tokenizes it, then answer + eos.
    question = clip.questions[0]
    q_ids = tokenizer(
        session._prompt.pending + prompt.question_text(question.question), add_special_tokens=False
    )["input_ids"]
    a_ids = tokenizer(question.answer, add_special_tokens=False)["input_ids"] + [eos_id]
    block = packed.ids[len(video) : len(video) + len(q_ids) + len(a_ids)].tolist()
    assert block == q_ids + a_ids
    assert packed.positions[len(video)] == len(video)


def test_packed_loss_equals_one_forward_per_question(built) -> None:
    """Question blocks see the clip and themselves only: packing changes no logit."""
    tokenizer, model, prompt = built
    video_id, eos_id = _ids(tokenizer, model)
    clip = make_clip(5, SMALL.stages[1], SMALL)
    assert len(clip.questions) >= 2
    packed = pack(clip, tokenizer, prompt, video_id, eos_id)
    with torch.no_grad():
        together = clip_loss(model, packed, clip.grid, len(clip.times), video_id)
        losses, counts = [], []
        for q in clip.questions:
            one = pack(replace(clip, questions=[q]), tokenizer, prompt, video_id, eos_id)
            n = int((one.targets != -100).sum())
            losses.append(clip_loss(model, one, clip.grid, len(clip.times), video_id) * n)
            counts.append(n)
    torch.testing.assert_close(together, sum(losses) / sum(counts), atol=1e-5, rtol=1e-5)
    # And the mask matters: letting blocks see each other changes the loss.
    leaky = replace(packed, mask=torch.ones_like(packed.mask).tril())
    with torch.no_grad():
        assert not torch.allclose(
            clip_loss(model, leaky, clip.grid, len(clip.times), video_id), together
        )


def test_training_runs_and_saves_a_loadable_checkpoint(tmp_path) -> None:
    out = tmp_path / "model"
    result = train(out, SMALL, log_every=1, eval_scenes=0)
    assert [p["step"] for p in result["curve"]] == [1, 2]
    assert all(p["loss"] > 0 for p in result["curve"])
    meta = json.loads((out / "livelens.json").read_text())
    assert meta["tokens_per_frame"] == SMALL.tokens_per_frame
    loaded = load_model(str(out), device="cpu")
    assert loaded.tokens_per_frame == SMALL.tokens_per_frame
    # Same seed, same weights.
    again = train(tmp_path / "again", SMALL, log_every=1, eval_scenes=0)
    assert again["curve"] == result["curve"]
    a = load_model(str(tmp_path / "again"), device="cpu").model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, a[name]), name


def test_loss_targets_are_the_answers(built) -> None:
    tokenizer, model, prompt = built
    video_id, eos_id = _ids(tokenizer, model)
    clip = make_clip(9, SMALL.stages[1], SMALL)
    packed = pack(clip, tokenizer, prompt, video_id, eos_id)
    targets = packed.targets[packed.targets != -100].tolist()
    expected = []
    for q in clip.questions:
        expected += tokenizer(q.answer, add_special_tokens=False)["input_ids"] + [eos_id]
    assert targets == expected
