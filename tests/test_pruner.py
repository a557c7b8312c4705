"""The per-session rolling buffer carries DiffFP across chunks and validates at construction."""

from __future__ import annotations

import pytest
import torch

from livelens.kernels.diffp import diffp_reference
from livelens.model.pruner import DiffFramePruner


def test_chunks_equal_one_call():
    frames = torch.randint(0, 256, (5, 28, 56, 3), dtype=torch.uint8)
    frames[3] = frames[2]  # an unchanged frame falls back to min_tokens
    whole = diffp_reference(frames, None, threshold=4.0)
    pruner = DiffFramePruner(threshold=4.0)
    parts = [pruner(frames[:2]), pruner(frames[2:3]), pruner(frames[3:])]
    torch.testing.assert_close(torch.cat([p.distance for p in parts]), whole.distance)
    assert torch.equal(torch.cat([p.keep for p in parts]), whole.keep)
    assert torch.equal(torch.cat([p.patches for p in parts]), whole.patches)


def test_buffer_is_a_copy_not_a_view():
    frames = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8)
    pruner = DiffFramePruner(threshold=0.0)
    pruner(frames)
    frames.zero_()  # the caller reuses its frame memory
    out = pruner(torch.zeros(1, 28, 28, 3, dtype=torch.uint8))
    assert out.distance.min() > 0


@pytest.mark.parametrize(("threshold", "min_tokens"), [(-1.0, 1), (float("nan"), 1), (0.1, -1)])
def test_bad_parameters_fail_at_construction(threshold, min_tokens):
    with pytest.raises(ValueError):
        DiffFramePruner(threshold=threshold, min_tokens=min_tokens)
