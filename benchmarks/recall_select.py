"""Which remembered frames a recalling question picks: the engine's rule against the mean rule.

A question about the past beyond the window is answered over the remembered frames that best
match it (model/engine.py `recall_scores`). This scores that choice alone, without the answer:
held-out generated scenes of 60 s with 3 objects, sampled at 1 fps through the live front end
(H.264, the session grid, DiffFP at the default threshold; the kept tokens' projected features,
as memory holds them), and for every object shown in some but not all frames the question
"When did the <object> first appear?". For each rule the frames are ranked and the share of the
top R that show the object is its R-precision (R = frames showing it).

- max: the engine's rule (per question token, the best cosine over the frame's tokens, summed);
- mean: the cosine between the frame's mean feature and the question's mean token embedding.

Ends with `max_rprec=<x> mean_rprec=<y> base_rate=<z> pairs=<n>` (base rate: the share of
frames that show the object, what a random pick scores).

    python benchmarks/recall_select.py --model DIR [--scenes 8] [--seed 1000000500]
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

import numpy as np
import torch
import torch.nn.functional as F

from livelens.model.engine import recall_scores
from livelens.model.loading import load_model
from livelens.model.pruner import DiffFramePruner
from livelens.model.scenes import generate_scene
from livelens.model.training import HELD_OUT_SEED, clip_features, held_out_frames


def mean_scores(frames: list[torch.Tensor], query: torch.Tensor) -> torch.Tensor:
    """The rule the engine used before: cosine of the mean vectors."""
    summaries = torch.stack([F.normalize(f.float().mean(0), dim=0) for f in frames])
    return summaries @ F.normalize(query.float().mean(0), dim=0)


def remembered(loaded, seed: int, tokens_per_frame: int):
    """A held-out 60 s scene at 1 fps: its times, each frame's kept features, the scene."""
    model = loaded.model
    scene = generate_scene(seed, duration=60.0, objects=3)
    times, grid, frames = held_out_frames(scene, tokens_per_frame)
    pruned = DiffFramePruner(threshold=0.1)(torch.from_numpy(frames))
    with torch.no_grad():
        features = clip_features(model, pruned.patches, grid, len(times))
    per_frame = features.view(len(times), -1, features.shape[-1])
    kept = [per_frame[i][pruned.keep[i]] for i in range(len(times))]
    return times, kept, scene


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint (a path or a model spec)")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED + 500)
    args = parser.parse_args(argv)
    loaded = load_model(args.model, device="cpu")
    tokens = loaded.tokens_per_frame or 24
    embed = loaded.model.get_input_embeddings()
    rules = {"max": recall_scores, "mean": mean_scores}
    rows, base = [], []
    for k in range(args.scenes):
        times, kept, scene = remembered(loaded, args.seed + k, tokens)
        for obj in scene.objects:
            shown = np.array([obj.visible_at(t) for t in times])
            if not 0 < shown.sum() < len(times):
                continue
            ids = loaded.tokenizer(
                f"When did the {obj.name} first appear?", add_special_tokens=False
            )["input_ids"]
            with torch.no_grad():
                query = embed(torch.tensor(ids))
            row = {"seed": args.seed + k, "object": obj.name, "shown": int(shown.sum())}
            for name, rule in rules.items():
                top = torch.argsort(rule(kept, query), descending=True)[: int(shown.sum())]
                row[name] = float(shown[top.numpy()].mean())
            rows.append(row)
            base.append(float(shown.mean()))
    print(f"# {args.model}: {args.scenes} scenes from seed {args.seed}, {datetime.now(UTC):%F}")
    print("| scene | object | frames showing it (of 60) | max | mean |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['seed']} | {row['object']} | {row['shown']} | {row['max']:.2f} "
              f"| {row['mean']:.2f} |")  # fmt: skip
    if not rows:
        print("no scene had an object shown in some frames only", file=sys.stderr)
        return 1
    print(
        f"max_rprec={np.mean([r['max'] for r in rows]):.3f} "
        f"mean_rprec={np.mean([r['mean'] for r in rows]):.3f} "
        f"base_rate={np.mean(base):.3f} pairs={len(rows)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
