"""Train the tiny grounding model: real VideoLLaMA3 classes, generated scenes, the live prompt.

`python -m livelens.model.training --out DIR` builds a tokenizer and a
small `VideoLlama3ForConditionalGeneration`, then trains it on clips of generated scenes
(model/scenes.py) with true questions and answers (model/qa.py). Every example goes through the
live path's own front end: frames sampled by media time with `FpsSampler`, an H.264 round trip,
the swscale resize to the session grid, `DiffFramePruner` (the DiffFP kernel's CPU path), and the
token sequence `VideoSession` builds (same text pieces, tokenized the same way).

Recipe (docs/benchmarks.md has the learning curve and the experiments behind each choice):
- footage pools: each stage renders and encodes its clips once (two processes) and draws from
  them for every step, with fresh questions on each use (Footage, make_pool);
- several questions per clip share one forward of the clip: each question block attends to the
  clip and to itself only (a 4-D mask), so a clip's video tokens are paid for once;
- a curriculum: single frames (what is there now, is X there now), then short clips asked about
  single moments, then intervals, then clips up to 48 s, sampled at 0.5, 1 and 2 fps so the model
  reads the time labels instead of counting frames;
- balanced yes/no questions (Yes half the time), so the "No" prior earns nothing and the loss
  only falls by reading the frames;
- per-moment targets ("What is in the scene at 12.0s?", "Is there a red ball at 12.0s?") beside
  the grounding answers, so each frame's label and content are supervised directly;
- auxiliary losses that are not part of the saved model: visual tokens aligned with the words that
  name their object (WordProbe), per-frame deep supervision in the LLM (FrameProbe), the asked
  object named where the answer is made (QuestionProbe), and one attention head told which
  frame each answer token comes from (PointerProbe: the frame whose label a time copies, the
  frame a yes/no answer is about; its attention summed over that frame's tokens);
- 30% of the clips at later media times (labels up to an hour), as a live stream has them;
- a stay's answer ends at the first frame without the object (qa.frame_spans), and most "No."
  answers are about an object the clip shows at other moments (balanced_questions);
- scenes with several objects more often than not, so an answer must depend on the object asked;
- a narrow LLM (width 128, 4 heads of 32, 2 key/value heads) with Qwen2.5's rope theta (1e6),
  unit-scale input embeddings and visual features at initialisation (_widen_inputs).
Deterministic from --seed on a given machine (fixed step counts, seeded data and pools).

Status (run ptr7, 57.8 min): the model finds the asked object's frames and the ends of its
stays (WHEN pointer 0.80) and copies labels, also past 1200 s; held-out WHEN mIoU 0.60, R@0.5
0.61 against targets of 0.8 / 0.85. Its yes/no answers lean to "No." (0.74; the newest frame's
P(yes) stays under 0.5 while the object is visible), so no checkpoint is committed yet
(docs/benchmarks.md, issue 9). Runs ptr8 (label digits read at the label) and ptr9 (a moment's
answer on its own head) did not do better.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from livelens.model import qa as qa_mod
from livelens.model.prompt import PromptFormat
from livelens.model.pruner import DiffFramePruner
from livelens.model.qa import QA, Kind, QuestionMaker
from livelens.model.scenes import VOCABULARY, VOCABULARY_INDEX, Scene, generate_scene
from livelens.stream.grid import Grid, choose_grid, resize_to_grid
from livelens.stream.sampler import FpsSampler

logger = logging.getLogger(__name__)

# What the checkpoint tells LiveLens about how it was trained (read by model/loading.py).
LIVELENS_JSON = "livelens.json"
# Seeds of training scenes are drawn below this; held-out scenes (benchmarks, tests) use seeds
# from HELD_OUT_SEED up, so no scene is ever both trained on and scored.
HELD_OUT_SEED = 1_000_000_000
# Source sizes rendered for training: the grid is ~140 px wide whatever the source, and larger
# sources only cost rendering time (their downscale averages the sensor noise further).
TRAIN_SIZES = ((320, 240), (480, 360), (640, 360), (640, 480))


# Question kinds of a clip, drawn with these multiplicities: grounding answers dominate.
_MIX = (
    Kind.WHEN, Kind.WHEN, Kind.WHEN, Kind.FIRST, Kind.AT, Kind.AT, Kind.NOW, Kind.NOW,
    Kind.SCENE, Kind.SCENE_AT, Kind.SCENE_AT,
)  # fmt: skip
# The first stage: what one frame shows.
_FRAMES = (Kind.SCENE, Kind.NOW, Kind.AT)
# Then what is where at single moments of a short clip, before any interval.
_MOMENTS = (Kind.SCENE, Kind.NOW, Kind.AT, Kind.SCENE_AT)
# Share of the "No." answers of yes/no questions asked about an object the clip shows at other
# moments. With objects drawn as for other questions (run ptr5), a standing "now" question
# answered "was it seen lately": P(yes) rose over several frames after the object came and
# stayed above 0.5 for seconds after it left (benchmarks/alerts.py recall 0.26).
_HARD_NO = 0.7
# Kinds whose answers copy frames' times: their pointer targets the whole frame (PointerProbe).
_TIMES = (Kind.WHEN, Kind.FIRST)
# Share of a merged token's cell an object's box must cover to label the token with it.
_TOKEN_COVER = 0.3


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: clips of this shape, for this many optimizer steps."""

    name: str
    steps: int
    min_seconds: float
    max_seconds: float
    rates: tuple[float, ...]
    kinds: tuple[Kind, ...]
    questions: int = 6
    """Questions per clip, sharing one forward of the clip."""
    max_frames: int = 64
    clips: int = 0
    """Footage made for the stage and reused for all its steps with fresh questions (see
    make_pool); 0 makes a fresh clip for every example."""
    balanced: bool = False
    """Yes/no questions answer "Yes." half of the time (see balanced_questions)."""


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    tokens_per_frame: int = 24
    """The session grid's token budget the model is trained (and served) at."""
    batch: int = 4
    """Clips per optimizer step."""
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    thresholds: tuple[float, ...] = (0.1, 0.1, 0.1, 4.0)
    """DiffFP thresholds drawn per clip: mostly the default, sometimes a pruning one."""
    stages: tuple[Stage, ...] = field(
        default_factory=lambda: (
            Stage("frames", 400, 0.0, 0.0, (1.0,), _FRAMES, 8, clips=1000, balanced=True),
            Stage("moments", 300, 2.0, 8.0, (1.0, 2.0), _MOMENTS, 12, 8, 500, balanced=True),
            Stage("short", 600, 4.0, 16.0, (1.0, 2.0), _MIX, 12, 16, 400, balanced=True),
            Stage("long", 1700, 8.0, 64.0, (0.5, 1.0, 2.0), _MIX, 12, 64, 1600, balanced=True),
        )
    )
    token_loss: float = 0.5
    """Weight of the per-token object loss on the projected visual features (see WordProbe)."""
    vision_hidden: int = 128
    vision_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    workers: int = 2
    """Processes making a stage's footage pool (the pool does not depend on their number)."""
    rope_theta: float = 1e6
    objects: tuple[int, ...] = (1, 2, 2, 3, 3)
    """Objects per training scene, drawn uniformly from this list."""
    pointer_loss: float = 1.0
    """Weight (before token_loss's) of the attention supervision of the last layer's first head
    (see PointerProbe); 0 turns it off."""
    moment_head: int = 0
    """The last layer's head PointerProbe supervises for a moment's answer (AT/NOW/SCENE); head 0
    takes the times to copy. Run ptr9 tried 2, in the other key/value group of text_kv_heads=2,
    so that what a frame hands to a copied time (its label) and to a moment's answer (what it
    shows) are different value vectors: AT answers kept their frame (AT pointer 0.94) but
    grounding fell (mIoU 0.535 against 0.599) and the newest frame's "Yes." stayed weak
    (docs/benchmarks.md)."""
    shift_share: float = 0.3
    """Share of clips whose media time starts later than 0 (a live stream's labels keep growing:
    `Time 3605.0s:` an hour in), by up to `shift_max` seconds."""
    shift_max: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 <= self.moment_head < self.text_heads:
            raise ValueError(
                f"moment_head {self.moment_head} is not one of {self.text_heads} heads"
            )


