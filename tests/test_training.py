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
    clip_features,
    clip_loss,
    make_clip,
    make_footage,
    make_pool,
    pack,
    packed_embeds,
    packed_forward,
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
    moment_head=1,
)


@pytest.fixture(scope="module")
def built():
    tokenizer, model = build_model(SMALL)
    model.eval()
    prompt = PromptFormat.from_tokenizer(tokenizer, model.config.video_token_id)
    return tokenizer, model, prompt


@pytest.fixture(scope="module")
def built_gqa():
    """SMALL with four heads on two key/value heads, as the trained model has them: head 2's keys
    are key/value head 1's."""
    tokenizer, model = build_model(replace(SMALL, text_heads=4, text_kv_heads=2, moment_head=2))
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


def _embeds(model, clip, packed, video_id: int) -> torch.Tensor:
    """The packed sequence's input embeddings: kept visual features in the video slots."""
    feats = clip_features(model, packed.patches, clip.grid, len(clip.times))
    return packed_embeds(model, packed, feats, video_id)


def test_packed_logits_are_the_live_session_logits(built) -> None:
    """Every question block predicts its first answer token exactly as the session would."""
    tokenizer, model, prompt = built
    video_id, eos_id = _ids(tokenizer, model)
    clip = make_clip(23, SMALL.stages[1], SMALL)
    packed = pack(clip, tokenizer, prompt, video_id, eos_id)
    with torch.no_grad():
        embeds = _embeds(model, clip, packed, video_id)
        hidden = packed_forward(model, packed, embeds).last_hidden_state[0]
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


def test_shifted_footage_keeps_frames_and_truth_under_later_labels() -> None:
    """A clip whose media time starts later (as an hour-old stream's does) shows the same frames
    and is asked true questions under its later labels."""
    stage = replace(SMALL.stages[1], min_seconds=8.0, max_seconds=8.0)
    plain = make_footage(40, stage, replace(SMALL, shift_share=0.0))
    shifted = make_footage(40, stage, replace(SMALL, shift_share=1.0, shift_max=3600.0))
    shift = shifted.times[0] - plain.times[0]
    assert shift > 10 and (shifted.frames == plain.frames).all()
    assert shifted.times == pytest.approx([t + shift for t in plain.times])
    full = generate_scene(
        40, duration=plain.scene.duration, size=(plain.scene.width, plain.scene.height)
    )
    names = [o.name for o in full.objects]
    assert names  # the scene has objects to ask about
    for footage in (plain, shifted):
        maker = QuestionMaker(full, footage.times, offset=footage.offset)
        for obj in full.objects:
            qa = maker.when(obj.name)
            spans = [(t.start, t.end) for t in qa.truth]
            assert all(footage.times[0] <= a <= b <= footage.times[-1] for a, b in spans)
    ask = (QuestionMaker(full, f.times, offset=f.offset) for f in (plain, shifted))
    plain_maker, shifted_maker = ask
    for name in names:
        a, b = plain_maker.when(name), shifted_maker.when(name)
        assert [x.start + shift for x in a.truth] == pytest.approx([x.start for x in b.truth])
        assert plain_maker.seen(name) == shifted_maker.seen(name)


def test_object_changes_name_entries_then_exits() -> None:
    from livelens.model.training import object_changes

    # Two objects over four frames: the first from frame 1 to 2, the second at frame 0 and 3.
    shown = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert object_changes(shown).tolist() == [
        [1, 0, 0, 1],  # frame 1: the first entered, the second left
        [0, 0, 0, 0],
        [0, 1, 1, 0],  # frame 3: the second entered, the first left
    ]


def test_moment_head_must_be_a_head_of_the_model() -> None:
    with pytest.raises(ValueError, match="moment_head 2 is not one of 2 heads"):
        replace(SMALL, moment_head=2)


def test_label_digits_read_every_label_up_to_four_digits_of_seconds() -> None:
    from livelens.model.training import label_digits

    assert label_digits([0.0, 12.5, 3605.0, 20000.0]).tolist() == [
        [0, 0, 0, 0, 0], [0, 0, 1, 2, 5], [3, 6, 0, 5, 0], [9, 9, 9, 9, 9],
    ]  # fmt: skip


