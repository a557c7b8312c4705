"""Procedural camera scenes with ground truth: what the tiny grounding model learns from.

A scene is a static textured background (car park, corridor, field, conveyor) seen by a fixed
camera with sensor noise, plus 1-3 objects from a small vocabulary (shape x colour) that appear,
move, stop and leave, some of them twice. Everything, the pixels included, follows from one seed;
the ground truth (when each object is visible, when it moves) is data on the `Scene`.

`generate_scene(seed)` draws a scene; `Scene.frame(t)` renders one moment, `Scene.frames()` every
frame at the scene's rate, `Scene.write(path)` encodes it (H.264 or VP8) through PyAV.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SHAPES = ("ball", "box", "car", "person")
COLOURS = {
    "red": (214, 38, 32),
    "blue": (36, 72, 222),
    "green": (40, 196, 64),
    "yellow": (238, 214, 34),
    "white": (244, 244, 244),
}
FAMILIES = ("car-park", "corridor", "field", "conveyor")
SIZES = ((320, 240), (480, 360), (640, 360), (640, 480), (854, 480), (1280, 720))

# A part of an object outside the picture does not count: it is visible while at least this share
# of its box is inside the frame (objects enter and leave within a fraction of a second).
_VISIBLE_SHARE = 0.5
# Shortest visible interval and gap (s): a sampled model at 0.5 fps still sees each of them.
_MIN_VISIBLE = 4.0
_MIN_GAP = 3.0
# Half the time (s) an object takes to cross the frame edge when entering or leaving.
_EDGE = 0.2
# Extra rows and columns of the noise bank: frames take windows of it at random offsets.
_NOISE_PAD = 61


@dataclass(frozen=True)
class Interval:
    """A closed span of media seconds."""

    start: float
    end: float

    def __contains__(self, t: float) -> bool:
        return self.start <= t <= self.end

    @property
    def length(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class _Keyframe:
    t: float
    x: float
    """Centre, in units of the frame width (may lie outside [0, 1] while entering or leaving)."""
    y: float
    """Centre, in units of the frame height."""


@dataclass(frozen=True)
class Occurrence:
    """One stay of an object: the path it follows, and when it is visible and moving."""

    path: tuple[_Keyframe, ...]
    visible: Interval
    moving: tuple[Interval, ...]

    def position(self, t: float) -> tuple[float, float] | None:
        """Centre at media time t, or None outside the path."""
        path = self.path
        if not path[0].t <= t <= path[-1].t:
            return None
        for a, b in itertools.pairwise(path):
            if a.t <= t <= b.t:
                w = 0.0 if b.t == a.t else (t - a.t) / (b.t - a.t)
                return a.x + w * (b.x - a.x), a.y + w * (b.y - a.y)
        return path[-1].x, path[-1].y


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: float
    """Height of the object's box in units of the frame height."""
    occurrences: tuple[Occurrence, ...]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def visible(self) -> tuple[Interval, ...]:
        return tuple(o.visible for o in self.occurrences)

    @property
    def moving(self) -> tuple[Interval, ...]:
        return tuple(m for o in self.occurrences for m in o.moving)

    def visible_at(self, t: float) -> bool:
        return any(t in v for v in self.visible)


