"""GroupNorm forward with an optional fused SiLU, for NCHW, channels_last and (N, C, L) tensors.

Two launches, both split across many programs so that a small batch still fills the GPU (SD1.5 at batch 2 has only
64 (sample, group) pairs for 132 SMs):

1. ``_group_stats_kernel``: program (sample*group, chunk) reduces one chunk of one group to a partial
   (count, mean, M2). Each tile's mean and M2 are exact two-pass values; tiles are merged with Chan's parallel
   formula, which stays accurate in fp32 on groups of 262,144+ elements (SD's VAE decoder) where a plain
   sum / sum-of-squares loses digits to cancellation.
2. ``_group_apply_kernel``: program (sample*group, chunk) merges its group's partials (Chan again) into mean and
   1/std, then normalizes its chunk, applies weight and bias and SiLU, and writes x's dtype and memory format.

No program waits on another. Sample/group bases and channels_last row offsets are int64 (a 1x128x1024x1024 VAE
activation has 134M elements; larger batches pass 2^31).

Tiling, chosen by the constexpr CHANNELS_LAST:
- NCHW / (N, C, L): a group is one contiguous run of (C/G)*HW elements; tiles are 1-d runs of BLOCK elements and a
  chunk is a range of element indices within the group.
- channels_last (NHWC memory): a group is C/G contiguous channels at each of the HW positions (stride C); tiles are
  2-d, BLOCK_P positions x BLOCK_CPG channels (no per-element division), and a chunk is a range of positions.
  Programs of neighbouring groups are launched together and read the same rows at the same time, so the 32-byte
  sectors they share are fetched from DRAM once and served to the other programs from L2.

Bytes moved: x read twice (statistics, then apply) and y written once, the floor for a two-pass design.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
import triton
import triton.language as tl

from diffusion_fast import _validate

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# One pinned config each: the interpreter ignores num_warps and is fastest with few programs and wide tiles; on a GPU
# 2048 elements x 8 warps gives each thread 8 elements (one 16-byte vector of fp16 on the contiguous path), and
# TARGET_PROGRAMS = 8 programs on each of an H100's 132 SMs keeps enough loads in flight to saturate HBM.
BLOCK = 512 if INTERPRET else 2048  # elements per tile
NUM_WARPS = 8
TARGET_PROGRAMS = 16 if INTERPRET else 8 * 132


@triton.jit
def _merge(count, mean, m2, b_count, b_mean, b_m2):
    """Chan et al.: merge (count, mean, M2) of two disjoint sets; b_count > 0."""
    total = count + b_count
    delta = b_mean - mean
    new_mean = mean + delta * (b_count / total)
    new_m2 = m2 + b_m2 + delta * delta * (count * b_count / total)
    return total, new_mean, new_m2


@triton.jit
def _group_stats_kernel(
    x_ptr,  # input: (N, C, HW) contiguous, or (N, HW, C) memory for channels_last
    mean_ptr, m2_ptr, count_ptr,  # fp32 partials out, each (N*G, split)
    hw,  # H*W (L for 3-d input)
    channels,  # C
    chunk_len,  # elements (NCHW) or positions (channels_last) per chunk
    split,  # chunks per group
    num_groups,  # G
    CPG: tl.constexpr,  # channels per group, C/G: a constant, so channels_last rows get known alignment and vector
                        # loads (SD uses a handful of values: 4 to 40)
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,  # NCHW tile: elements
    BLOCK_P: tl.constexpr,  # channels_last tile: positions ...
    BLOCK_CPG: tl.constexpr,  # ... x channels (next power of two >= CPG)
):
    pid_group = tl.program_id(0).to(tl.int64)  # n * G + g
    pid_chunk = tl.program_id(1)
    n = pid_group // num_groups
    g = pid_group % num_groups
    start = pid_chunk * chunk_len
    count = 0.0
    mean = 0.0
    m2 = 0.0
    if CHANNELS_LAST:
        base = n * hw * channels + g * CPG
        c = tl.arange(0, BLOCK_CPG)
        cmask = c < CPG
        end = tl.minimum(start + chunk_len, hw)
        for p_start in range(start, end, BLOCK_P):
            p = p_start + tl.arange(0, BLOCK_P)
            mask = (p < end)[:, None] & cmask[None, :]
            offs = p.to(tl.int64)[:, None] * channels + c[None, :]
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            b_count = (tl.minimum(end - p_start, BLOCK_P) * CPG).to(tl.float32)
            b_mean = tl.sum(tl.sum(x, axis=1), axis=0) / b_count
            d = tl.where(mask, x - b_mean, 0.0)
            b_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
            count, mean, m2 = _merge(count, mean, m2, b_count, b_mean, b_m2)
    else:
        base = n * hw * channels + g * CPG * hw
        end = tl.minimum(start + chunk_len, CPG * hw)
        for e_start in range(start, end, BLOCK):
            e = e_start + tl.arange(0, BLOCK)
            mask = e < end
            x = tl.load(x_ptr + base + e, mask=mask, other=0.0).to(tl.float32)
            b_count = tl.minimum(end - e_start, BLOCK).to(tl.float32)
            b_mean = tl.sum(x, axis=0) / b_count
            d = tl.where(mask, x - b_mean, 0.0)
            b_m2 = tl.sum(d * d, axis=0)
            count, mean, m2 = _merge(count, mean, m2, b_count, b_mean, b_m2)
    out = pid_group * split + pid_chunk
    tl.store(mean_ptr + out, mean)
    tl.store(m2_ptr + out, m2)
    tl.store(count_ptr + out, count)


@triton.jit
def _group_apply_kernel(
    x_ptr, y_ptr,  # input and output, same shape and memory format (see _group_stats_kernel)
    w_ptr, b_ptr,  # (C,) weight and bias (not read unless HAS_WEIGHT / HAS_BIAS)
    mean_ptr, m2_ptr, count_ptr,  # fp32 partials from _group_stats_kernel, each (N*G, split)
    hw, channels, chunk_len, split, num_groups,  # as in _group_stats_kernel
    eps,  # float
    CPG: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,  # next power of two >= split
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_CPG: tl.constexpr,
):
    pid_group = tl.program_id(0).to(tl.int64)
    pid_chunk = tl.program_id(1)
    n = pid_group // num_groups
    g = pid_group % num_groups
    # Merge the group's partials (Chan): mean = sum(c_i m_i) / sum(c_i), M2 = sum(M2_i) + sum(c_i (m_i - mean)^2).
    s = tl.arange(0, SPLIT_BLOCK)
    smask = s < split
    counts = tl.load(count_ptr + pid_group * split + s, mask=smask, other=0.0)
    means = tl.load(mean_ptr + pid_group * split + s, mask=smask, other=0.0)
    m2s = tl.load(m2_ptr + pid_group * split + s, mask=smask, other=0.0)
    total = tl.sum(counts, axis=0)
    mean = tl.sum(counts * means, axis=0) / total
    d = tl.where(smask, means - mean, 0.0)
    var = (tl.sum(m2s, axis=0) + tl.sum(counts * d * d, axis=0)) / total
    rstd = 1.0 / tl.sqrt(var + eps)

    start = pid_chunk * chunk_len
    if CHANNELS_LAST:
        base = n * hw * channels + g * CPG
        c = tl.arange(0, BLOCK_CPG)
        cmask = c < CPG
        # y = x * scale + shift per channel: folded once per program, so the tile loop is one FMA per element.
        scale = tl.zeros([BLOCK_CPG], dtype=tl.float32) + rstd
        if HAS_WEIGHT:
            scale = scale * tl.load(w_ptr + g * CPG + c, mask=cmask, other=1.0).to(tl.float32)
        shift = -mean * scale
        if HAS_BIAS:
            shift = shift + tl.load(b_ptr + g * CPG + c, mask=cmask, other=0.0).to(tl.float32)
        end = tl.minimum(start + chunk_len, hw)
        for p_start in range(start, end, BLOCK_P):
            p = p_start + tl.arange(0, BLOCK_P)
            mask = (p < end)[:, None] & cmask[None, :]
            offs = p.to(tl.int64)[:, None] * channels + c[None, :]
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            y = x * scale[None, :] + shift[None, :]
            if SILU:
                y = y / (1.0 + tl.exp(-y))
            tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        base = n * hw * channels + g * CPG * hw
        end = tl.minimum(start + chunk_len, CPG * hw)
        for e_start in range(start, end, BLOCK):
            e = e_start + tl.arange(0, BLOCK)
            mask = e < end
            x = tl.load(x_ptr + base + e, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            channel = g * CPG + e // hw
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + channel, mask=mask, other=1.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + channel, mask=mask, other=0.0).to(tl.float32)
            if SILU:
                y = y / (1.0 + tl.exp(-y))
            tl.store(y_ptr + base + e, y.to(y_ptr.dtype.element_ty), mask=mask)


def _layout(x: torch.Tensor):
    """(tensor to read, channels_last?): NCHW-contiguous and channels_last are read in place; any other layout
    (a strided view, channels_last_3d, ...) is copied to contiguous first, and the output is then contiguous."""
    if x.is_contiguous():
        return x, False
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def plan(n_groups: int, length: int, tile: int, target_programs: int = TARGET_PROGRAMS):
    """(chunk_len, split): cut each of ``n_groups`` groups of ``length`` units into ``split`` chunks of a whole
    number of ``tile`` units, so that about ``target_programs`` programs run (never a chunk smaller than a tile)."""
    split = max(1, min(triton.cdiv(target_programs, n_groups), triton.cdiv(length, tile)))
    chunk_len = triton.cdiv(triton.cdiv(length, split), tile) * tile
    return chunk_len, triton.cdiv(length, chunk_len)


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=True):
    """GroupNorm (+ SiLU) of ``x`` (N, C, *spatial); statistics in fp32, output in x's dtype and memory format."""
    _validate.group_norm_args(x, num_groups, weight, bias, eps)
    if x.dtype not in DTYPES:
        raise TypeError(f"x: the Triton group_norm_silu kernel takes float16, bfloat16 or float32, got {x.dtype}")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"x is on {x.device}: the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
    group_len = x[0].numel() // num_groups
    if group_len >= 2**31:  # element indices within a group are int32 (sample and group bases are int64)
        raise ValueError(f"x: a group of {group_len} elements (>= 2^31) is too large for the Triton kernel; "
                         "use more groups or the torch backend")
    x, channels_last = _layout(x)
    n, c = x.shape[:2]
    hw = x[0, 0].numel()
    cpg = c // num_groups
    block_cpg = triton.next_power_of_2(cpg)
    if channels_last and block_cpg > BLOCK:  # one row of a group would not fit a tile: go through NCHW
        warnings.warn(f"diffusion_fast: group_norm_silu on channels_last with {cpg} channels a group (> {BLOCK}) "
                      "copies x to NCHW and the result back to channels_last", stacklevel=2)
        y = group_norm_silu(x.contiguous(), num_groups, weight, bias, eps, silu=silu)
        return y.contiguous(memory_format=torch.channels_last)
    block_p = max(1, BLOCK // block_cpg)
    if channels_last:
        chunk_len, split = plan(n * num_groups, hw, block_p)
    else:
        chunk_len, split = plan(n * num_groups, cpg * hw, BLOCK)
    partials = torch.empty((3, n * num_groups * split), device=x.device, dtype=torch.float32)
    y = torch.empty_like(x)  # same memory format as x
    grid = (n * num_groups, split)
    w = weight.contiguous() if weight is not None else x  # x stands in for an absent pointer; never read
    b = bias.contiguous() if bias is not None else x
    tiles = dict(CPG=cpg, CHANNELS_LAST=channels_last, BLOCK=BLOCK, BLOCK_P=block_p, BLOCK_CPG=block_cpg,
                 num_warps=NUM_WARPS)
    # Triton launches on the current CUDA device: make it x's (a no-op on single-GPU machines and on the CPU).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _group_stats_kernel[grid](x, partials[0], partials[1], partials[2], hw, c, chunk_len, split, num_groups,
                                  **tiles)
        _group_apply_kernel[grid](x, y, w, b, partials[0], partials[1], partials[2], hw, c, chunk_len, split,
                                  num_groups, float(eps), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                                  SILU=bool(silu), SPLIT_BLOCK=triton.next_power_of_2(split), **tiles)
    return y