# ----------------------------------------------------------------------------------- data
@dataclass
class Clip:
    """A training example: sampled frames at the session grid, their times, and questions."""

    frames: np.ndarray
    """uint8 (T, H, W, 3) at the grid."""
    times: list[float]
    questions: list[QA]
    threshold: float
    grid: Grid
    labels: np.ndarray
    """int64 (T, tokens): the object covering each merged token (0 = none; see token_labels)."""
    present: np.ndarray
    """float32 (T, vocabulary): which objects each frame shows (see FrameProbe)."""


def camera_frames(scene: Scene, times: Sequence[float], *, crf: int, offset: float = 0.0):
    """The scene at `offset + t` for each t, through an H.264 encode/decode as a camera sends it."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = scene.width, scene.height, "yuv420p"
    encoder.time_base = Fraction(1, 1000)
    encoder.options = {"crf": str(crf), "preset": "ultrafast", "tune": "zerolatency"}
    decoder = av.CodecContext.create("h264", "r")
    decoded: list[av.VideoFrame] = []
    for i, t in enumerate(times):
        image = scene.frame(offset + t, index=round((offset + t) * scene.fps))
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i
        for packet in encoder.encode(frame):
            decoded += decoder.decode(packet)
    for packet in encoder.encode(None):
        decoded += decoder.decode(packet)
    decoded += decoder.decode(None)
    return decoded


@dataclass
class Footage:
    """A clip without its questions: the sampled frames after the live front end, and the scene's
    ground truth (no pixels), so each use of the clip can be asked fresh questions.

    Making footage (rendering, the H.264 round trip) costs far more than a training step on it,
    so a stage makes a pool of footage once and draws from it for every step (see make_pool).
    """

    frames: np.ndarray
    times: list[float]
    offset: float
    """Scene time of the clip's media time 0."""
    scene: Scene
    """The scene without its background picture: ground truth only."""
    threshold: float
    grid: Grid
    labels: np.ndarray
    present: np.ndarray

    def clip(self, rng: random.Random, stage: Stage) -> Clip:
        """This footage with `stage.questions` true Q&A pairs drawn by `rng`."""
        maker = QuestionMaker(self.scene, self.times, offset=self.offset)
        if stage.balanced:
            questions = balanced_questions(maker, rng, stage.questions, stage.kinds)
        else:
            questions = maker.questions(rng, stage.questions, stage.kinds)
        return Clip(
            self.frames,
            self.times,
            questions,
            self.threshold,
            self.grid,
            self.labels,
            self.present,
        )


