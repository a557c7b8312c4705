"""The tiny model's training: same tokens as the live session, exact packing, a working script."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from livelens.model.loading import load_model
from livelens.model.prompt import PromptFormat
from livelens.model.qa import Kind, QuestionMaker
from livelens.model.runner import ModelRunner
from livelens.model.scenes import generate_scene
from livelens.model.session import VideoSession
from livelens.model.training import (
    Stage,
    TrainConfig,
    balanced_questions,
    build_model,
    clip_loss,
    make_clip,
    make_footage,
    make_pool,
    pack,
    train,
)

SMALL = TrainConfig(
    seed=3,
    batch=1,
    stages=(
        Stage("frames", 1, 0.0, 0.0, (1.0,), (Kind.SCENE, Kind.NOW), 2, clips=2, balanced=True),
        Stage("clips", 1, 3.0, 5.0, (2.0,), tuple(Kind), questions=3),
    ),
    workers=1,
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
        session.pending_text + prompt.question_text(question.question), add_special_tokens=False
    )["input_ids"]
    a_ids = tokenizer(question.answer, add_special_tokens=False)["input_ids"] + [eos_id]
    block = packed.ids[len(video) : len(video) + len(q_ids) + len(a_ids)].tolist()
    assert block == q_ids + a_ids
    assert packed.positions[len(video)] == len(video)


def test_packed_logits_are_the_live_session_logits(built) -> None:
    """Every question block predicts its first answer token exactly as the session would."""
    tokenizer, model, prompt = built
    video_id, eos_id = _ids(tokenizer, model)
    clip = make_clip(23, SMALL.stages[1], SMALL)
    packed = pack(clip, tokenizer, prompt, video_id, eos_id)
    gh, gw = clip.grid.patches_h, clip.grid.patches_w
    with torch.no_grad():
        feats = model.model.get_video_features(
            pixel_values_videos=packed.patches,
            video_grid_thw=torch.tensor([[len(clip.times), gh, gw]]),
            video_merge_sizes=torch.tensor([2]),
            return_dict=True,
        ).pooler_output[0][packed.kept.reshape(-1)]
        embeds = model.get_input_embeddings()(packed.ids)
        embeds = embeds.masked_scatter((packed.ids == video_id)[:, None], feats)
        hidden = model.model.language_model(
            inputs_embeds=embeds[None],
            attention_mask=packed.mask,
            position_ids=packed.positions[None],
            use_cache=False,
        ).last_hidden_state[0]
    targets = packed.targets.tolist()
    firsts = [i for i, t in enumerate(targets) if t != -100 and (i == 0 or targets[i - 1] == -100)]
    assert len(firsts) == len(clip.questions) >= 2

    from livelens.model.loading import LoadedModel

    loaded = LoadedModel(model, tokenizer, "t", None, torch.device("cpu"), torch.float32, video_id)
    session = VideoSession(
        ModelRunner(loaded),
        height=clip.grid.height,
        width=clip.grid.width,
        threshold=clip.threshold,
    )
    session.append(clip.frames, clip.times)
    for position, question in zip(firsts, clip.questions, strict=True):
        expected = session.question_logits(question.question)
        torch.testing.assert_close(model.lm_head(hidden[position]), expected, atol=1e-4, rtol=0)


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
    # The blocks: each sees the whole clip and itself, never another question.
    pos = packed.positions.tolist()
    restarts = [i for i in range(1, len(pos)) if pos[i] != pos[i - 1] + 1]
    video = pos[restarts[0]]  # every block's positions start where the clip ends
    starts = [video, *restarts]
    ends = [*starts[1:], len(packed.ids)]
    mask = packed.mask[0, 0]
    for a, b in zip(starts, ends, strict=True):
        assert mask[a:b, :video].all()
        assert torch.equal(mask[a:b, a:b], torch.ones(b - a, b - a, dtype=torch.bool).tril())
        assert not mask[a:b, video:a].any() and not mask[a:b, b:].any()


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

    def losses(run: dict) -> list:
        return [{k: v for k, v in p.items() if k != "minutes"} for p in run["curve"]]

    assert losses(again) == losses(result)
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


def test_pool_footage_is_deterministic_and_asked_fresh_questions() -> None:
    stage = replace(SMALL.stages[1], clips=2)
    first, again = make_pool(stage, SMALL, 40), make_pool(stage, SMALL, 40)
    assert len(first) == 2
    for a, b in zip(first, again, strict=True):
        assert a.times == b.times and a.threshold == b.threshold
        assert (a.frames == b.frames).all() and (a.labels == b.labels).all()
    footage = first[0]
    assert footage.frames.shape[0] == len(footage.times) == footage.present.shape[0]
    asked = [footage.clip(random.Random(k), stage).questions for k in range(6)]
    assert len({tuple(q.question for q in qs) for qs in asked}) > 1
    # The footage keeps the scene's ground truth only; answers match the full scene's.
    scene = footage.scene
    full = generate_scene(40, duration=scene.duration, size=(scene.width, scene.height))
    maker = QuestionMaker(full, footage.times, offset=footage.offset)
    for qa in footage.clip(random.Random(1), stage).questions:
        if qa.kind in (Kind.WHEN, Kind.NOW):
            assert getattr(maker, qa.kind.value)(qa.target).answer == qa.answer


def test_balanced_questions_answer_yes_half_the_time() -> None:
    stage = replace(SMALL.stages[0], min_seconds=8.0, max_seconds=8.0)
    footage = next(f for k in range(11, 40) if (f := make_footage(k, stage, SMALL)).present.any())
    maker = QuestionMaker(footage.scene, footage.times, offset=footage.offset)
    rng = random.Random(0)
    answers = [qa.answer for _ in range(40) for qa in balanced_questions(maker, rng, 4, (Kind.AT,))]
    assert 0.3 < answers.count("Yes.") / len(answers) < 0.7
