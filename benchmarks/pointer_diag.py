"""Where a grounding checkpoint's errors are: finding the frame, or reading it (teacher-forced).

For held-out generated scenes sampled as `evaluate()` samples them (1 fps from 0 s, the default
DiffFP threshold), every object is asked WHEN, AT a random frame and NOW, and the true answers
are fed in one packed forward (model/training.py's `pack`, the live session's token sequence).
At every answer token that one frame decides (`pointer_targets`: the digits of a copied time
label, the first token of a yes/no answer) it reports:

- pointer exact: the attention head `PointerProbe` trains (in the last LLM layer: head 0 for a
  copied time, the checkpoint's `moment_head` for a yes/no answer) puts the most attention,
  summed over each frame's tokens, on the right frame (for the end of a stay, the first frame
  without the object: see `pointer_targets`);
- the model's own next-token prediction there, split by whether the pointer was right.
- where a wrong pointer lands: a frame showing the asked object (right object, wrong frame),
  one showing only other objects (wrong object), or one showing none.

WHEN is reported whole and split into the starts and the ends of stays.

A checkpoint trained without pointer supervision can be diagnosed too (the head then simply is
whatever it learned). Ends with `when_pointer=... when_start_pointer=... when_end_pointer=...
at_pointer=... now_pointer=... when_token_pointer_right=... when_first_digit=...`.

    python benchmarks/pointer_diag.py --model DIR [--scenes 16] [--seed 1000000000] [--shift 0]
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from collections import Counter
from datetime import UTC, datetime

import numpy as np
import torch

from livelens.model.loading import checkpoint_meta, load_model
from livelens.model.prompt import PromptFormat
from livelens.model.qa import QuestionMaker
from livelens.model.scenes import VOCABULARY, VOCABULARY_INDEX, generate_scene
from livelens.model.training import (
    HELD_OUT_SEED,
    Clip,
    PointerProbe,
    clip_features,
    held_out_frames,
    pack,
    packed_embeds,
    packed_forward,
)

ROWS = ("when", "when start", "when end", "at", "now")


def scene_clip(seed: int, tokens_per_frame: int, shift: float = 0.0) -> Clip:
    """evaluate()'s held-out scene for `seed`, with WHEN, AT and NOW about every object; with
    `shift`, its media time starts at `shift` s (as if the stream had run that long)."""
    rng = random.Random(seed)
    scene = generate_scene(seed, duration=round(rng.uniform(10, 60), 1))
    times, grid, frames = held_out_frames(scene, tokens_per_frame)
    present = np.zeros((len(times), len(VOCABULARY)), np.float32)
    for i, t in enumerate(times):
        for obj in scene.visible_at(t):
            present[i, VOCABULARY_INDEX[obj.name]] = 1.0
    times = [t + shift for t in times]
    maker = QuestionMaker(scene, times, offset=-shift)
    names = [o.name for o in scene.objects]
    questions = [maker.when(n) for n in names]
    questions += [maker.at(n, rng.choice(times)) for n in names]
    questions += [maker.now(n) for n in names]
    unused = np.zeros((len(times), 1), np.int64)
    return Clip(frames, times, questions, 0.1, grid, unused, present)


MISSES = ("asked object", "another object", "no object")


def miss_kind(shown: np.ndarray, target: str) -> str:
    """What a wrongly pointed frame shows: the asked object (a wrong frame of one of its stays,
    or of a stay never asked about), only other objects (the wrong object), or nothing."""
    if shown[VOCABULARY_INDEX[target]]:
        return MISSES[0]
    return MISSES[1] if shown.any() else MISSES[2]


@torch.no_grad()
def diagnose(loaded, clip: Clip, counts: Counter, moment_head: int = 0) -> None:
    model, tokenizer = loaded.model, loaded.tokenizer
    video_id = int(model.config.video_token_id)
    eos_id = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    prompt = PromptFormat.from_tokenizer(tokenizer, video_id)
    packed = pack(clip, tokenizer, prompt, video_id, eos_id)
    probe = PointerProbe(
        model, layer=model.config.text_config.num_hidden_layers - 1, moment_head=moment_head
    )
    try:
        feats = clip_features(model, packed.patches, clip.grid, len(clip.times))
        embeds = packed_embeds(model, packed, feats, video_id)
        hidden = packed_forward(model, packed, embeds).last_hidden_state[0]
        rows = packed.pointer_queries
        predicted = model.lm_head(hidden[rows]).argmax(-1)
        weights = probe.attention_weights(packed)
    finally:
        probe.remove()
    # Attention summed per frame: a frame's label and visual tokens up to its last one.
    bounds = [0, *(packed.frame_last + 1).tolist()]
    per_frame = torch.stack([weights[:, a:b].sum(-1) for a, b in itertools.pairwise(bounds)], dim=1)
    pointed = per_frame.argmax(-1)
    right_frame = (pointed == packed.pointer_frames).tolist()
    right_token = (predicted == packed.targets[rows]).tolist()
    starts = packed.block_starts.tolist()
    seen: set[int] = set()
    ends = packed.pointer_ends.tolist()
    for row, point, token, end, frame in zip(
        rows.tolist(), right_frame, right_token, ends, pointed.tolist(), strict=True
    ):
        block = max(i for i, start in enumerate(starts) if start <= row)
        question = clip.questions[block]
        kind = question.kind.value
        # WHEN's rows: all its times, then the starts and the ends of stays apart.
        names = [kind, f"{kind} {'end' if end else 'start'}"] if kind == "when" else [kind]
        for name in names:
            counts[(name, "n")] += 1
            counts[(name, "pointer")] += point
            counts[(name, "token_n", point)] += 1
            counts[(name, "token", point)] += token
            if not point and question.target is not None:
                counts[(name, "miss", miss_kind(clip.present[frame], question.target))] += 1
        if block not in seen:  # the question's first pointed token
            seen.add(block)
            counts[(kind, "first_n")] += 1
            counts[(kind, "first")] += token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint (a path or a model spec)")
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--tokens-per-frame", type=int, help="default: the checkpoint's own")
    parser.add_argument(
        "--shift", type=float, default=0.0, help="media time of each scene's first frame (s)"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_model(args.model, device="cpu")
    tokens = args.tokens_per_frame or loaded.tokens_per_frame or 24
    # The head training supervised for moments (0 for checkpoints from before runs had one).
    moment_head = int(checkpoint_meta(loaded.path).get("train", {}).get("moment_head", 0))
    counts: Counter = Counter()
    for k in range(args.scenes):
        diagnose(loaded, scene_clip(args.seed + k, tokens, args.shift), counts, moment_head)

    def share(a, b) -> float:
        return counts[a] / counts[b] if counts[b] else float("nan")

    print(
        f"# {args.model}: {args.scenes} scenes from seed {args.seed}, first frame at "
        f"{args.shift:g} s, {datetime.now(UTC):%F}"
    )
    print("| kind | pointed tokens | pointer exact | token, pointer right | token, pointer wrong "
          "| first pointed token |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for row in ROWS:
        first = share((row, "first"), (row, "first_n")) if " " not in row else float("nan")
        print(
            f"| {row} | {counts[(row, 'n')]} | {share((row, 'pointer'), (row, 'n')):.2f}"
            f" | {share((row, 'token', True), (row, 'token_n', True)):.2f}"
            f" | {share((row, 'token', False), (row, 'token_n', False)):.2f}"
            f" | {first:.2f} |"
        )
    print()
    print("Wrong pointers: what the frame pointed at shows")
    print()
    print(f"| kind | wrong pointers | {' | '.join(MISSES)} |")
    print("|---|---:|---:|---:|---:|")
    for row in ROWS:
        misses = [counts[(row, "miss", m)] for m in MISSES]
        print(f"| {row} | {sum(misses)} | {' | '.join(str(m) for m in misses)} |")
    w, a, n = "when", "at", "now"
    s, e = "when start", "when end"
    print(
        f"when_pointer={share((w, 'pointer'), (w, 'n')):.3f} "
        f"when_start_pointer={share((s, 'pointer'), (s, 'n')):.3f} "
        f"when_end_pointer={share((e, 'pointer'), (e, 'n')):.3f} "
        f"at_pointer={share((a, 'pointer'), (a, 'n')):.3f} "
        f"now_pointer={share((n, 'pointer'), (n, 'n')):.3f} "
        f"when_token_pointer_right={share((w, 'token', True), (w, 'token_n', True)):.3f} "
        f"when_first_digit={share((w, 'first'), (w, 'first_n')):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