def balanced_questions(
    maker: QuestionMaker, rng: random.Random, count: int, kinds: Sequence[Kind]
) -> list[QA]:
    """Like `QuestionMaker.questions`, but yes/no questions answer "Yes." half of the time (as
    far as the clip allows), so the "No." prior earns nothing and only reading the frames pays;
    most "No." answers are about an object the clip shows at other moments (`_HARD_NO`).
    """
    out: dict[str, QA] = {}
    for _ in range(count * 8):
        qa = maker.sample(rng, kinds)
        if qa.kind in (Kind.AT, Kind.NOW):
            want = rng.random() < 0.5
            hard = rng.random() < _HARD_NO
            qa = maker.yes_no(rng, qa.kind, want, hard) or maker.yes_no(rng, qa.kind, want, False)
            if qa is None:
                continue
        out.setdefault(qa.question, qa)
        if len(out) == count:
            break
    return list(out.values())


def make_footage(seed: int, stage: Stage, config: TrainConfig) -> Footage:
    """One clip of a generated scene through the live front end, deterministic from `seed`."""
    rng = random.Random(seed)
    size = rng.choice(TRAIN_SIZES)
    # Mostly several objects: asked about one of them, the answer must depend on which.
    objects = rng.choice(config.objects)
    scene = generate_scene(seed, duration=round(rng.uniform(10, 60), 1), size=size, objects=objects)
    fps = rng.choice(stage.rates)
    length = rng.uniform(stage.min_seconds, stage.max_seconds)
    length = min(length, scene.duration - 1 / scene.fps, (stage.max_frames - 1) / fps)
    offset = rng.uniform(0, scene.duration - length - 1 / scene.fps)
    # Media time restarts at the clip's first frame; the sampler sees the decoder's frame times.
    first = math.ceil(offset * scene.fps)
    sampler = FpsSampler(fps)
    times: list[float] = []
    for i in range(first, first + round(length * scene.fps) + 1):
        t = (i - first) / scene.fps
        if sampler.offer(t):
            times.append(t)
    offset = first / scene.fps
    grid = choose_grid(scene.height, scene.width, tokens_per_frame=config.tokens_per_frame)
    decoded = camera_frames(scene, times, crf=rng.randint(18, 32), offset=offset)
    frames = np.stack([resize_to_grid(f, grid) for f in decoded])
    labels = np.stack([token_labels(scene, offset + t, grid) for t in times])
    present = np.zeros((len(times), len(VOCABULARY)), np.float32)
    for i, t in enumerate(times):
        for obj in scene.visible_at(offset + t):
            present[i, VOCABULARY_INDEX[obj.name]] = 1.0
    threshold = rng.choice(config.thresholds)
    if config.shift_share and rng.random() < config.shift_share:
        # Later media time, same scene time: the labels change, the frames and truth do not.
        shift = round(rng.uniform(0, config.shift_max), 1)
        times, offset = [t + shift for t in times], offset - shift
    truth = replace(scene, _background=np.zeros((0, 0, 3), np.uint8), _noise_cache={})
    return Footage(frames, times, offset, truth, threshold, grid, labels, present)


def make_clip(seed: int, stage: Stage, config: TrainConfig) -> Clip:
    """One clip of a generated scene with true Q&A pairs, deterministic from `seed`."""
    return make_footage(seed, stage, config).clip(random.Random(-seed - 1), stage)


def _footage(args: tuple[int, Stage, TrainConfig]) -> Footage:
    torch.set_num_threads(1)
    return make_footage(*args)


def make_pool(stage: Stage, config: TrainConfig, first_seed: int, workers: int = 2) -> list:
    """`stage.clips` footages from seeds first_seed, first_seed + 1, ..., made by `workers`
    processes (the order, and so the pool, does not depend on them)."""
    jobs = [(first_seed + k, stage, config) for k in range(stage.clips)]
    if workers <= 1:
        return [_footage(job) for job in jobs]
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_footage, jobs, chunksize=8))


def token_labels(scene: Scene, t: float, grid: Grid) -> np.ndarray:
    """Per merged token (row-major) of the frame at scene time t: 1 + the vocabulary index of the
    object whose box covers most of it (the one drawn on top), 0 where none covers enough.

    An auxiliary target only: it teaches the vision tower early what the answers will need.
    """
    unit = grid.patch_size * grid.merge_size
    rows, cols = grid.height // unit, grid.width // unit
    sx, sy = cols / scene.width, rows / scene.height
    labels = np.zeros((rows, cols), np.int64)
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    for obj, (x0, y0, x1, y1) in scene.boxes(t):
        cover_x = np.clip(np.minimum(c + 1, x1 * sx) - np.maximum(c, x0 * sx), 0, None)
        cover_y = np.clip(np.minimum(r + 1, y1 * sy) - np.maximum(r, y0 * sy), 0, None)
        labels[cover_x * cover_y >= _TOKEN_COVER] = VOCABULARY_INDEX[obj.name] + 1
    return labels.reshape(-1)


# ------------------------------------------------------------------------------ sequences
@dataclass
class Packed:
    """One clip and its questions as one sequence with a block mask."""

    ids: torch.Tensor
    """(L,) token ids; video placeholders where visual features go."""
    positions: torch.Tensor
    mask: torch.Tensor
    """(1, 1, L, L) bool: True where a query position may attend a key position."""
    targets: torch.Tensor
    """(L,) next-token targets, -100 where no loss is taken."""
    kept: torch.Tensor
    """(T, tokens) bool DiffFP keep mask."""
    patches: torch.Tensor
    frame_last: torch.Tensor
    """(T,) position of each frame's last visual token."""
    pointer_queries: torch.Tensor
    """(P,) positions predicting an answer token that comes from one frame (see pointer_targets)."""
    pointer_frames: torch.Tensor
    """(P,) that frame's index."""
    pointer_ends: torch.Tensor
    """(P,) bool: the token is part of the end time of a stay (see pointer_targets)."""
    pointer_whole: torch.Tensor
    """(P,) bool: the target is the whole frame (a time to copy); else the frame's last visual
    token (a moment's content; see PointerProbe)."""
    block_starts: torch.Tensor
    """(B,) where each question block starts, in question order."""
    object_rows: torch.Tensor
    """(Q,) positions predicting the answer tokens of questions about one object."""
    object_labels: torch.Tensor
    """(Q,) that object's vocabulary index (see QuestionProbe)."""