@dataclass(frozen=True)
class Scene:
    """A generated scene: its settings, its objects' ground truth, and a renderer."""

    seed: int
    family: str
    width: int
    height: int
    fps: int
    duration: float
    noise: float
    """Standard deviation of the per-frame sensor noise, in 8-bit levels."""
    objects: tuple[SceneObject, ...]
    _background: np.ndarray = field(repr=False, compare=False)
    _noise_cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------- ground truth
    def object(self, name: str) -> SceneObject | None:
        return next((o for o in self.objects if o.name == name), None)

    def visible_at(self, t: float) -> list[SceneObject]:
        """Objects visible at media time t, in vocabulary order."""
        return sorted((o for o in self.objects if o.visible_at(t)), key=vocabulary_index)

    @property
    def frame_count(self) -> int:
        return round(self.duration * self.fps)

    def frame_times(self) -> list[float]:
        return [i / self.fps for i in range(self.frame_count)]

    def ground_truth(self) -> dict:
        """The ground truth as plain data (JSON-ready)."""
        return {
            "seed": self.seed,
            "family": self.family,
            "size": [self.width, self.height],
            "fps": self.fps,
            "duration": self.duration,
            "objects": [
                {
                    "name": o.name,
                    "visible": [[v.start, v.end] for v in o.visible],
                    "moving": [[m.start, m.end] for m in o.moving],
                }
                for o in self.objects
            ],
        }

    def boxes(self, t: float) -> list[tuple[SceneObject, tuple[float, float, float, float]]]:
        """Objects drawn at media time t with their boxes (x0, y0, x1, y1) in pixels, in drawing
        order (later ones on top); boxes may extend past the frame while entering or leaving."""
        out = []
        for obj in sorted(self.objects, key=lambda o: o.size):
            for occ in obj.occurrences:
                centre = occ.position(t)
                if centre is not None:
                    out.append((obj, _box(obj, centre, self.width, self.height)))
        return out

    # ---------------------------------------------------------------- pixels
    def _noise(self, rng: np.random.Generator) -> np.ndarray:
        """This frame's sensor noise: a random window of the scene's noise bank, random sign."""
        bank = self._noise_cache.get("bank")
        if bank is None:
            bank = self._noise_cache["bank"] = _noise_bank(self.seed, self.height, self.width)
        dy, dx = (int(v) for v in rng.integers(0, _NOISE_PAD, 2))
        sign = self.noise if rng.random() < 0.5 else -self.noise
        window = bank[dy : dy + self.height, dx : dx + self.width]
        return np.rint(window * sign).astype(np.int16)

    def frame(self, t: float, *, index: int | None = None) -> np.ndarray:
        """The picture at media time t: uint8 (height, width, 3), before compression.

        `index` seeds the sensor noise (default: the frame number at the scene's rate), so the
        same moment always renders the same pixels.
        """
        image = self._background.astype(np.int16)
        for obj, box in self.boxes(t):  # small ones drawn last, on top
            _draw(image, obj, box)
        index = round(t * self.fps) if index is None else index
        rng = np.random.default_rng((self.seed, index))
        if self.noise > 0:
            image += self._noise(rng)
        image += int(rng.integers(-3, 4))  # exposure flicker
        return np.clip(image, 0, 255).astype(np.uint8)

    def frames(self) -> Iterator[tuple[float, np.ndarray]]:
        for i, t in enumerate(self.frame_times()):
            yield t, self.frame(t, index=i)

    def write(self, path: str | Path, *, codec: str = "h264", crf: int = 23) -> Path:
        """Encode the scene at its own rate: H.264 in .mp4/.mkv, or VP8 in .webm/.mkv."""
        path = Path(path)
        encoder = {"h264": "libx264", "vp8": "libvpx"}.get(codec)
        if encoder is None:
            raise ValueError(f"codec must be 'h264' or 'vp8', got {codec!r}")
        with av.open(str(path), "w") as container:
            stream = container.add_stream(encoder, rate=Fraction(self.fps))
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
            if codec == "h264":
                stream.options = {"crf": str(crf), "preset": "veryfast"}
            else:
                stream.options = {"crf": str(crf), "b": "1M", "deadline": "realtime"}
            for _, image in self.frames():
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        return path


VOCABULARY = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)
"""Every object name the generator draws, in a fixed order ("red ball", "blue ball", ...)."""
VOCABULARY_INDEX = {name: i for i, name in enumerate(VOCABULARY)}


def vocabulary() -> list[str]:
    return list(VOCABULARY)


def vocabulary_index(obj: SceneObject) -> int:
    return VOCABULARY_INDEX[obj.name]


