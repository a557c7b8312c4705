"""`make demo` and `livelens serve --demo`: the tiny grounding model on a scene it never saw.

Both use one held-out generated scene (model/scenes.py, a seed above model/training.py's
HELD_OUT_SEED, so never trained on): a car park where a red ball comes and goes once, partly
while a blue box is there. `make demo` writes 24 s of it, asks "When is the red ball visible?"
through `livelens ask`'s own code, and prints the answer's segments, the ground truth and their
IoU. `serve --demo` writes 48 s of it and plays it in real time, in a loop, as the session
`demo`. The default model is `tiny-grounding` when installed (else the random `tiny`, with a
warning: it is not trained yet); `--model` picks another.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np

from livelens.model.loading import TINY_GROUNDING, demo_model, resolve_checkpoint
from livelens.model.qa import QuestionMaker
from livelens.model.scenes import Interval, Scene, generate_scene
from livelens.model.scoring import iou
from livelens.model.training import HELD_OUT_SEED
from livelens.stream import cli
from livelens.stream.protocol import PullRequest

if TYPE_CHECKING:
    from livelens.stream.live import LiveSession
    from livelens.stream.service import LiveService

logger = logging.getLogger(__name__)

# Seed and objects picked so the red ball's one stay lies well inside the clip at both lengths
# (24 s: 10.0-16.9 s; 48 s: 20.1-33.7 s) and overlaps a stay of the blue box, so the answer must
# tell the two apart. Same seed, other lengths: the stays scale with the duration.
DEMO_SEED = HELD_OUT_SEED + 1153
DEMO_OBJECTS = ("red ball", "blue box")
TARGET = "red ball"
ASK_SECONDS = 24.0
# One pass of the looping scene: as long as the longest clips the model was trained on (48 frames
# at 1 fps), so questions during the first pass stay within what it learned.
LOOP_SECONDS = 48.0
DEMO_SESSION = "demo"
"""The id of `serve --demo`'s session."""
VIDEO_NAME = "demo-scene.mp4"


def demo_scene(duration: float) -> Scene:
    """The demo scene, `duration` seconds long (10 fps, 320x240, as training renders them)."""
    return generate_scene(
        DEMO_SEED, duration=duration, fps=10, size=(320, 240), objects=list(DEMO_OBJECTS)
    )


def demo_question(scene: Scene) -> str:
    """The question, in the exact wording of a model/qa.py template the model was trained on."""
    return QuestionMaker(scene, [0.0]).when(TARGET).question


def loop_period(scene: Scene) -> float:
    """Seconds between passes of a looping scene: the pull source starts each pass one frame
    after the previous pass's last frame."""
    return scene.frame_count / scene.fps


def looped_truth(scene: Scene, until: float) -> list[Interval]:
    """The target's visible intervals over every pass of the loop up to media time `until`."""
    period = loop_period(scene)
    spans: list[Interval] = []
    start = 0.0
    while start <= until:
        for stay in scene.object(TARGET).visible:
            if start + stay.start <= until:
                spans.append(Interval(start + stay.start, min(start + stay.end, until)))
        start += period
    return spans


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


# ------------------------------------------------------------------------------- serve --demo
@dataclass(frozen=True)
class LoopVideo:
    """The looping scene of `serve --demo`, written to `path`."""

    scene: Scene
    path: Path

    async def publish(self, service: LiveService) -> LiveSession:
        """Open the session `demo`: the video played in real time, in a loop."""
        request = PullRequest(source=str(self.path), realtime=True, loop=True)
        session = await service.open_pull(request, session_id=DEMO_SESSION, operator=True)
        stays = ", ".join(f"{v.start:.1f}-{v.end:.1f} s" for v in self.scene.object(TARGET).visible)
        logger.info(
            "session %r: generated scene %d, repeating every %g s; ask %r (the %s is visible "
            "%s into each pass)",
            DEMO_SESSION,
            self.scene.seed,
            loop_period(self.scene),
            demo_question(self.scene),
            TARGET,
            stays,
        )
        return session


@contextlib.contextmanager
def loop_video() -> Iterator[LoopVideo]:
    """The looping demo scene written to a temporary directory, removed on exit."""
    scene = demo_scene(LOOP_SECONDS)
    with tempfile.TemporaryDirectory(prefix="livelens-demo-") as tmp:
        yield LoopVideo(scene, scene.write(Path(tmp) / VIDEO_NAME))


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
        default=None,
        help=f"as for `livelens ask` (default {TINY_GROUNDING}, trained on generated scenes, when "
        "installed; else the random-weight tiny)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    model = args.model or demo_model()
    return cli.run_model_command(lambda: ask_demo(model, device=args.device))


if __name__ == "__main__":
    sys.exit(main())
