"""Per-session DiffFP state: the previous sampled frame, held on the model's device.

DiffFP compares each frame with the previous *sampled* frame, whatever chunk it arrived in, so
the last frame of every chunk is kept in a preallocated buffer for the next call.
"""

from __future__ import annotations

import torch

from livelens.kernels.diffp import DiffFPOutput, check_prune_params, diffp


class DiffFramePruner:
    """Normalizes, patchifies and DiffFP-masks frames of one stream, in arrival order."""

    def __init__(
        self,
        *,
        threshold: float = 0.1,
        min_tokens: int = 1,
        device: torch.device | str = "cpu",
        out_dtype: torch.dtype = torch.float32,
    ) -> None:
        check_prune_params(threshold, min_tokens)  # fail at session start, not on frame 1
        self.threshold = threshold
        self.min_tokens = min_tokens
        self.device = torch.device(device)
        self.out_dtype = out_dtype
        self._prev: torch.Tensor | None = None

    def __call__(self, frames: torch.Tensor) -> DiffFPOutput:
        """frames: uint8 (T, H, W, 3), already at the session grid."""
        frames = frames.to(self.device, non_blocking=True)
        out = diffp(
            frames,
            self._prev,
            threshold=self.threshold,
            min_tokens=self.min_tokens,
            out_dtype=self.out_dtype,
        )
        if self._prev is None:
            self._prev = torch.empty_like(frames[-1], memory_format=torch.contiguous_format)
        self._prev.copy_(frames[-1])
        return out