# --------------------------------------------------------------------------- generation
def generate_scene(
    seed: int,
    *,
    duration: float | None = None,
    fps: int | None = None,
    size: tuple[int, int] | None = None,
    family: str | None = None,
    objects: int | Sequence[str] | None = None,
    noise: float | None = None,
) -> Scene:
    """Draw a scene from `seed`; any argument given fixes that property instead.

    objects: a count (1-3) or the names to use ("red ball", ...). Defaults: 10 s to 5 min
    (most under a minute), 10-30 fps, one of SIZES, noise 1-6 levels.
    """
    rng = np.random.default_rng(seed)
    if duration is None:
        duration = float(
            rng.choice([rng.uniform(10, 60), rng.uniform(60, 300)], p=[0.8, 0.2]).round(1)
        )
    if not 10 <= duration <= 300:
        raise ValueError(f"duration must be within [10, 300] s, got {duration}")
    fps = int(rng.choice([10, 15, 25, 30])) if fps is None else fps
    if not 1 <= fps <= 60:
        raise ValueError(f"fps must be within [1, 60], got {fps}")
    width, height = SIZES[int(rng.integers(len(SIZES)))] if size is None else size
    family = FAMILIES[int(rng.integers(len(FAMILIES)))] if family is None else family
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    noise = float(rng.uniform(1, 6)) if noise is None else noise

    names = vocabulary()
    if objects is None:
        objects = int(rng.integers(1, 4))
    if isinstance(objects, int):
        if not 1 <= objects <= 3:
            raise ValueError(f"a scene has 1 to 3 objects, got {objects}")
        picked: list[str] = []
        while len(picked) < objects:  # one colour per shape and per scene keeps names unique
            name = names[int(rng.integers(len(names)))]
            if all(p.split()[0] != name.split()[0] for p in picked):
                picked.append(name)
    else:
        picked = list(objects)
        unknown = [n for n in picked if n not in names]
        if unknown or not 1 <= len(picked) <= 3 or len(set(picked)) != len(picked):
            raise ValueError(f"objects must be 1-3 distinct names from the vocabulary: {picked}")

    built = tuple(_place_object(rng, name, duration) for name in picked)
    background = _background(np.random.default_rng((seed, 1 << 20)), family, width, height)
    return Scene(
        seed=seed,
        family=family,
        width=int(width),
        height=int(height),
        fps=int(fps),
        duration=float(duration),
        noise=noise,
        objects=built,
        _background=background,
    )


def _place_object(rng: np.random.Generator, name: str, duration: float) -> SceneObject:
    colour, shape = name.split()
    size = float(rng.uniform(0.22, 0.36)) if shape != "person" else float(rng.uniform(0.38, 0.5))
    twice = duration >= 2 * _MIN_VISIBLE + _MIN_GAP + 2 and rng.random() < 0.3
    stays = _stays(rng, duration, 2 if twice else 1)
    occurrences = tuple(_occurrence(rng, shape, size, a, b) for a, b in stays)
    return SceneObject(shape=shape, colour=colour, size=size, occurrences=occurrences)


def _stays(rng: np.random.Generator, duration: float, count: int) -> list[tuple[float, float]]:
    """`count` disjoint visible intervals inside [0, duration], each >= _MIN_VISIBLE long."""
    while True:
        cuts = np.sort(rng.uniform(0, duration, 2 * count))
        # Often present from the very start or until the end, as in real footage.
        if rng.random() < 0.15:
            cuts[0] = 0.0
        if rng.random() < 0.15:
            cuts[-1] = duration
        stays = [(float(cuts[2 * i]), float(cuts[2 * i + 1])) for i in range(count)]
        long_enough = all(b - a >= _MIN_VISIBLE for a, b in stays)
        apart = all(stays[i + 1][0] - stays[i][1] >= _MIN_GAP for i in range(count - 1))
        if long_enough and apart:
            return [(round(a, 2), round(b, 2)) for a, b in stays]