def pack(clip: Clip, tokenizer, prompt: PromptFormat, video_token_id: int, eos_id: int) -> Packed:
    """The clip as `VideoSession` tokenizes it, then one block per question."""
    pruner = DiffFramePruner(threshold=clip.threshold)
    pruned = pruner(torch.from_numpy(clip.frames))

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids: list[int] = []
    frame_last: list[int] = []
    pending = prompt.prefix
    for i, (t, n) in enumerate(zip(clip.times, pruned.keep.sum(1).tolist(), strict=True)):
        pending += prompt.frame_label(i, t)
        if n == 0:  # min_tokens >= 1 keeps this from happening in training
            frame_last.append(len(ids) - 1)
            continue
        ids += tokenize(pending) + [video_token_id] * n
        frame_last.append(len(ids) - 1)
        pending = ""
    video = len(ids)
    blocks = []
    frame_of = {qa_mod.label(t): i for i, t in enumerate(clip.times)}
    pointer_queries: list[int] = []
    pointer_frames: list[int] = []
    pointer_ends: list[bool] = []
    pointer_whole: list[bool] = []
    object_rows: list[int] = []
    object_labels: list[int] = []
    block_starts: list[int] = []
    start = video
    for q in clip.questions:
        block_starts.append(start)
        question = tokenize(pending + prompt.question_text(q.question))
        answer = [*tokenize(q.answer), eos_id]
        blocks.append((question, answer))
        for j, frame, end in pointer_targets(q, answer, tokenizer, frame_of, len(clip.times) - 1):
            pointer_queries.append(start + len(question) + j - 1)
            pointer_frames.append(frame)
            pointer_ends.append(end)
            pointer_whole.append(q.kind in _TIMES)
        if q.target is not None:
            first = start + len(question) - 1
            object_rows.extend(range(first, first + len(answer)))
            object_labels.extend([VOCABULARY_INDEX[q.target]] * len(answer))
        start += len(question) + len(answer)
    total = video + sum(len(a) + len(b) for a, b in blocks)
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:video, :video] = torch.ones(video, video, dtype=torch.bool).tril()
    positions = list(range(video))
    targets = [-100] * video
    all_ids = list(ids)
    start = video
    for question, answer in blocks:
        block = question + answer
        n = len(block)
        mask[start : start + n, :video] = True
        mask[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        positions += range(video, video + n)
        # The last question token predicts the first answer token, and so on to eos.
        targets += [-100] * (len(question) - 1) + answer + [-100]
        all_ids += block
        start += n
    return Packed(
        ids=torch.tensor(all_ids),
        positions=torch.tensor(positions),
        mask=mask[None, None],
        targets=torch.tensor(targets),
        kept=pruned.keep,
        patches=pruned.patches,
        frame_last=torch.tensor(frame_last),
        pointer_queries=torch.tensor(pointer_queries, dtype=torch.long),
        pointer_frames=torch.tensor(pointer_frames, dtype=torch.long),
        pointer_ends=torch.tensor(pointer_ends, dtype=torch.bool),
        pointer_whole=torch.tensor(pointer_whole, dtype=torch.bool),
        block_starts=torch.tensor(block_starts, dtype=torch.long),
        object_rows=torch.tensor(object_rows, dtype=torch.long),
        object_labels=torch.tensor(object_labels, dtype=torch.long),
    )


_TIME = re.compile(r"\d+\.\d(?=s)")


def pointer_targets(
    q: QA, answer: Sequence[int], tokenizer, frame_of: dict[str, int], last: int
) -> list[tuple[int, int, bool]]:
    """(answer token index, frame index, end) for each answer token that one frame decides.

    A grounding answer's time tokens are copies of `Time ...s:` labels (digits and point): each
    points at the frame with that label; `end` marks the end of a stay (the diagnosis reports
    starts and ends apart). A yes/no or scene answer about a moment is decided by the frame at
    that moment (the newest frame for "now"). See PointerProbe.

    A stay's end is the first frame where the object is gone (qa.frame_spans), so its pointer,
    like the start's, names a frame where something changed. Tried and left (docs/benchmarks.md,
    run ptr4): answering the last frame showing the object while pointing at the next one, with
    FrameProbe reading the previous frame's label there, moved the end pointer from 0.53 to 0.57
    only, and the previous-label supervision halved the AT pointer.
    """
    if q.kind in (Kind.NOW, Kind.SCENE):
        return [(0, last, False)]
    if q.kind in (Kind.AT, Kind.SCENE_AT):
        frame = frame_of.get(qa_mod.label(q.moment)) if q.moment is not None else None
        return [] if frame is None else [(0, frame, False)]
    pieces = [tokenizer.decode([i]) for i in answer]
    ends = list(np.cumsum([len(x) for x in pieces]))
    out = []
    # Times alternate: "from <start> to <end>", once per stay.
    for ordinal, match in enumerate(_TIME.finditer("".join(pieces))):
        frame = frame_of.get(match.group())
        if frame is None:
            continue
        end = ordinal % 2 == 1
        for j, stop in enumerate(ends):
            begin = stop - len(pieces[j])
            if match.start() <= begin and stop <= match.end():
                out.append((j, frame, end))
    return out


class WordProbe(torch.nn.Module):
    """Reads each projected visual token as the words naming the object on it.

    Cosine similarity between the token and the LLM's own input embeddings of the colour words
    ("Nothing", " red", ...) and of the shape words ("Nothing", " ball", ...), one softmax each.
    Object tokens are pulled toward the embeddings of their names, which the question's words
    use, so the LLM can match "red ball" in a question to red-ball tokens early in training.
    Not part of the saved model: it holds only a scale; the embeddings are the model's.
    """

    def __init__(self, tokenizer, embeddings: torch.nn.Embedding) -> None:
        super().__init__()
        from livelens.model.scenes import COLOURS, SHAPES

        def word(text: str) -> int:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"{text!r} is not one token of the tiny tokenizer: {ids}")
            return ids[0]

        nothing = word("Nothing")
        self.colour_ids = [nothing, *(word(" " + c) for c in COLOURS)]
        self.shape_ids = [nothing, *(word(" " + s) for s in SHAPES)]
        self.embeddings = [embeddings]  # a list: not registered, so not saved or counted twice
        self.scale = torch.nn.Parameter(torch.tensor(10.0))
        names = VOCABULARY
        colours, shapes = list(COLOURS), list(SHAPES)
        # label (0 = none, 1 + vocabulary index) -> (colour class, shape class)
        table = [(0, 0)] + [
            (1 + colours.index(n.split()[0]), 1 + shapes.index(n.split()[1])) for n in names
        ]
        self.register_buffer("table", torch.tensor(table), persistent=False)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = self.embeddings[0].weight
        feats = F.normalize(feats, dim=-1)
        loss = feats.new_zeros(())
        for ids, column in ((self.colour_ids, 0), (self.shape_ids, 1)):
            words = F.normalize(weight[ids], dim=-1)
            logits = self.scale * feats @ words.T
            loss = loss + F.cross_entropy(logits, self.table[labels, column])
        return loss / 2


