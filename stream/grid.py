"""The session's fixed per-frame grid, chosen once from the first frame; all frames fit it.

The size rule is the original VideoLLaMA3 image processor's (`simple_batched_resize` in
DAMO-NLP-SG/VideoLLaMA3 `videollama3/model/videollama3_encoder/image_processing_videollama3.py`,
the processor of the remote-code checkpoints): round each side to the 28 px unit, shrink to the
token budget, then enlarge any frame under `min_tokens` = 16 merged tokens, the minimum winning.
transformers' native `smart_resize` differs only where the budget would leave a frame under 16
tokens: it never applies its minimum after shrinking and keeps every side at least one unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import av
import numpy as np

# 16384 visual tokens over at most 180 frames in the original VideoLLaMA3 video setting.
DEFAULT_TOKENS_PER_FRAME = 91
# The original processor's min_tokens (4 x 4): smaller frames are enlarged to at least this many
# merged tokens. A per-frame budget below it could never be met, so it is refused.
MIN_TOKENS_PER_FRAME = 16

# Same bound as transformers' smart_resize; beyond it the frame is not a picture any more.
_MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class Grid:
    """Frame size in pixels after resizing; both sides are multiples of patch_size * merge_size."""

    height: int
    width: int
    patch_size: int = 14
    merge_size: int = 2

    def __post_init__(self) -> None:
        _check_positive_int("patch_size", self.patch_size)
        _check_positive_int("merge_size", self.merge_size)
        factor = self.patch_size * self.merge_size
        for name in ("height", "width"):
            value = getattr(self, name)
            _check_positive_int(name, value)
            if value % factor:
                raise ValueError(f"{name} must be a multiple of {factor}, got {value}")

    @property
    def patches_h(self) -> int:
        """ViT patches per column."""
        return self.height // self.patch_size

    @property
    def patches_w(self) -> int:
        """ViT patches per row."""
        return self.width // self.patch_size

    @property
    def tokens(self) -> int:
        """LLM tokens per frame before pruning: one per merge_size x merge_size block of patches."""
        factor = self.patch_size * self.merge_size
        return (self.height // factor) * (self.width // factor)


def choose_grid(
    height: int,
    width: int,
    *,
    tokens_per_frame: int = DEFAULT_TOKENS_PER_FRAME,
    patch_size: int = 14,
    merge_size: int = 2,
) -> Grid:
    """Pick the grid for a height x width source with the original VideoLLaMA3 resize rule.

    The budget is per frame (tokens_per_frame merged tokens), because a live stream has no total
    frame count to divide a budget by. Every frame gets at least MIN_TOKENS_PER_FRAME tokens; as
    in the original, that minimum wins over the budget when shrinking to the budget would leave
    fewer (thin frames, budgets near 16): a budget under 57 can then be exceeded, by a frame of
    at most 57 tokens (a 1:200 strip).
    """
    for name, value in (
        ("height", height),
        ("width", width),
        ("tokens_per_frame", tokens_per_frame),
        ("patch_size", patch_size),
        ("merge_size", merge_size),
    ):
        _check_positive_int(name, value)
    if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio must be at most {_MAX_ASPECT_RATIO}:1, got {width}x{height} pixels"
        )
    if tokens_per_frame < MIN_TOKENS_PER_FRAME:
        raise ValueError(
            f"tokens_per_frame must be >= {MIN_TOKENS_PER_FRAME} (VideoLLaMA3's per-frame "
            f"minimum), got {tokens_per_frame}"
        )
    factor = patch_size * merge_size
    h_bar, w_bar = _videollama3_resize(
        height,
        width,
        factor,
        min_pixels=MIN_TOKENS_PER_FRAME * factor**2,
        max_pixels=tokens_per_frame * factor**2,
    )
    return Grid(h_bar, w_bar, patch_size, merge_size)


def resize_to_grid(frame: av.VideoFrame, grid: Grid) -> np.ndarray:
    """Convert a decoded frame to contiguous uint8 RGB of shape (grid.height, grid.width, 3).

    One swscale call does colour conversion and scaling; bicubic, as the HF processors resize.
    """
    rgb = frame.to_ndarray(
        width=grid.width, height=grid.height, format="rgb24", interpolation="BICUBIC"
    )
    # swscale may pad rows for alignment, which PyAV exposes as a strided view.
    return np.ascontiguousarray(rgb)


def _videollama3_resize(
    height: int, width: int, factor: int, *, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """The original processor's size rule for one image (see the module docstring)."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        # A thin frame's short side may floor to 0 here; the minimum below restores it.
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    if h_bar * w_bar < min_pixels:  # not elif: the minimum wins over the budget
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
