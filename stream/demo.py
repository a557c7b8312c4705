"""`make demo`: the tiny grounding model on a scene it never saw.

A held-out generated scene (model/scenes.py, a seed above model/training.py's HELD_OUT_SEED, so
never trained on): a car park where a red ball comes and goes once, partly while a blue box is
there. `make demo` writes 24 s of it, asks "When is the red ball visible?" through `livelens
ask`'s own code, and prints the answer's segments, the ground truth and their IoU. The default
model is `tiny-grounding`; `--model` picks another.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from livelens.model.loading import TINY_GROUNDING, resolve_checkpoint
from livelens.model.qa import QuestionMaker
from livelens.model.scenes import Scene, generate_scene
from livelens.model.scoring import iou
from livelens.model.training import HELD_OUT_SEED
from livelens.stream import cli

# Seed and objects picked so the red ball's one stay (10.0-16.9 s) lies well inside the clip and
# overlaps a stay of the blue box, so the answer must tell the two apart.
DEMO_SEED = HELD_OUT_SEED + 1153
DEMO_OBJECTS = ("red ball", "blue box")
TARGET = "red ball"
ASK_SECONDS = 24.0
VIDEO_NAME = "demo-scene.mp4"


def demo_scene(duration: float) -> Scene:
    """The demo scene, `duration` seconds long (10 fps, 320x240, as training renders them)."""
    return generate_scene(
        DEMO_SEED, duration=duration, fps=10, size=(320, 240), objects=list(DEMO_OBJECTS)
    )


def demo_question(scene: Scene) -> str:
    """The question, in the exact wording of a model/qa.py template the model was trained on."""
    return QuestionMaker(scene, [0.0]).when(TARGET).question


def _json_spans(spans: Sequence[tuple[float, float]]) -> str:
    return json.dumps([{"start": round(a, 2), "end": round(b, 2)} for a, b in spans])


def ask_demo(model: str, *, device: str | None = None) -> int:
    """`make demo`: write the scene, ask about it as `livelens ask` does, score the answer."""
    resolve_checkpoint(model)  # a missing model fails before anything is printed
    scene = demo_scene(ASK_SECONDS)
    question = demo_question(scene)
    with tempfile.TemporaryDirectory(prefix="livelens-demo-") as tmp:
        video = scene.write(Path(tmp) / VIDEO_NAME)
        print(
            f"video: held-out generated scene {scene.seed} ({scene.family}: "
            f"{' and '.join(DEMO_OBJECTS)}), {scene.duration:g} s of H.264 at {scene.fps} fps, "
            f"{scene.width}x{scene.height}, made just now"
        )
        print(f"model: {model}")
        print(f"question: {question}")
        print("answer: ", end="", flush=True)
        argv = ["ask", str(video), question, "--model", model]
        if device is not None:
            argv += ["--device", device]
        result = cli.ask_file(cli.build_parser().parse_args(argv))
    qa = QuestionMaker(scene, result.times).when(TARGET)
    truth = [(span.start, span.end) for span in qa.truth]
    predicted = [(s.start, s.end) for s in result.answer.segments]
    print(f"truth: {_json_spans(truth)} (a perfect answer: {qa.answer})")
    print(f"iou: {iou(predicted, truth):.2f}")
    return 0


def make_scene(path: Path, *, seconds: int = 12, fps: int = 10, sensor_noise: float = 0.0) -> Path:
    """A static car park with a white van that drives in at 3 s and parks at 6 s (H.264 mp4).

    The first demo's hand-drawn clip; benchmarks/kept_ratio.py measures DiffFP on it.
    sensor_noise: std of per-frame Gaussian pixel noise, as a real camera sensor adds.
    """
    width, height = 448, 252
    rng = np.random.default_rng(0)
    ground = np.full((height, width, 3), (90, 90, 96), np.uint8)
    ground[height // 2 :, :, :] = (60, 62, 60)
    ground = np.clip(ground + rng.integers(-6, 7, ground.shape), 0, 255).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            t = i / fps
            frame = ground.copy()
            if sensor_noise:
                noise = rng.normal(0, sensor_noise, frame.shape)
                frame = np.clip(frame + noise, 0, 255).astype(np.uint8)
            if t >= 3:
                x = int(min(t - 3, 3) / 3 * 260)  # drives in for 3 s, then parks
                frame[140:200, x : x + 120] = (235, 235, 235)
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=TINY_GROUNDING,
        help=f"as for `livelens ask` (default {TINY_GROUNDING}, trained on generated scenes)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return cli.run_model_command(lambda: ask_demo(args.model, device=args.device))


if __name__ == "__main__":
    sys.exit(main())
