"""The session grid: the original VideoLLaMA3 resize rule with a per-frame token budget (at
least 16 merged tokens per frame), and resizing."""

from __future__ import annotations

import av
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import smart_resize

from livelens.stream.grid import MIN_TOKENS_PER_FRAME, Grid, choose_grid, resize_to_grid

FACTOR = 28  # patch 14 x merge 2


def reference(height: int, width: int, tokens: int = 91, factor: int = FACTOR) -> tuple[int, int]:
    """transformers' smart_resize with the original's 16-token minimum. It agrees with the
    original rule except where shrinking to the budget leaves a frame under the minimum."""
    return smart_resize(
        height, width, factor=factor, min_pixels=16 * factor**2, max_pixels=tokens * factor**2
    )


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (720, 1280, (196, 336)),  # 84 tokens
        (1080, 1920, (196, 336)),
        (1920, 1080, (336, 196)),
        (480, 640, (224, 308)),  # 88 tokens
        (120, 160, (112, 168)),  # small frames are rounded, not upscaled to the budget
        (2160, 3840, (196, 336)),
        (28, 28, (112, 112)),  # under 16 merged tokens: enlarged to 16
        (1, 1, (112, 112)),
    ],
)
def test_common_sizes(height: int, width: int, expected: tuple[int, int]) -> None:
    grid = choose_grid(height, width)
    assert (grid.height, grid.width) == expected == reference(height, width)
    assert 16 <= grid.tokens <= 91


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        # 32 x 32 px rounds to 1 x 1 token; x sqrt(16 * 28^2 / 32^2) = x 3.5 -> 112 x 112 px.
        (32, 32, (112, 112)),
        # 56 x 84 px is 2 x 3 tokens; x 1.633 -> ceil(3.27) x ceil(4.90) = 4 x 5 tokens.
        (56, 84, (112, 140)),
        (10, 1000, (28, 1120)),  # 1 x 40: the short side gets one token, the long side the rest
    ],
)
def test_frames_under_16_tokens_are_enlarged(
    height: int, width: int, expected: tuple[int, int]
) -> None:
    grid = choose_grid(height, width)
    assert (grid.height, grid.width) == expected
    assert grid.tokens >= MIN_TOKENS_PER_FRAME == 16


def test_the_minimum_wins_over_the_budget() -> None:
    # Budget 16: 120 x 160 px shrinks to 3 x 4 = 12 tokens, then the minimum enlarges it to
    # 4 x 5 = 20 tokens, as the original processor does (it applies the minimum after the
    # budget). transformers' smart_resize stops at 12 tokens.
    assert reference(120, 160, tokens=16) == (84, 112)
    grid = choose_grid(120, 160, tokens_per_frame=16)
    assert (grid.height, grid.width) == (112, 140)
    assert grid.tokens == 20


@pytest.mark.parametrize(
    ("height", "width"),
    [(240, 320), (360, 640), (576, 720), (1024, 768), (10, 1000), (13, 13), (27, 29), (2000, 100)],
)
def test_matches_smart_resize(height: int, width: int) -> None:
    grid = choose_grid(height, width)
    assert (grid.height, grid.width) == reference(height, width)