def _occurrence(
    rng: np.random.Generator, shape: str, size: float, start: float, end: float
) -> Occurrence:
    """A path visible exactly during [start, end]: enters or pops in, moves and stops, leaves.

    Entering and leaving cross the frame edge in 2 * _EDGE seconds, symmetric about the edge, so
    the visible share passes 50% exactly at `start` / `end`.
    """
    # Half the box width in frame widths, for the narrowest frame drawn (4:3).
    half_w = _aspect(shape) * size / 2 * 0.75
    margin = half_w + 0.02
    y = float(rng.uniform(0.3, 0.75))
    enters = start > 0 and rng.random() < 0.5
    leaves = rng.random() < 0.5
    keys: list[_Keyframe] = []
    moving: list[Interval] = []
    if enters:
        side = -1.0 if rng.random() < 0.5 else 1.0  # -1: from the left edge
        edge = 0.5 + side * 0.5
        keys.append(_Keyframe(start - _EDGE, edge + side * margin, y))
        keys.append(_Keyframe(start + _EDGE, edge - side * margin, y))
        moving.append(Interval(start, round(start + _EDGE, 2)))
    else:
        keys.append(_Keyframe(start, float(rng.uniform(margin, 1 - margin)), y))
    # Before leaving, a walk to the edge it leaves by.
    walk = float(rng.uniform(1.0, 3.0)) if leaves else 0.0
    settle = end - _EDGE - walk if leaves else end
    t = keys[-1].t
    while t < settle - 1.0:
        t = min(t + float(rng.uniform(1.0, 6.0)), settle)  # stop
        keys.append(_Keyframe(t, keys[-1].x, keys[-1].y))
        if t >= settle - 1.0:
            break
        t_move = min(t + float(rng.uniform(1.0, 4.0)), settle)
        nx = float(np.clip(keys[-1].x + rng.uniform(-0.4, 0.4), margin, 1 - margin))
        ny = float(np.clip(keys[-1].y + rng.uniform(-0.1, 0.1), 0.3, 0.75))
        keys.append(_Keyframe(t_move, nx, ny))
        moving.append(Interval(round(t, 2), round(t_move, 2)))
        t = t_move
    if keys[-1].t < settle:
        keys.append(_Keyframe(settle, keys[-1].x, keys[-1].y))
    if leaves:
        side = -1.0 if keys[-1].x < 0.5 else 1.0
        edge = 0.5 + side * 0.5
        if walk > 0 and settle > keys[0].t:
            keys.append(_Keyframe(end - _EDGE, edge - side * margin, keys[-1].y))
            moving.append(Interval(round(settle, 2), end))
        keys.append(_Keyframe(end + _EDGE, edge + side * margin, keys[-1].y))
        moving.append(Interval(round(end - _EDGE, 2), end))
    return Occurrence(path=tuple(keys), visible=Interval(start, end), moving=_merge(moving))


def _merge(intervals: list[Interval]) -> tuple[Interval, ...]:
    out: list[Interval] = []
    for iv in sorted(intervals, key=lambda i: i.start):
        if out and iv.start <= out[-1].end:
            out[-1] = Interval(out[-1].start, max(out[-1].end, iv.end))
        else:
            out.append(iv)
    return tuple(out)


# ------------------------------------------------------------------------------ drawing
def _aspect(shape: str) -> float:
    """Box width over height."""
    return {"ball": 1.0, "box": 1.0, "car": 2.0, "person": 0.42}[shape]


def _box(
    obj: SceneObject, centre: tuple[float, float], width: int, height: int
) -> tuple[float, float, float, float]:
    h = obj.size * height
    w = _aspect(obj.shape) * h
    cx, cy = centre[0] * width, centre[1] * height
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _draw(image: np.ndarray, obj: SceneObject, box: tuple[float, float, float, float]) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    colour = np.array(COLOURS[obj.colour], np.int16)
    dark = colour // 3
    if obj.shape == "ball":
        _ellipse(image, cx, cy, w / 2, h / 2, colour)
        _ellipse(
            image, cx - w * 0.15, cy - h * 0.15, w * 0.12, h * 0.12, np.minimum(colour + 60, 255)
        )
    elif obj.shape == "box":
        _rect(image, x0, y0, x0 + w, y0 + h, dark)
        _rect(image, x0 + w * 0.08, y0 + h * 0.08, x0 + w * 0.92, y0 + h * 0.92, colour)
        _rect(image, x0 + w * 0.45, y0 + h * 0.08, x0 + w * 0.55, y0 + h * 0.92, dark)
    elif obj.shape == "car":
        _rect(image, x0, y0 + h * 0.4, x0 + w, y0 + h * 0.85, colour)
        _rect(image, x0 + w * 0.22, y0 + h * 0.05, x0 + w * 0.72, y0 + h * 0.45, colour)
        _rect(image, x0 + w * 0.28, y0 + h * 0.12, x0 + w * 0.66, y0 + h * 0.4, (70, 90, 110))
        for wx in (0.22, 0.78):
            _ellipse(image, x0 + w * wx, y0 + h * 0.85, h * 0.16, h * 0.16, (20, 20, 20))
    else:  # person: head, torso, legs
        _ellipse(image, cx, y0 + h * 0.1, w * 0.28, h * 0.1, (224, 182, 150))
        _rect(image, x0 + w * 0.1, y0 + h * 0.21, x0 + w * 0.9, y0 + h * 0.6, colour)
        _rect(image, x0 + w * 0.15, y0 + h * 0.6, x0 + w * 0.45, y0 + h, dark)
        _rect(image, x0 + w * 0.55, y0 + h * 0.6, x0 + w * 0.85, y0 + h, dark)


