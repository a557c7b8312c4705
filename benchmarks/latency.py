"""Question latency vs stream length: streaming session vs re-running transformers offline.

For N in --frames (default 10, 100, 600) the script grows ONE streaming session to N frames and
times the first answer token (question prefill over the resident KV cache), then times the way
the original VideoLLaMA3 repo answers: one transformers forward over the whole prompt (vision
encoder on every frame + prefill of every token). Both run in the same process, side by side.

    python benchmarks/latency.py --model tiny               # CPU, offline test model
    python benchmarks/latency.py --arch 2b --device cuda    # real 2B architecture, random weights
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import UTC, datetime

import numpy as np
import torch

from livelens.model.engine import Engine, FrameCallbacks
from livelens.model.loading import LoadedModel, default_cache_dir, load_model
from livelens.model.runner import ModelRunner
from livelens.model.session import VideoSession
from livelens.stream.grid import Grid

QUESTION = "When did the white van enter the car park? Answer with start and end seconds."

VISION = (1152, 27, 16, 4304)  # hidden, layers, heads, intermediate
# Real VideoLLaMA3 sizes (architecture doc): Qwen2.5 text + SigLIP-style vision tower.
ARCHS = {
    # CPU stand-in: big enough that attention over the cache shows, small enough for 2 cores.
    "mini": dict(hidden=256, layers=4, heads=4, kv_heads=2, inter=768, vision=(128, 2, 2, 256)),
    "2b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, inter=8960, vision=VISION),
    "7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, inter=18944, vision=VISION),
}


def random_arch(name: str, device: str, layers: int | None = None) -> LoadedModel:
    """The real 2B/7B architecture with random weights and the tiny tokenizer (no download).

    `layers` cuts text and vision depth: per-layer widths (and so the weights-to-KV-attention
    balance that decides how TTFT grows with the stream) stay the real ones.
    """
    from transformers import Qwen2Config, VideoLlama3Config, VideoLlama3ForConditionalGeneration
    from transformers.models.video_llama_3.configuration_video_llama_3 import (
        VideoLlama3VisionConfig,
    )

    from livelens.model.tiny import build_tokenizer

    spec = ARCHS[name]
    tokenizer = build_tokenizer()
    text = Qwen2Config(
        vocab_size=151936,
        hidden_size=spec["hidden"],
        num_hidden_layers=layers or spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        intermediate_size=spec["inter"],
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    v_hidden, v_layers, v_heads, v_inter = spec["vision"]
    vision = VideoLlama3VisionConfig(
        hidden_size=v_hidden,
        intermediate_size=v_inter,
        num_hidden_layers=min(layers or v_layers, v_layers),
        num_attention_heads=v_heads,
        patch_size=14,
    )
    config = VideoLlama3Config(
        text_config=text,
        vision_config=vision,
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
    )
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = VideoLlama3ForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        ).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=f"random-{name}",
        path=default_cache_dir(),
        device=torch.device(device),
        dtype=dtype,
        video_token_id=config.video_token_id,
    )


def synthetic_frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Static noisy background with a moving box: DiffFP keeps the box, prunes the rest."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    frames = np.repeat(background[None], n, axis=0)
    box = max(8, height // 4)
    for i in range(n):
        y = (i * 7) % (height - box)
        x = (i * 11) % (width - box)
        frames[i, y : y + box, x : x + box] = (240, 240, 240)
    return frames


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_streaming(session: VideoSession, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        _sync(session.runner.device)
        start = time.perf_counter()
        session.question_logits(QUESTION)
        _sync(session.runner.device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_offline(
    loaded: LoadedModel, session: VideoSession, frames: np.ndarray, repeats: int
) -> float:
    """One whole-prompt transformers forward to the first token, as the original repo answers."""
    from livelens.kernels.diffp import diffp

    n = session.stats.frames
    batch = torch.from_numpy(frames[:n]).to(loaded.device)
    pruned = diffp(batch, None, threshold=session.pruner.threshold, out_dtype=loaded.dtype)
    text = session.prompt.full_prompt(session.times, session.kept_per_frame, QUESTION)
    ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    inputs = dict(
        input_ids=ids.to(loaded.device),
        pixel_values_videos=pruned.patches,
        video_grid_thw=torch.tensor([[n, session.gh, session.gw]], device=loaded.device),
        video_merge_sizes=torch.tensor([2], device=loaded.device),
        video_compression_mask=pruned.keep.flatten(),
    )
    samples = []
    for _ in range(repeats):
        _sync(loaded.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = loaded.model.model(**inputs, use_cache=False)
            loaded.model.lm_head(out.last_hidden_state[:, -1])
        _sync(loaded.device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def open_stream(
    engine: Engine,
    grid: Grid,
    threshold: float,
    *,
    key: str = "s",
    window_s: float | None = None,
    memory_s: float | None = None,
) -> str:
    """Open and configure one engine session the way the service does (min_tokens 1); a full
    context or pool is printed, not raised. Returns its key."""
    engine.open_session(key)
    engine.configure(
        key,
        height=grid.height,
        width=grid.width,
        threshold=threshold,
        min_tokens=1,
        callbacks=FrameCallbacks(lambda _: None, lambda exc: print(exc, file=sys.stderr)),
        window_s=window_s,
        memory_s=memory_s,
    )
    return key


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, or --arch (random weights) with --layers; --device."""
    parser.add_argument("--model", default="tiny", help="model spec for load_model")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="random-weight real architecture")
    parser.add_argument("--layers", type=int, help="with --arch: text/vision depth override")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    if args.arch:
        return random_arch(args.arch, args.device, args.layers)
    return load_model(args.model, device=args.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--frames", default="10,100,600")
    parser.add_argument("--height", type=int, default=112)
    parser.add_argument("--width", type=int, default=168)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-offline-above", type=int, default=10**9)
    args = parser.parse_args(argv)
    points = sorted(int(x) for x in args.frames.split(","))

    loaded = load_from_args(args)
    frames = synthetic_frames(points[-1], args.height, args.width)
    session = VideoSession(
        ModelRunner(loaded), height=args.height, width=args.width, threshold=args.threshold
    )
    session.append(frames[:1], [0.0])
    # Warm-up both paths (allocator, kernel selection) before anything is timed.
    time_streaming(session, 2)
    time_offline(loaded, session, frames, 2)

    rows = []
    for n in points:
        while session.stats.frames < n:
            start = session.stats.frames
            stop = min(n, start + args.chunk)
            session.append(frames[start:stop], [float(i) for i in range(start, stop)])
        streaming = time_streaming(session, args.repeats)
        offline = (
            time_offline(loaded, session, frames, max(1, args.repeats - 1))
            if n <= args.skip_offline_above
            else float("nan")
        )
        rows.append((n, session.stats.kv_tokens, streaming, offline))
        print(f"... {n} frames done", file=sys.stderr, flush=True)

    name = f"random-{args.arch}" if args.arch else args.model
    if args.arch and args.layers:
        name += f", {args.layers} layers"
    device = torch.cuda.get_device_name() if loaded.device.type == "cuda" else platform.processor()
    print(f"# Question latency vs stream length ({name}, {args.device}: {device or 'cpu'})")
    print(
        f"date {datetime.now(UTC):%Y-%m-%d}, torch {torch.__version__}, grid "
        f"{args.width}x{args.height} ({session.tokens_per_frame} tokens/frame before pruning), "
        f"threshold {args.threshold}, {torch.get_num_threads()} CPU threads"
    )
    print()
    print(
        "| frames | KV tokens | streaming TTFT ms | vs 10 | offline TTFT ms | vs 10 "
        "| offline / streaming |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    base_s, base_o = rows[0][2], rows[0][3]
    for n, kv, s, o in rows:
        print(
            f"| {n} | {kv} | {s * 1e3:.1f} | {s / base_s:.2f} | {o * 1e3:.1f} | "
            f"{o / base_o:.2f} | {o / s:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