def test_balanced_questions_answer_yes_half_the_time() -> None:
    stage = replace(SMALL.stages[0], min_seconds=8.0, max_seconds=8.0)
    # A clip with an object in some of its frames but not all: hard negatives exist.
    footage = next(
        f
        for k in range(11, 80)
        if ((p := (f := make_footage(k, stage, SMALL)).present).any(0) & ~p.all(0)).any()
    )
    maker = QuestionMaker(footage.scene, footage.times, offset=footage.offset)
    rng = random.Random(0)
    asked = [qa for _ in range(40) for qa in balanced_questions(maker, rng, 4, (Kind.AT,))]
    answers = [qa.answer for qa in asked]
    assert 0.3 < answers.count("Yes.") / len(answers) < 0.7
    for qa in asked:  # every answer is the truth at the asked moment
        assert qa.answer == ("Yes." if maker._visible(qa.target, qa.moment) else "No.")
    # Most "No." answers are about an object the clip shows at another moment.
    noes = [qa for qa in asked if qa.answer == "No."]
    elsewhere = [qa for qa in noes if any(maker.seen(qa.target))]
    assert noes and len(elsewhere) / len(noes) > 0.5


def test_now_hard_negatives_ask_about_an_object_that_left() -> None:
    """A "No." to "is X visible now?" with `elsewhere`: X is in an earlier frame, not the newest."""
    stage = replace(SMALL.stages[0], min_seconds=8.0, max_seconds=8.0)
    for k in range(11, 80):
        footage = make_footage(k, stage, SMALL)
        maker = QuestionMaker(footage.scene, footage.times, offset=footage.offset)
        qa = maker.yes_no(random.Random(k), Kind.NOW, want=False, elsewhere=True)
        if qa is not None and footage.present[-1].any():
            break
    else:
        raise AssertionError("no clip with an object that left before its newest frame")
    seen = maker.seen(qa.target)
    assert qa.kind is Kind.NOW and qa.answer == "No." and any(seen) and not seen[-1]
    assert maker.yes_no(random.Random(0), Kind.NOW, want=True, elsewhere=True).answer == "Yes."


def test_pointer_targets_name_the_frame_each_answer_token_copies(built) -> None:
    """Each digit and point of a grounding answer's times points at the frame with that label
    (marked as a stay's start or end); a moment's yes/no or scene answer at that moment's frame;
    "now" at the newest frame."""
    from livelens.model.qa import QA
    from livelens.model.scenes import Interval
    from livelens.model.training import pointer_targets

    tokenizer, _, _ = built
    times = [0.0, 0.5, 1.0, 1.5, 12.0, 12.5]
    frame_of = {f"{t:.1f}": i for i, t in enumerate(times)}

    def pieces(answer: str) -> list[tuple[str, int]]:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        qa = QA(Kind.WHEN, "When is the red ball visible?", answer, "red ball", (Interval(0, 1),))
        return [
            (tokenizer.decode([ids[j]]), f, end)
            for j, f, end in pointer_targets(qa, ids, tokenizer, frame_of, 5)
        ]

    assert pieces("From 0.5s to 12.0s.") == [
        ("0", 1, False), (".", 1, False), ("5", 1, False),
        ("1", 4, True), ("2", 4, True), (".", 4, True), ("0", 4, True),
    ]  # fmt: skip
    ends = [end for _, _, end in pieces("From 0.0s to 0.5s and from 1.0s to 12.5s.")]
    assert ends == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 4
    assert pieces("There is no red ball in the video.") == []
    at = QA(Kind.AT, "Is there a red ball at 1.5s?", "Yes.", "red ball", moment=1.5)
    now = QA(Kind.NOW, "Is a red ball visible now?", "No.", "red ball", moment=12.5)
    for qa, frame in ((at, 3), (now, 5)):
        ids = tokenizer(qa.answer, add_special_tokens=False)["input_ids"]
        assert pointer_targets(qa, ids, tokenizer, frame_of, 5) == [(0, frame, False)]