def _rect(image: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour) -> None:
    height, width = image.shape[:2]
    ya, yb = max(0, round(y0)), min(height, round(y1))
    xa, xb = max(0, round(x0)), min(width, round(x1))
    if ya < yb and xa < xb:
        image[ya:yb, xa:xb] = colour


def _ellipse(image: np.ndarray, cx: float, cy: float, rx: float, ry: float, colour) -> None:
    height, width = image.shape[:2]
    ya, yb = max(0, math.floor(cy - ry)), min(height, math.ceil(cy + ry) + 1)
    xa, xb = max(0, math.floor(cx - rx)), min(width, math.ceil(cx + rx) + 1)
    if ya >= yb or xa >= xb:
        return
    yy, xx = np.ogrid[ya:yb, xa:xb]
    inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    image[ya:yb, xa:xb][inside] = colour


def _noise_bank(seed: int, height: int, width: int) -> np.ndarray:
    """Unit Gaussian read noise, luma plus weaker chroma (correlated across channels, as after
    demosaicing), larger than the frame so each frame takes its own window of it."""
    rng = np.random.default_rng((seed, 2 << 20))
    shape = (height + _NOISE_PAD, width + _NOISE_PAD)
    luma = rng.standard_normal((*shape, 1), dtype=np.float32)
    chroma = rng.standard_normal((*shape, 3), dtype=np.float32)
    return luma + 0.5 * chroma


def _background(rng: np.random.Generator, family: str, width: int, height: int) -> np.ndarray:
    """A static textured background of one family, with per-seed colours and layout."""
    jitter = rng.integers(-12, 13, 3)
    image = np.empty((height, width, 3), np.int16)
    horizon = int(height * rng.uniform(0.25, 0.4))
    if family == "car-park":
        image[:] = np.array((96, 96, 102)) + jitter
        image[:horizon] = np.array((150, 160, 172)) + jitter  # building wall
        spacing = int(width * rng.uniform(0.12, 0.2))
        for x in range(int(rng.integers(0, spacing)), width, spacing):
            image[horizon + height // 10 :, x : x + max(2, width // 160)] = (225, 225, 215)
    elif family == "corridor":
        image[:] = np.array((170, 160, 140)) + jitter  # walls
        floor = np.array((120, 104, 86)) + jitter
        for y in range(horizon, height):
            inset = int((height - y) / (height - horizon) * width * 0.3)
            image[y, inset : width - inset] = floor
        for x in range(int(width * 0.08), width, int(width * rng.uniform(0.2, 0.3))):
            image[int(height * 0.08) : horizon, x : x + width // 14] = (110, 88, 70)  # doors
    elif family == "field":
        image[:] = np.array((86, 118, 70)) + jitter  # muted grass
        image[:horizon] = np.array((150, 180, 205)) + jitter  # sky
        stripe = int(width * rng.uniform(0.08, 0.14))
        for x in range(0, width, 2 * stripe):
            image[horizon:, x : x + stripe] += 10
    else:  # conveyor
        image[:] = np.array((128, 132, 138)) + jitter  # machine housing
        top, bottom = int(height * 0.3), int(height * 0.85)
        image[top:bottom] = np.array((46, 46, 50)) + jitter  # belt
        pitch = int(width * rng.uniform(0.05, 0.09))
        for x in range(int(rng.integers(0, pitch)), width, pitch):
            image[top:bottom, x : x + max(2, width // 200)] = (70, 70, 74)  # belt seams
    texture = rng.normal(0, 5, (height // 8 + 1, width // 8 + 1, 1))
    texture = np.repeat(np.repeat(texture, 8, axis=0), 8, axis=1)[:height, :width]
    grain = rng.normal(0, 3, (height, width, 1))
    return np.clip(image + texture + grain, 0, 255).astype(np.int16)