@settings(max_examples=400, deadline=None)
@given(
    height=st.integers(1, 5000),
    width=st.integers(1, 5000),
    tokens=st.integers(16, 400),
)
def test_grid_within_budget_and_minimum(height: int, width: int, tokens: int) -> None:
    assume(max(height, width) / min(height, width) <= 200)
    grid = choose_grid(height, width, tokens_per_frame=tokens)
    assert grid.height % FACTOR == 0 and grid.width % FACTOR == 0
    # The minimum can exceed a small budget: at most ceil(sqrt(16 * 200)) = 57 tokens (1:200).
    assert 16 <= grid.tokens <= max(tokens, 57)
    ref_h, ref_w = reference(height, width, tokens)
    if 16 <= (ref_h // FACTOR) * (ref_w // FACTOR) <= tokens and min(ref_h, ref_w) > FACTOR:
        # smart_resize lifts a side shrunk to nothing to one unit; elsewhere the rules agree.
        assert (grid.height, grid.width) == (ref_h, ref_w)


def test_thin_frame() -> None:
    # The budget shrinks 20 x 3990 px to 0 x 134 tokens; the minimum then gives 1 x 57 (the
    # original's result). smart_resize keeps one row and gives 1 x 134, over the budget of 91.
    assert reference(20, 3990) == (28, 3752)
    grid = choose_grid(20, 3990)
    assert (grid.height, grid.width) == (28, 57 * 28)
    tall = choose_grid(3990, 20)
    assert (tall.height, tall.width) == (57 * 28, 28)


@pytest.mark.parametrize(("patch", "merge"), [(16, 1), (14, 1), (16, 2)])
def test_other_patch_and_merge_sizes(patch: int, merge: int) -> None:
    factor = patch * merge
    for height, width in [(720, 1280), (480, 640), (50, 70)]:
        grid = choose_grid(height, width, tokens_per_frame=256, patch_size=patch, merge_size=merge)
        assert (grid.height, grid.width) == reference(height, width, 256, factor)
        assert (grid.patch_size, grid.merge_size) == (patch, merge)


def test_grid_properties() -> None:
    grid = Grid(196, 336)
    assert (grid.patches_h, grid.patches_w, grid.tokens) == (14, 24, 84)
    assert Grid(64, 96, patch_size=16, merge_size=1).tokens == 4 * 6


@pytest.mark.parametrize(
    "kwargs",
    [
        {"height": 0, "width": 10},
        {"height": 10, "width": -1},
        {"height": 10.0, "width": 10},
        {"height": True, "width": 10},
        {"height": 10, "width": 10, "tokens_per_frame": 0},
        {"height": 10, "width": 10, "tokens_per_frame": 15},  # under VideoLLaMA3's minimum
        {"height": 10, "width": 10, "tokens_per_frame": 1.5},
        {"height": 10, "width": 10, "patch_size": 0},
        {"height": 10, "width": 10, "merge_size": -2},
        {"height": 1, "width": 201},  # aspect ratio over 200, as smart_resize refuses
    ],
)
def test_choose_grid_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        choose_grid(**kwargs)


@pytest.mark.parametrize(
    ("height", "width", "kwargs"),
    [(100, 112, {}), (112, 0, {}), (112, 112, {"patch_size": 0}), (32, 32, {"merge_size": 1})],
)
def test_grid_rejects(height: int, width: int, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Grid(height, width, **kwargs)


def gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    return img.round().astype(np.uint8)


@pytest.mark.parametrize(("height", "width"), [(121, 161), (480, 640), (30, 50)])
def test_resize_matches_pil_bicubic(height: int, width: int) -> None:
    img = gradient(height, width)
    grid = choose_grid(height, width)
    out = resize_to_grid(av.VideoFrame.from_ndarray(img, format="rgb24"), grid)
    assert out.shape == (grid.height, grid.width, 3)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    pil = np.asarray(Image.fromarray(img).resize((grid.width, grid.height), Image.BICUBIC))
    diff = np.abs(out.astype(np.int16) - pil.astype(np.int16))
    # swscale's and PIL's bicubic kernels differ slightly; on a smooth image both are close.
    assert diff.mean() < 1.0 and diff.max() <= 8


def test_resize_converts_yuv_to_rgb() -> None:
    img = np.zeros((120, 160, 3), np.uint8)
    img[:, :80] = (220, 30, 30)
    img[:, 80:] = (30, 30, 220)
    frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
    out = resize_to_grid(frame, Grid(56, 84))
    assert out.shape == (56, 84, 3)
    # Centres of the two halves keep their colours through YUV 4:2:0 and scaling.
    np.testing.assert_allclose(out[28, 20], (220, 30, 30), atol=6)
    np.testing.assert_allclose(out[28, 63], (30, 30, 220), atol=6)
