"""DiffFP: Triton kernel (interpreted on CPU) == torch reference == transformers' VideoLLaMA3."""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import (
    VideoLlama3ImageProcessorPil,
)

from livelens.kernels import diffp as diffp_module
from livelens.kernels.diffp import DiffFPOutput, diffp, diffp_reference, diffp_triton

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _frames(num: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num, height, width, 3), dtype=torch.uint8, generator=gen)


def _noisy_sequence(num: int, height: int, width: int, cell: int, seed: int = 0) -> torch.Tensor:
    """One image plus per-frame noise whose amplitude (0..4) varies per cell x cell block.

    DiffFP distances then spread around the thresholds that matter (0.1 and 4) instead of all
    being ~170 as for independent random frames.
    """
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(8, 248, (1, height, width, 3), generator=gen)
    amp = torch.randint(0, 5, (num, height // cell, width // cell, 1), generator=gen)
    amp = amp.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    noise = torch.rand((num, height, width, 3), generator=gen) * 2 - 1
    return (base + (noise * amp).round()).to(torch.uint8)


def _assert_same(got: DiffFPOutput, want: DiffFPOutput, threshold: float) -> None:
    """Kernel vs reference: exact patches, close distances, keep equal away from the threshold."""
    if got.patches.dtype == torch.bfloat16 and diffp_module._interpreting():
        # Triton's CPU interpreter truncates fp32 -> bf16 (compiled kernels round to nearest even,
        # cvt.rn.bf16.f32, which the gpu test checks exactly): allow that one bf16 ulp here.
        torch.testing.assert_close(got.patches, want.patches, rtol=2**-7, atol=0)
    else:
        # Both compute fp32(u8) - mean, then one IEEE-rounded division (div_rn in Triton) and
        # a round-to-nearest cast: bit-identical, so any tolerance would only hide bugs.
        torch.testing.assert_close(got.patches, want.patches, rtol=0, atol=0)
    # Distances sum 3*p*p*m*m terms in a different order: a few fp32 ulps apart.
    torch.testing.assert_close(got.distance, want.distance, rtol=1e-5, atol=1e-5)
    assert got.keep.shape == want.keep.shape and got.keep.dtype == torch.bool
    decided = (want.distance - threshold).abs() >= 1e-4
    assert torch.equal(got.keep[decided], want.keep[decided])


# --- Triton kernel (interpreter on CPU) vs reference -------------------------------------------


@pytest.mark.parametrize(
    ("num", "with_prev"), [(1, False), (1, True), (3, False), (4, True)], ids=str
)
def test_triton_matches_reference_videollama3_shape(num: int, with_prev: bool) -> None:
    # 84 x 140 px = 3 x 5 merged tokens: an odd token grid, patch 14 / merge 2 as in the model.
    sequence = _noisy_sequence(num + 1, 84, 140, cell=14, seed=num)
    frames, prev = sequence[1:], (sequence[0] if with_prev else None)
    want = diffp_reference(frames, prev, threshold=4.0)
    got = diffp_triton(frames, prev, threshold=4.0)
    _assert_same(got, want, threshold=4.0)
    assert got.patches.shape == (num * 6 * 10, 3 * 14 * 14)
    assert got.distance.shape == (num, 15)
    assert bool(torch.isinf(got.distance[0]).all()) is not with_prev
    compared = want.keep[0 if with_prev else 1 :]  # frames that have a predecessor
    if compared.numel():
        assert 0 < int(compared.sum()) < compared.numel()


@pytest.mark.parametrize(
    ("patch_size", "merge_size", "height", "width"),
    [(3, 2, 18, 30), (5, 1, 15, 35), (2, 3, 12, 30), (7, 2, 28, 42)],
    ids=str,
)
def test_triton_matches_reference_other_patch_sizes(
    patch_size: int, merge_size: int, height: int, width: int
) -> None:
    # Patch widths that are not powers of two exercise the masked lanes of BLOCK_P and BLOCK_R.
    frames = _noisy_sequence(3, height, width, cell=patch_size * merge_size, seed=patch_size)
    prev = _frames(1, height, width, seed=7)[0]
    kwargs = {"patch_size": patch_size, "merge_size": merge_size, "threshold": 4.0}
    kwargs |= {"min_tokens": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
    _assert_same(diffp_triton(frames, prev, **kwargs), diffp_reference(frames, prev, **kwargs), 4.0)


def test_triton_matches_reference_bfloat16_and_threshold_ties() -> None:
    frames = _frames(3, 56, 84, seed=3)
    want = diffp_reference(frames, out_dtype=torch.bfloat16)
    # A threshold equal to a real distance: the tie rule (keep only if strictly greater) matters.
    threshold = float(want.distance[1:].median())
    want = diffp_reference(frames, threshold=threshold, out_dtype=torch.bfloat16)
    got = diffp_triton(frames, threshold=threshold, out_dtype=torch.bfloat16)
    assert got.patches.dtype == torch.bfloat16
    _assert_same(got, want, threshold)
    assert 0 < int(want.keep[1:].sum()) < want.keep[1:].numel()


def test_chunks_carrying_prev_equal_one_call() -> None:
    frames = _noisy_sequence(5, 56, 84, cell=28, seed=5)
    kwargs = {"threshold": 4.0, "min_tokens": 1}
    for run in (diffp_reference, diffp_triton):
        whole = run(frames, **kwargs)
        head = run(frames[0:2], **kwargs)
        tail = run(frames[2:5], frames[1], **kwargs)
        torch.testing.assert_close(torch.cat([head.patches, tail.patches]), whole.patches)
        torch.testing.assert_close(torch.cat([head.distance, tail.distance]), whole.distance)
        assert torch.equal(torch.cat([head.keep, tail.keep]), whole.keep)
    assert torch.isinf(whole.distance[0]).all() and torch.isfinite(whole.distance[1:]).all()
    assert 0 < int(whole.keep[1:].sum()) < whole.keep[1:].numel()


def test_strided_views_match_contiguous_inputs() -> None:
    frames = _noisy_sequence(3, 28, 56, cell=14, seed=11)
    prev = _frames(1, 28, 56, seed=12)[0]
    want = diffp_reference(frames, prev, threshold=4.0)
    # A crop of wider frames, every other frame of a longer clip, a channel-planar buffer seen as
    # HWC, and a prev that is itself a crop: all views, no copies.
    wide = torch.zeros(3, 28, 70, 3, dtype=torch.uint8)
    wide[:, :, 9:65] = frames
    every_other = torch.zeros(6, 28, 56, 3, dtype=torch.uint8)
    every_other[::2] = frames
    planar = frames.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    wide_prev = torch.zeros(28, 60, 3, dtype=torch.uint8)
    wide_prev[:, 4:] = prev
    views = [(wide[:, :, 9:65], prev), (every_other[::2], prev), (planar, wide_prev[:, 4:])]
    for view, prev_view in views:
        assert not view.is_contiguous() or not prev_view.is_contiguous()
        _assert_same(diffp_triton(view, prev_view, threshold=4.0), want, 4.0)
        _assert_same(diffp_reference(view, prev_view, threshold=4.0), want, 4.0)


# --- Input validation ---------------------------------------------------------------------------

_GOOD = _frames(2, 28, 56)
_BAD_CALLS: list[tuple[str, tuple, dict, str]] = [
    ("float frames", (_GOOD.float(),), {}, "uint8"),
    ("rank 3 frames", (_GOOD[0],), {}, r"\(T, H, W, 3\)"),
    ("4 channels", (torch.zeros(1, 28, 28, 4, dtype=torch.uint8),), {}, r"\(T, H, W, 3\)"),
    ("no frames", (_GOOD[:0],), {}, "at least one frame"),
    ("height 42", (torch.zeros(1, 42, 56, 3, dtype=torch.uint8),), {}, "multiple of"),
    ("width 30", (torch.zeros(1, 28, 30, 3, dtype=torch.uint8),), {}, "multiple of"),
    ("prev shape", (_GOOD, _GOOD[0, :, :28]), {}, "prev must have"),
    ("prev dtype", (_GOOD, _GOOD[0].float()), {}, "prev must be uint8"),
    ("negative threshold", (_GOOD,), {"threshold": -0.1}, "threshold"),
    ("nan threshold", (_GOOD,), {"threshold": math.nan}, "threshold"),
    ("inf threshold", (_GOOD,), {"threshold": math.inf}, "threshold"),
    ("negative min_tokens", (_GOOD,), {"min_tokens": -1}, "min_tokens"),
    ("float min_tokens", (_GOOD,), {"min_tokens": 1.5}, "min_tokens"),
    ("zero std", (_GOOD,), {"image_std": (0.5, 0.0, 0.5)}, "image_std"),
    ("int out_dtype", (_GOOD,), {"out_dtype": torch.int32}, "out_dtype"),
]


@pytest.mark.parametrize("fn", [diffp_reference, diffp_triton, diffp], ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("args", "kwargs", "match"), [pytest.param(*c[1:], id=c[0]) for c in _BAD_CALLS]
)
def test_invalid_inputs_raise_value_error(
    fn: Callable[..., DiffFPOutput], args: tuple, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_triton_refuses_cpu_tensors_outside_the_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(diffp_module, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        diffp_triton(_GOOD)


def test_diffp_uses_the_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> DiffFPOutput:
        raise AssertionError("diffp must not launch Triton for CPU tensors")

    monkeypatch.setattr(diffp_module, "diffp_triton", fail)
    got = diffp(_GOOD, threshold=2.0, min_tokens=0)
    want = diffp_reference(_GOOD, threshold=2.0, min_tokens=0)
    assert torch.equal(got.patches, want.patches) and torch.equal(got.keep, want.keep)


# --- Reference vs transformers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mean", "std"), [((0.5,) * 3, (0.5,) * 3), (CLIP_MEAN, CLIP_STD)], ids=str
)
def test_reference_patches_match_transformers_pil_processor(
    mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    frame = _frames(1, 84, 140, seed=21)
    processor = VideoLlama3ImageProcessorPil()
    out = processor(
        images=frame[0].numpy(),
        do_resize=False,
        merge_size=2,
        image_mean=list(mean),
        image_std=list(std),
        return_tensors="pt",
    )
    assert out["image_grid_thw"].tolist() == [[1, 6, 10]]
    ours = diffp_reference(frame, image_mean=mean, image_std=std).patches
    # The PIL processor rescales in float64, rounds to fp32, then normalizes (two roundings); the
    # video processor, which we follow bit for bit, fuses both into one: a few ulps apart.
    torch.testing.assert_close(ours, out["pixel_values"], rtol=0, atol=1e-6)


def test_reference_normalization_is_the_video_processors_fused_formula() -> None:
    frame = _frames(1, 28, 28, seed=22)
    ours = diffp_reference(frame, image_mean=CLIP_MEAN, image_std=CLIP_STD).patches
    # transformers' _fuse_mean_std_and_rescale_factor then torchvision's normalize (sub_, div_).
    mean = torch.tensor(CLIP_MEAN) * (1.0 / (1 / 255))
    std = torch.tensor(CLIP_STD) * (1.0 / (1 / 255))
    planar = (frame[0].permute(2, 0, 1).float() - mean[:, None, None]) / std[:, None, None]
    # One 28x28 token = 2x2 patches, each (C, 14, 14).
    want = planar.reshape(3, 2, 14, 2, 14).permute(1, 3, 0, 2, 4).reshape(4, 588)
    assert torch.equal(ours, want)


def _hf_compression_mask() -> Callable[..., torch.Tensor]:
    """transformers' VideoLlama3VideoProcessor._get_compression_mask, compiled from its source.

    The module imports torchvision at the top, which has no CPU build here; the method itself
    uses only torch (and not self), so compile just that function from the installed file.
    """
    path = (
        Path(transformers.__file__).parent
        / "models/video_llama_3/video_processing_video_llama_3.py"
    )
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if getattr(n, "name", None) == "VideoLlama3VideoProcessor")
    fn = next(n for n in cls.body if getattr(n, "name", None) == "_get_compression_mask")
    namespace: dict[str, object] = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["_get_compression_mask"]  # type: ignore[return-value]


def _one_region_changes() -> tuple[torch.Tensor, torch.Tensor]:
    """4 static frames, except that frame 2 alone inverts one 28x28 block (merged token 7)."""
    frames = _frames(1, 56, 140, seed=31).repeat(4, 1, 1, 1)
    frames[2, 28:56, 56:84] = 255 - frames[2, 28:56, 56:84]
    want = torch.zeros(4, 10, dtype=torch.bool)
    want[0] = True  # first frame: everything
    want[2, 7] = want[3, 7] = True  # the block changes, then changes back
    want[1, 0] = True  # nothing changed: min_tokens=1 keeps the first token
    return frames, want


_SEQUENCES = {
    "noisy": lambda: _noisy_sequence(5, 84, 140, cell=28, seed=41),
    "random": lambda: _frames(3, 56, 84, seed=42),
    "one region": lambda: _one_region_changes()[0],
    "static": lambda: _frames(1, 56, 84, seed=43).repeat(4, 1, 1, 1),
}


@pytest.mark.parametrize("min_tokens", [0, 1, 3, 100])
# 0.0: unchanged tokens have distance exactly 0, which must not count as "> threshold".
@pytest.mark.parametrize("threshold", [0.0, 0.1, 4.0])
@pytest.mark.parametrize("name", list(_SEQUENCES))
def test_reference_keep_matches_transformers_difffp(
    name: str, threshold: float, min_tokens: int
) -> None:
    frames = _SEQUENCES[name]()
    num, height, width, _ = frames.shape
    ours = diffp_reference(frames, threshold=threshold, min_tokens=min_tokens)
    grid = torch.tensor([[num, height // 14, width // 14]])
    hf_keep = _hf_compression_mask()(
        None,
        pixel_values_videos=ours.patches,
        video_grid_thw=grid,
        video_merge_sizes=torch.tensor([2]),
        threshold=threshold,
        min_tokens=min_tokens,
    )
    assert torch.equal(ours.keep.flatten(), hf_keep)
    # The distance is the quantity _get_compression_mask thresholds, on the same tokens.
    tokens = ours.patches.view(num, ours.distance.shape[1], -1)
    want = (tokens[1:] - tokens[:-1]).abs().mean(dim=-1) * 255
    assert torch.equal(ours.distance[1:], want)
    if name == "static":
        kept = min(min_tokens, ours.keep.shape[1])
        assert ours.keep[1:].sum(dim=1).tolist() == [kept] * (num - 1)
    if name == "noisy" and threshold == 4.0 and min_tokens <= 1:
        assert 0 < int(ours.keep[1:].sum()) < ours.keep[1:].numel()


@pytest.mark.parametrize("threshold", [0.0, 4.0])
def test_one_region_change_keeps_exactly_that_token(threshold: float) -> None:
    frames, want = _one_region_changes()
    out = diffp_reference(frames, threshold=threshold, min_tokens=1)
    assert torch.equal(out.keep, want)
    assert out.distance[1].max() == 0 and out.distance[2, 7] > 100
    assert out.distance[2].count_nonzero() == out.distance[3].count_nonzero() == 1


def test_reference_matches_transformers_video_processor() -> None:
    """The definitive check where torchvision exists (the GPU machine): HF's own video pipeline."""
    pytest.importorskip("torchvision")
    from transformers import VideoLlama3VideoProcessor

    frames, _ = _one_region_changes()
    out = VideoLlama3VideoProcessor()(
        videos=[frames.permute(0, 3, 1, 2)], do_resize=False, return_tensors="pt"
    )
    ours = diffp_reference(frames)  # the processor's defaults: threshold 0.1, min_tokens 1
    assert out["video_grid_thw"].tolist() == [[4, 4, 10]]
    assert torch.equal(out["pixel_values_videos"], ours.patches)
    assert torch.equal(out["video_compression_mask"], ours.keep.flatten())


# --- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_kernel_matches_reference_at_session_grid(out_dtype: torch.dtype) -> None:
    frames = _noisy_sequence(3, 728, 1288, cell=28, seed=51).cuda()
    prev = _frames(1, 728, 1288, seed=52)[0].cuda()
    kwargs = {"threshold": 4.0, "out_dtype": out_dtype}
    got = diffp(frames, prev, **kwargs)
    _assert_same(got, diffp_reference(frames, prev, **kwargs), 4.0)
