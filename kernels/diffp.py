"""Normalize + patchify + DiffFP in one pass: the per-frame front end of VideoLLaMA3 video input.

For each sampled uint8 frame this produces, in one read of the frame and of its predecessor,

* the normalized patches in transformers' ``VideoLlama3VideoProcessor.patchify`` order
  (``temporal_patch_size=1``), ready for the vision encoder, and
* the Differential Frame Pruner (DiffFP) distance per merged token and the keep mask, exactly as
  transformers' ``_get_compression_mask``, but carried across calls through ``prev`` so that a
  live stream processed chunk by chunk prunes the same tokens as one offline call.

``diffp_triton`` is the GPU kernel, ``diffp_reference`` the pure-torch statement of the same
computation (and the CPU path), ``diffp`` picks one by device.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["DiffFPOutput", "diffp", "diffp_reference", "diffp_triton"]

_CHANNELS = 3
# transformers' default rescale factor; the video processor folds it into mean and std.
_RESCALE_FACTOR = 1 / 255
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class DiffFPOutput:
    """What one call produces for T frames of one stream."""

    patches: torch.Tensor
    """(T * gh * gw, 3 * p * p), out_dtype: normalized patches in VideoLLaMA3 video patch order."""
    distance: torch.Tensor
    """(T, (gh // m) * (gw // m)) float32: mean |x_t - x_{t-1}| * 255 per merged token;
    +inf for a frame without predecessor."""
    keep: torch.Tensor
    """(T, (gh // m) * (gw // m)) bool: distance > threshold, then the min_tokens rule."""


def _check_args(
    frames: torch.Tensor,
    prev: torch.Tensor | None,
    threshold: float,
    min_tokens: int,
    patch_size: int,
    merge_size: int,
) -> None:
    """Raise ValueError for inputs the kernel and the reference do not define."""
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
    if frames.dim() != 4 or frames.shape[-1] != _CHANNELS:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {tuple(frames.shape)}")
    if frames.shape[0] < 1:
        raise ValueError("frames must hold at least one frame (T >= 1)")
    for name, value in (("patch_size", patch_size), ("merge_size", merge_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    factor = patch_size * merge_size
    height, width = frames.shape[1], frames.shape[2]
    if height % factor or width % factor or height == 0 or width == 0:
        raise ValueError(
            f"frame size {height}x{width} must be a non-zero multiple of "
            f"patch_size * merge_size = {factor} in both dimensions (resize to the session grid)"
        )
    if prev is not None:
        if not isinstance(prev, torch.Tensor):
            raise ValueError(f"prev must be a torch.Tensor or None, got {type(prev).__name__}")
        if prev.dtype != torch.uint8:
            raise ValueError(f"prev must be uint8 RGB, got dtype {prev.dtype}")
        if tuple(prev.shape) != tuple(frames.shape[1:]):
            raise ValueError(
                f"prev must have the frames' shape (H, W, 3) = {tuple(frames.shape[1:])}, "
                f"got {tuple(prev.shape)}"
            )
        if prev.device != frames.device:
            raise ValueError(f"prev is on {prev.device} but frames are on {frames.device}")
    check_prune_params(threshold, min_tokens)


def check_prune_params(threshold: float, min_tokens: int) -> None:
    """Raise ValueError unless threshold is a finite real >= 0 and min_tokens an int >= 0."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ValueError(f"threshold must be a real number, got {threshold!r}")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be finite and >= 0, got {threshold!r}")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens must be an int >= 0, got {min_tokens!r}")


def _check_normalization(
    image_mean: Sequence[float], image_std: Sequence[float], out_dtype: torch.dtype
) -> None:
    """Raise ValueError for normalization constants or an output dtype we do not support."""
    if len(image_mean) != _CHANNELS or len(image_std) != _CHANNELS:
        raise ValueError(
            f"image_mean and image_std need {_CHANNELS} values, "
            f"got {len(image_mean)} and {len(image_std)}"
        )
    if not all(math.isfinite(s) and s != 0 for s in image_std):
        raise ValueError(f"image_std values must be finite and non-zero, got {tuple(image_std)}")
    if not all(math.isfinite(m) for m in image_mean):
        raise ValueError(f"image_mean values must be finite, got {tuple(image_mean)}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")


def _floats(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


@functools.lru_cache(maxsize=16)
def _fused_mean_std(
    image_mean: tuple[float, ...], image_std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std on the 0..255 scale, in fp32, computed as transformers' video processor does.

    ``_fuse_mean_std_and_rescale_factor`` multiplies the fp32 mean/std by 1 / rescale_factor and
    then normalizes the raw fp32 pixel values with them, so rescale and normalize cost one rounding.
    Cached per device: building them per call would cost a blocking host-to-device copy.
    """
    scale = 1.0 / _RESCALE_FACTOR
    mean = torch.tensor(image_mean, dtype=torch.float32, device=device) * scale
    std = torch.tensor(image_std, dtype=torch.float32, device=device) * scale
    return mean, std


def _apply_min_tokens(distance: torch.Tensor, threshold: float, min_tokens: int) -> torch.Tensor:
    """keep = distance > threshold; a frame keeping fewer than min_tokens keeps its first ones.

    Same rule as transformers' ``_get_compression_mask``, written without a host sync.
    """
    keep = distance > threshold
    if min_tokens > 0:
        short = keep.sum(dim=1, keepdim=True) < min_tokens
        keep[:, :min_tokens] |= short
    return keep


def _normalize_patchify(
    frames: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, patch_size: int, merge_size: int
) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, tokens, m * m * 3 * p * p) fp32 normalized, in patch order."""
    num, height, width, channels = frames.shape
    p, m = patch_size, merge_size
    # Same float ops as the video processor: fp32(u8) - mean*255, then / std*255 (IEEE, no FMA).
    x = (frames.to(torch.float32) - mean) / std
    x = x.reshape(num, height // (m * p), m, p, width // (m * p), m, p, channels)
    # (T, gh/m, m, p, gw/m, m, p, C) -> (T, gh/m, gw/m, m_h, m_w, C, p_h, p_w): transformers'
    # permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9) with the temporal patch axis dropped.
    x = x.permute(0, 1, 4, 2, 5, 7, 3, 6)
    return x.reshape(num, (height // (m * p)) * (width // (m * p)), m * m * channels * p * p)


def diffp_reference(
    frames: torch.Tensor,
    prev: torch.Tensor | None = None,
    *,
    threshold: float = 0.1,
    min_tokens: int = 1,
    patch_size: int = 14,
    merge_size: int = 2,
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    image_std: Sequence[float] = (0.5, 0.5, 0.5),
    out_dtype: torch.dtype = torch.float32,
) -> DiffFPOutput:
    """Pure-torch normalize + patchify + DiffFP (the CPU path and the kernel's specification).

    frames: uint8 (T, H, W, 3); prev: uint8 (H, W, 3), the stream's previous sampled frame, or None
    when frames[0] is the stream's first frame (it then keeps every token, distance +inf).
    """
    _check_args(frames, prev, threshold, min_tokens, patch_size, merge_size)
    _check_normalization(image_mean, image_std, out_dtype)
    mean, std = _fused_mean_std(_floats(image_mean), _floats(image_std), frames.device)
    tokens = _normalize_patchify(frames, mean, std, patch_size, merge_size)
    num = tokens.shape[0]
    distance = torch.full(tokens.shape[:2], math.inf, dtype=torch.float32, device=frames.device)
    # Same ops as _get_compression_mask: (x_t - x_{t-1}).abs().mean(-1) * 255.
    if num > 1:
        distance[1:] = (tokens[1:] - tokens[:-1]).abs().mean(dim=-1) * 255
    if prev is not None:
        before = _normalize_patchify(prev[None], mean, std, patch_size, merge_size)
        distance[0] = (tokens[0] - before[0]).abs().mean(dim=-1) * 255
    keep = _apply_min_tokens(distance, threshold, min_tokens)
    patches = tokens.reshape(-1, _CHANNELS * patch_size * patch_size).to(out_dtype)
    return DiffFPOutput(patches=patches, distance=distance, keep=keep)


# The strides chosen between frames and prev at run time must stay runtime ints: a stride of 1
# would otherwise be specialized into a constexpr, which tl.where cannot select.
@triton.jit(
    do_not_specialize=["stride_ch", "stride_cw", "stride_cc", "stride_rh", "stride_rw", "stride_rc"]
)
def _diffp_kernel(
    cur_ptr,
    ref_ptr,
    out_ptr,
    dist_ptr,
    stride_ct,
    stride_ch,
    stride_cw,
    stride_cc,
    stride_rh,
    stride_rw,
    stride_rc,
    mean0,
    mean1,
    mean2,
    std0,
    std1,
    std2,
    tokens_w,
    tokens_per_frame,
    HAS_REF: tl.constexpr,
    P: tl.constexpr,
    M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One program = one merged token (M*M patches of P*P pixels, 3 channels) of frame t.

    x_t[c, y, w] = (float32(u8_t[y, w, c]) - mean_c) / std_c    (mean_c, std_c on the 0..255 scale)
    out          = x_t over the token in (m_h, m_w, c, p_h, p_w) order: M*M*3*P rows of P values
    dist[t, tok] = sum |x_t - x_{t-1}| / (M*M*3*P*P) * 255, +inf when frame t has no predecessor
    The predecessor of frame t > 0 is frame t - 1 of cur; of frame 0 it is ref (if HAS_REF).
    """
    ROWS: tl.constexpr = M * M * 3 * P
    pid = tl.program_id(0)
    t = pid // tokens_per_frame
    tok = pid % tokens_per_frame
    y0 = (tok // tokens_w) * (M * P)
    x0 = (tok % tokens_w) * (M * P)

    cur_base = cur_ptr + t.to(tl.int64) * stride_ct
    # Frame t > 0 compares with frame t - 1 of the batch, frame 0 with the caller's ref frame.
    later = t > 0
    ref_base = tl.where(later, cur_base - stride_ct, ref_ptr)
    ref_sh = tl.where(later, stride_ch, stride_rh).to(tl.int64)
    ref_sw = tl.where(later, stride_cw, stride_rw).to(tl.int64)
    ref_sc = tl.where(later, stride_cc, stride_rc).to(tl.int64)
    has_ref = t >= 0 if HAS_REF else later
    out_base = out_ptr + pid.to(tl.int64) * (ROWS * P)

    cols = tl.arange(0, BLOCK_P)
    col_ok = cols < P
    xs = (x0 + cols).to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, ROWS, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < ROWS
        # row = ((m_h * M + m_w) * 3 + c) * P + p_h
        ph = rows % P
        c = (rows // P) % 3
        mw = (rows // (3 * P)) % M
        mh = rows // (3 * P * M)
        ys = (y0 + mh * P + ph).to(tl.int64)
        xcol = xs[None, :] + (mw * P).to(tl.int64)[:, None]
        mask = row_ok[:, None] & col_ok[None, :]
        mean = tl.where(c == 0, mean0, tl.where(c == 1, mean1, mean2))[:, None]
        std = tl.where(c == 0, std0, tl.where(c == 1, std1, std2))[:, None]

        cur_off = (ys * stride_ch + c.to(tl.int64) * stride_cc)[:, None] + xcol * stride_cw
        u = tl.load(cur_base + cur_off, mask=mask, other=0)
        # div_rn: IEEE division like torch's, so the kernel is bit-equal to the reference.
        val = tl.div_rn(u.to(tl.float32) - mean, std)
        out_off = (rows * P)[:, None] + cols[None, :]
        tl.store(out_base + out_off, val.to(out_ptr.dtype.element_ty), mask=mask)

        ref_off = (ys * ref_sh + c.to(tl.int64) * ref_sc)[:, None] + xcol * ref_sw
        # Without a predecessor ref is frame 0 itself: a harmless read, the distance becomes inf.
        v = tl.load(ref_base + ref_off, mask=mask, other=0)
        before = tl.div_rn(v.to(tl.float32) - mean, std)
        acc += tl.where(mask, tl.abs(val - before), 0.0)

    # mean then * 255, in that order, as _get_compression_mask does.
    dist = tl.div_rn(tl.sum(acc), float(ROWS * P)) * 255.0
    tl.store(dist_ptr + pid, tl.where(has_ref, dist, float("inf")))


def _interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)  # triton < 3.4 has no knobs module
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def diffp_triton(
    frames: torch.Tensor,
    prev: torch.Tensor | None = None,
    *,
    threshold: float = 0.1,
    min_tokens: int = 1,
    patch_size: int = 14,
    merge_size: int = 2,
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    image_std: Sequence[float] = (0.5, 0.5, 0.5),
    out_dtype: torch.dtype = torch.float32,
) -> DiffFPOutput:
    """Triton launcher: same contract and results as diffp_reference, one pass over the pixels.

    Takes frames and prev as they are (any strides, no copy). Needs CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1.
    """
    _check_args(frames, prev, threshold, min_tokens, patch_size, merge_size)
    _check_normalization(image_mean, image_std, out_dtype)
    if frames.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"diffp_triton needs CUDA tensors (or TRITON_INTERPRET=1), got device {frames.device}"
        )
    num, height, width, _ = frames.shape
    p, m = patch_size, merge_size
    tokens_w = width // (p * m)
    tokens_per_frame = (height // (p * m)) * tokens_w
    patches = torch.empty(
        (num * tokens_per_frame * m * m, _CHANNELS * p * p), dtype=out_dtype, device=frames.device
    )
    distance = torch.empty((num, tokens_per_frame), dtype=torch.float32, device=frames.device)
    mean, std = _fused_mean_std(_floats(image_mean), _floats(image_std), torch.device("cpu"))
    ref = frames[0] if prev is None else prev
    block_p = triton.next_power_of_2(p)
    rows = m * m * _CHANNELS * p
    # 32 rows x 16 columns = 512 lanes per step: 4 warps, 4 elements each; 168 rows take 6 steps.
    block_r = min(triton.next_power_of_2(rows), max(1, 512 // block_p))
    _diffp_kernel[(num * tokens_per_frame,)](
        frames,
        ref,
        patches,
        distance,
        *frames.stride(),
        *ref.stride(),
        *mean.tolist(),
        *std.tolist(),
        tokens_w,
        tokens_per_frame,
        HAS_REF=prev is not None,
        P=p,
        M=m,
        BLOCK_R=block_r,
        BLOCK_P=block_p,
        num_warps=4,
        # No multiply-add in the kernel needs fusing; explicit, so Triton 3.9 does not warn.
        enable_fp_fusion=False,
    )
    keep = _apply_min_tokens(distance, threshold, min_tokens)
    return DiffFPOutput(patches=patches, distance=distance, keep=keep)


def diffp(
    frames: torch.Tensor,
    prev: torch.Tensor | None = None,
    *,
    threshold: float = 0.1,
    min_tokens: int = 1,
    patch_size: int = 14,
    merge_size: int = 2,
    image_mean: Sequence[float] = (0.5, 0.5, 0.5),
    image_std: Sequence[float] = (0.5, 0.5, 0.5),
    out_dtype: torch.dtype = torch.float32,
) -> DiffFPOutput:
    """Normalize, patchify and DiffFP-prune frames: Triton on CUDA tensors, torch otherwise."""
    run = diffp_triton if isinstance(frames, torch.Tensor) and frames.is_cuda else diffp_reference
    return run(
        frames,
        prev,
        threshold=threshold,
        min_tokens=min_tokens,
        patch_size=patch_size,
        merge_size=merge_size,
        image_mean=image_mean,
        image_std=image_std,
        out_dtype=out_dtype,
    )