# Digits of a time label FrameProbe reads: thousands of seconds down to tenths (up to 9999.9 s).
_LABEL_DIGITS = 5


def label_digits(times: Sequence[float]) -> torch.Tensor:
    """(T, _LABEL_DIGITS) the digits of each `Time {t:.1f}s:` label, most significant first,
    zero-padded (later times are read as 9999.9)."""
    tenths = torch.tensor([round(t * 10) for t in times]).clamp(max=10**_LABEL_DIGITS - 1)
    scale = 10 ** torch.arange(_LABEL_DIGITS - 1, -1, -1)
    return tenths[:, None] // scale % 10


class FrameProbe(torch.nn.Module):
    """Deep supervision of the LLM at each frame's last visual token, in a middle layer: which
    objects the frame shows, which entered and which left since the previous frame, and the
    digits of its own time label (label_digits).

    These are the facts a grounding answer is made of: a stay starts at a frame where its object
    entered and ends at the one where it left, and the answer copies their labels. Asking
    for them where each frame ends lets the model learn them per frame instead of only through
    whole answers. Not part of the saved model.
    """

    def __init__(self, hidden: int, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.present = torch.nn.Linear(hidden, len(VOCABULARY))
        self.changes = torch.nn.Linear(hidden, 2 * len(VOCABULARY))
        self.digits = torch.nn.Linear(hidden, 10 * _LABEL_DIGITS)

    def forward(
        self, hidden: torch.Tensor, times: Sequence[float], present: np.ndarray
    ) -> torch.Tensor:
        digits = label_digits(times)
        own = self.digits(hidden).view(-1, 10)
        loss = F.cross_entropy(own, digits.reshape(-1))
        shown = torch.from_numpy(present)
        loss = loss + F.binary_cross_entropy_with_logits(self.present(hidden), shown)
        if len(times) > 1:
            loss = loss + F.binary_cross_entropy_with_logits(
                self.changes(hidden[1:]), object_changes(shown)
            )
        return loss


def object_changes(shown: torch.Tensor) -> torch.Tensor:
    """(T-1, 2 * vocabulary) for frames 1.. of a clip: which objects entered since the previous
    frame, then which left, from the (T, vocabulary) presence."""
    entered = shown[1:] * (1 - shown[:-1])
    left = shown[:-1] * (1 - shown[1:])
    return torch.cat([entered, left], dim=1)


class QuestionProbe(torch.nn.Module):
    """Deep supervision of the asked object where the answer is made: at every position that
    predicts an answer token of a question about one object, the input of the layer whose head
    PointerProbe supervises must name that object (its colour and its shape, read linearly).

    The pointer head can only find the frames showing *that* object if its query carries the
    object; without this, answers follow the scene's events whatever object is asked about
    (docs/benchmarks.md). Not part of the saved model.
    """

    def __init__(self, hidden: int, layer: int) -> None:
        super().__init__()
        from livelens.model.scenes import COLOURS, SHAPES

        self.layer = layer
        colours, shapes = list(COLOURS), list(SHAPES)
        self.colour = torch.nn.Linear(hidden, len(colours))
        self.shape = torch.nn.Linear(hidden, len(shapes))
        table = [(colours.index(n.split()[0]), shapes.index(n.split()[1])) for n in VOCABULARY]
        self.register_buffer("table", torch.tensor(table), persistent=False)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        parts = self.table[labels]
        colour = F.cross_entropy(self.colour(hidden), parts[:, 0])
        return (colour + F.cross_entropy(self.shape(hidden), parts[:, 1])) / 2


def frame_span(frame_last: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, last) positions of each of `frames`: its `Time t:` label (and the prompt before
    the first frame) through its last visual token."""
    first = torch.where(frames > 0, frame_last[(frames - 1).clamp(min=0)] + 1, 0)
    return first, frame_last[frames]


class PointerProbe:
    """Supervises where one attention head of one LLM layer looks: from each position predicting
    an answer token that one frame decides (pointer_targets), at that frame (its label and
    visual tokens; frame_span).

    A grounding answer is a copy of the labels of the frames that show the object; learning to
    find those frames only through the copied digits is slow (the answers stay on their priors,
    docs/benchmarks.md). This names the frame directly: for a time to copy, the loss is -log of
    the head's attention summed over the frame's tokens, so the head may look at the tokens
    showing the object asked about rather than at one token standing for the whole frame. A
    yes/no or scene answer about a moment reads what the frame shows, which FrameProbe gathers
    at the frame's last visual token: its target is that token (`Packed.pointer_whole`). With
    the whole frame there too (run ptr6), the head found the asked moment (AT pointer 0.94) but
    read its label, not its content: "No." to every AT question whose answer was "Yes." A
    moment's answer is supervised on `moment_head` (default: `head`); in another key/value group
    its values need not carry the labels the times copy. Nothing is added to the model: it reads
    the layer's own projections.
    """

    def __init__(self, model, layer: int, head: int = 0, moment_head: int | None = None) -> None:
        self.attention = model.model.language_model.layers[layer].self_attn
        self.head = head
        self.moment_head = head if moment_head is None else moment_head
        self.captured: dict = {}
        self.last = 0.0
        self._hook = self.attention.register_forward_pre_hook(self._capture, with_kwargs=True)

    def remove(self) -> None:
        """Stop capturing the layer's input."""
        self._hook.remove()
        self.captured = {}

    def _capture(self, module, args, kwargs) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.captured = {"hidden": hidden, "rope": kwargs.get("position_embeddings")}

    def loss(self, packed: Packed) -> torch.Tensor:
        """Mean -log attention weight summed over each target frame's tokens."""
        logits = self._logits(packed).float()
        first, last = frame_span(packed.frame_last, packed.pointer_frames)
        first = torch.where(packed.pointer_whole, first, last)
        where = torch.arange(logits.shape[1])
        inside = (where >= first[:, None]) & (where <= last[:, None])
        frame = logits.masked_fill(~inside, float("-inf")).logsumexp(-1)
        loss = (logits.logsumexp(-1) - frame).mean()
        self.last = loss.item()
        return loss

    def attention_weights(self, packed: Packed) -> torch.Tensor:
        """(P, L) the head's attention from each pointer query over the sequence."""
        return self._logits(packed).float().softmax(-1)

    def _logits(self, packed: Packed) -> torch.Tensor:
        from transformers.models.qwen2.modeling_qwen2 import rotate_half

        attention = self.attention
        hidden = self.captured["hidden"][0]
        cos, sin = (x[0] for x in self.captured["rope"])
        dim = attention.head_dim
        rows = packed.pointer_queries
        heads = torch.where(packed.pointer_whole, self.head, self.moment_head)
        q = attention.q_proj(hidden[rows]).view(len(rows), -1, dim)[torch.arange(len(rows)), heads]
        k = attention.k_proj(hidden).view(hidden.shape[0], -1, dim)  # (L, kv heads, dim)
        q = q * cos[rows] + rotate_half(q) * sin[rows]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        # Each query against the keys of its own head's key/value group.
        groups = torch.einsum("pd,lgd->pgl", q, k)
        logits = groups[torch.arange(len(rows)), heads // attention.num_key_value_groups]
        logits = logits * attention.scaling
        return logits.masked_fill(~packed.mask[0, 0, rows], float("-inf"))


def clip_features(model, patches: torch.Tensor, grid: Grid, frames: int) -> torch.Tensor:
    """ONE vision pass over a clip's patches (DiffFP's `patches`): every merged token's projected
    features, kept or not."""
    return model.model.get_video_features(
        pixel_values_videos=patches,
        video_grid_thw=torch.tensor([[frames, grid.patches_h, grid.patches_w]]),
        video_merge_sizes=torch.tensor([2]),
        return_dict=True,
    ).pooler_output[0]


def packed_embeds(model, packed: Packed, feats: torch.Tensor, video_token_id: int) -> torch.Tensor:
    """The packed sequence's input embeddings: the kept tokens' features in the video slots."""
    embeds = model.get_input_embeddings()(packed.ids)
    kept = feats[packed.kept.reshape(-1)].to(embeds.dtype)
    return embeds.masked_scatter((packed.ids == video_token_id)[:, None], kept)


def packed_forward(model, packed: Packed, embeds: torch.Tensor, **kwargs):
    """The LLM over the packed sequence (its block mask and positions), no cache."""
    return model.model.language_model(
        inputs_embeds=embeds[None],
        attention_mask=packed.mask,
        position_ids=packed.positions[None],
        use_cache=False,
        **kwargs,
    )


def held_out_frames(scene: Scene, tokens_per_frame: int) -> tuple[list[float], Grid, np.ndarray]:
    """A scene as the held-out evaluations see it: sampled at 1 fps from 0 s, through an H.264
    round trip (crf 23), resized to the session grid; (times, grid, frames)."""
    sampler = FpsSampler(1.0)
    times = [t for t in scene.frame_times() if sampler.offer(t)]
    grid = choose_grid(scene.height, scene.width, tokens_per_frame=tokens_per_frame)
    frames = np.stack([resize_to_grid(f, grid) for f in camera_frames(scene, times, crf=23)])
    return times, grid, frames


def clip_loss(
    model,
    packed: Packed,
    grid: Grid,
    frames: int,
    video_token_id: int,
    token_head: torch.nn.Module | None = None,
    labels: np.ndarray | None = None,
    frame_probe: FrameProbe | None = None,
    clip: Clip | None = None,
    pointer: PointerProbe | None = None,
    pointer_weight: float = 0.0,
    question_probe: QuestionProbe | None = None,
) -> torch.Tensor:
    """Mean next-token loss over the answers, through the real vision tower and LLM; plus, with
    `token_head`, the per-token object loss on the projected features (all tokens, kept or not).
    """
    feats = clip_features(model, packed.patches, grid, frames)
    aux = None
    if token_head is not None and labels is not None:
        aux = token_head(feats, torch.from_numpy(labels).reshape(-1))
    embeds = packed_embeds(model, packed, feats, video_token_id)
    out = packed_forward(
        model,
        packed,
        embeds,
        output_hidden_states=frame_probe is not None or question_probe is not None,
    )
    hidden = out.last_hidden_state[0]
    where = packed.targets != -100
    logits = model.lm_head(hidden[where])
    loss = F.cross_entropy(logits.float(), packed.targets[where])
    if frame_probe is not None and clip is not None:
        middle = out.hidden_states[frame_probe.layer][0, packed.frame_last]
        aux = aux + frame_probe(middle, clip.times, clip.present)
    if question_probe is not None and len(packed.object_rows):
        asked = out.hidden_states[question_probe.layer][0, packed.object_rows]
        aux = aux + question_probe(asked, packed.object_labels)
    if pointer is not None and len(packed.pointer_queries):
        aux = aux + pointer_weight * pointer.loss(packed)
    return loss if aux is None else (loss, aux)


# ---------------------------------------------------------------------------------- model
def build_model(config: TrainConfig):
    """Tokenizer (tiny BPE + the Q&A corpus) and a randomly initialised model."""
    from transformers import Qwen2Config, VideoLlama3Config, VideoLlama3ForConditionalGeneration
    from transformers.models.video_llama_3.configuration_video_llama_3 import (
        VideoLlama3VisionConfig,
    )

    from livelens.model.tiny import build_tokenizer

    tokenizer = build_tokenizer(config.seed, vocab_size=1024, extra=qa_mod.corpus())
    vision = VideoLlama3VisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=config.vision_hidden * 2,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=4,
        patch_size=14,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=config.text_hidden * 5 // 2,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_kv_heads,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    model_config = VideoLlama3Config(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
    )
    torch.manual_seed(config.seed)
    model = VideoLlama3ForConditionalGeneration(model_config)
    model.config.use_cache = True
    _widen_inputs(model)
    return tokenizer, model


@torch.no_grad()
def _widen_inputs(model) -> None:
    """Unit-scale input embeddings and visual features instead of the default std 0.02.

    At std 0.02 the token identities entering the residual stream are swamped by the layers'
    own outputs, and a model this small stays for hundreds of steps on the answer priors without
    reading the frames (measured: an LLM fed perfect per-token object labels as embeddings
    learned to name them several times faster at std 1 than at std 0.02).
    """
    model.get_input_embeddings().weight.normal_(0.0, 1.0)
    last = model.model.projector.readout[-1]
    probe = model.model.get_video_features(
        pixel_values_videos=torch.randn(64, 3 * 14 * 14),
        video_grid_thw=torch.tensor([[1, 8, 8]]),
        video_merge_sizes=torch.tensor([2]),
        return_dict=True,
    ).pooler_output[0]
    last.weight.mul_(1.0 / probe.std())
    last.bias.zero_()


def _clips(stage: Stage, config: TrainConfig, first_seed: int) -> Iterator[Clip]:
    """Clips for `stage`, made in a background process (the trainer keeps both cores busy)."""
    from torch.utils.data import DataLoader, IterableDataset

    class _Source(IterableDataset):
        def __iter__(self):
            for k in range(stage.steps * config.batch):
                yield make_clip(first_seed + k, stage, config)

    loader = DataLoader(
        _Source(), batch_size=None, num_workers=1, prefetch_factor=8, persistent_workers=False
    )
    yield from loader


def _draw(pool: Sequence[Footage], stage: Stage, seed: int) -> Iterator[Clip]:
    """Clips for `stage` from its pool: random footage, fresh questions, deterministic."""
    rng = random.Random(seed)
    while True:
        yield pool[rng.randrange(len(pool))].clip(rng, stage)


def train(out: Path, config: TrainConfig, *, log_every: int = 25, eval_scenes: int = 8) -> dict:
    """Train, saving the checkpoint to `out` after every stage; returns the curve and timings."""
    torch.manual_seed(config.seed)
    tokenizer, model = build_model(config)
    prompt = PromptFormat.from_tokenizer(tokenizer, model.config.video_token_id)
    video_id = int(model.config.video_token_id)
    eos_id = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    total_steps = sum(s.steps for s in config.stages)
    token_head = WordProbe(tokenizer, model.get_input_embeddings())
    frame_probe = FrameProbe(config.text_hidden, layer=config.text_layers // 2)
    pointer = (
        PointerProbe(model, layer=config.text_layers - 1, moment_head=config.moment_head)
        if config.pointer_loss
        else None
    )
    question_probe = QuestionProbe(config.text_hidden, layer=config.text_layers - 1)
    params = [
        *model.parameters(),
        *token_head.parameters(),
        *frame_probe.parameters(),
        *question_probe.parameters(),
    ]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98)
    )

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return config.lr * (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, total_steps - config.warmup)
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters; %d steps", n_params / 1e6, total_steps)
    curve: list[dict] = []
    started = time.monotonic()
    step = 0
    model.train()
    for stage_index, stage in enumerate(config.stages):
        seed0 = config.seed * 10_000_000 + stage_index * 1_000_000
        if stage.clips:
            t0 = time.monotonic()
            pool = make_pool(stage, config, seed0, workers=config.workers)
            frames = sum(len(f.times) for f in pool)
            made = round((time.monotonic() - t0) / 60, 2)
            logger.info(
                "%s: %d clips, %d frames made in %.2f min", stage.name, len(pool), frames, made
            )
            clips = _draw(pool, stage, config.seed * 7919 + stage_index)
        else:
            clips = _clips(stage, config, seed0)
        window: list[float] = []
        token_window: list[float] = []
        pointer_window: list[float] = []
        for _ in range(stage.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            losses, token_losses = [], []
            pointer_losses: list[float] = []
            for _ in range(config.batch):
                clip = next(clips)
                packed = pack(clip, tokenizer, prompt, video_id, eos_id)
                loss, aux = clip_loss(
                    model,
                    packed,
                    clip.grid,
                    len(clip.times),
                    video_id,
                    token_head,
                    clip.labels,
                    frame_probe,
                    clip,
                    pointer,
                    config.pointer_loss,
                    question_probe,
                )
                ((loss + config.token_loss * aux) / config.batch).backward()
                losses.append(loss.item())
                token_losses.append(aux.item())
                if pointer is not None:
                    pointer_losses.append(pointer.last)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            window.append(sum(losses) / len(losses))
            token_window.append(sum(token_losses) / len(token_losses))
            if pointer_losses:
                pointer_window.append(sum(pointer_losses) / len(pointer_losses))
            if step % log_every == 0 or step == total_steps:
                point = {
                    "step": step,
                    "stage": stage.name,
                    "loss": round(sum(window) / len(window), 4),
                    "token_loss": round(sum(token_window) / len(token_window), 4),
                    "pointer_loss": round(sum(pointer_window) / max(1, len(pointer_window)), 4),
                    "minutes": round((time.monotonic() - started) / 60, 2),
                }
                curve.append(point)
                window, token_window, pointer_window = [], [], []
                logger.info("%s", point)
        if eval_scenes:
            t0 = time.monotonic()
            scores = evaluate(model, tokenizer, config, scenes=eval_scenes)
            point = {"step": step, "stage": stage.name, "eval": scores}
            point["eval_minutes"] = round((time.monotonic() - t0) / 60, 2)
            curve.append(point)
            logger.info("%s", point)
        # After every stage, so that a run stopped early leaves its last finished stage.
        model.eval()
        save(out, tokenizer, model, config)
        model.train()
    model.eval()
    return {
        "parameters": n_params,
        "minutes": round((time.monotonic() - started) / 60, 2),
        "curve": curve,
    }


def evaluate(
    model, tokenizer, config: TrainConfig, *, scenes: int = 8, seed: int = HELD_OUT_SEED
) -> dict[str, float]:
    """Scores of greedy answers through `VideoSession` on held-out scenes (1 fps, 10-60 s)."""
    from livelens.model.loading import LoadedModel
    from livelens.model.runner import ModelRunner
    from livelens.model.sampling import SamplingParams
    from livelens.model.scoring import Scores
    from livelens.model.session import VideoSession

    was_training = model.training
    model.eval()
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name="training",
        path=Path("."),
        device=torch.device("cpu"),
        dtype=torch.float32,
        video_token_id=int(model.config.video_token_id),
    )
    runner = ModelRunner(loaded)
    scores = Scores()
    for k in range(scenes):
        rng = random.Random(seed + k)
        scene = generate_scene(seed + k, duration=round(rng.uniform(10, 60), 1))
        times, grid, frames = held_out_frames(scene, config.tokens_per_frame)
        session = VideoSession(runner, height=grid.height, width=grid.width)
        session.append(frames, times)
        maker = QuestionMaker(scene, times)
        asked = [maker.when(o.name) for o in scene.objects]
        asked += maker.questions(rng, 6, (Kind.AT, Kind.NOW, Kind.SCENE))
        for qa in asked:
            answer = session.answer(qa.question, SamplingParams(max_new_tokens=48))
            scores.add(qa, answer.text, times[-1])
    model.train(was_training)
    return scores.summary()


def save(out: Path, tokenizer, model, config: TrainConfig) -> Path:
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=out.parent if out.parent.exists() else None))
    try:
        model.generation_config.do_sample = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"tokens_per_frame": config.tokens_per_frame, "train": asdict(config)}
        (tmp / LIVELENS_JSON).write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(tmp), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _scaled(stage: Stage, scale: float) -> Stage:
    clips = max(1, round(stage.clips * scale)) if stage.clips else 0
    return replace(stage, steps=max(1, round(stage.steps * scale)), clips=clips)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every stage's steps and pool (e.g. 0.01 to smoke)",
    )
    parser.add_argument("--curve", type=Path, help="write the learning curve (JSON) here")
    parser.add_argument(
        "--eval-scenes", type=int, default=8, help="held-out scenes scored after each stage"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = TrainConfig(seed=args.seed)
    stages = tuple(_scaled(s, args.scale) for s in base.stages)
    config = replace(base, stages=stages)
    result = train(args.out, config, eval_scenes=args.eval_scenes)
    if args.curve:
        args.curve.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