@pytest.mark.parametrize(("models", "moment_head"), [("built", 1), ("built_gqa", 2)])
def test_pointer_loss_is_the_heads_own_attention(request, models: str, moment_head: int) -> None:
    """PointerProbe's loss equals -log of the attention weight transformers' eager attention
    gives each target frame's tokens (its label through its last visual token) in head 0 of the
    probed layer, and each moment's frame (its last visual token) in the moment head; with one
    key/value head per head and with two heads per key/value head."""
    from livelens.model.training import PointerProbe

    tokenizer, model, prompt = request.getfixturevalue(models)
    video_id, eos_id = _ids(tokenizer, model)
    # A clip asked both times to copy (WHEN, FIRST) and moments (AT, NOW, SCENE...).
    for seed in range(29, 60):
        clip = make_clip(seed, SMALL.stages[1], SMALL)
        packed = pack(clip, tokenizer, prompt, video_id, eos_id)
        if packed.pointer_whole.any() and not packed.pointer_whole.all():
            break
    else:
        raise AssertionError("no clip with both kinds of pointer targets")
    # Whole frames exactly for the answers that copy times.
    starts = packed.block_starts.tolist()
    rows = zip(packed.pointer_queries.tolist(), packed.pointer_whole.tolist(), strict=True)
    for row, whole in rows:
        block = max(i for i, start in enumerate(starts) if start <= row)
        assert whole == (clip.questions[block].kind in (Kind.WHEN, Kind.FIRST))
    probe = PointerProbe(model, layer=0, moment_head=moment_head)
    with torch.no_grad():
        embeds = _embeds(model, clip, packed, video_id)
        language = model.model.language_model
        language.config._attn_implementation = "eager"
        try:
            out = language(
                inputs_embeds=embeds[None],
                attention_mask=torch.where(packed.mask, 0.0, float("-inf")),
                position_ids=packed.positions[None],
                use_cache=False,
                output_attentions=True,
            )
        finally:
            language.config._attn_implementation = "sdpa"
        loss = probe.loss(packed)
    probe.remove()
    weights = out.attentions[0][0]  # layer 0: (heads, L, L)
    # A time: summed over the target frame's label and visual tokens; a moment: the frame's
    # last visual token.
    bounds = [0, *(packed.frame_last + 1).tolist()]
    targets = zip(
        packed.pointer_queries.tolist(),
        packed.pointer_frames.tolist(),
        packed.pointer_whole.tolist(),
        strict=True,
    )
    frames = torch.stack(
        [
            weights[
                0 if whole else moment_head,
                q,
                bounds[f] if whole else bounds[f + 1] - 1 : bounds[f + 1],
            ].sum()
            for q, f, whole in targets
        ]
    )
    expected = -frames.log().mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_object_rows_are_the_answers_of_questions_about_one_object(built) -> None:
    """QuestionProbe reads the positions predicting each answer token (eos included) of a
    question naming an object, labelled with that object; scene questions have none."""
    from livelens.model.scenes import VOCABULARY

    tokenizer, model, prompt = built
    video_id, eos_id = _ids(tokenizer, model)
    clip = make_clip(31, SMALL.stages[1], SMALL)
    packed = pack(clip, tokenizer, prompt, video_id, eos_id)
    expected_rows, expected_labels = [], []
    ends = [*packed.block_starts.tolist()[1:], len(packed.ids)]
    for q, end in zip(clip.questions, ends, strict=True):
        answer = len(tokenizer(q.answer, add_special_tokens=False)["input_ids"]) + 1
        if q.target is not None:
            expected_rows += range(end - answer - 1, end - 1)
            expected_labels += [VOCABULARY.index(q.target)] * answer
    assert expected_rows and packed.object_rows.tolist() == expected_rows
    assert packed.object_labels.tolist() == expected_labels
    assert (packed.targets[packed.object_rows] != -100).all()
