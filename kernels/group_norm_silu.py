"""GroupNorm forward with an optional fused SiLU, for NCHW and channels_last tensors.

Large NCHW tensors take two launches, both split across many programs so that a small batch still fills the GPU (SD1.5
at batch 2 has only 64 (sample, group) pairs for 132 SMs):

1. ``_group_stats_kernel``: program (group, chunk) reduces one chunk of one group's elements to a partial
   (count, mean, M2), combining block by block with Chan's parallel formula — numerically robust in fp32 even for
   groups of 262,144 elements (SD's VAE decoder), where a plain sum of squares loses digits.
2. ``_group_apply_kernel``: program (group, chunk) combines its group's partials into mean and 1/std, then
   normalizes its chunk, applies weight and bias, and SiLU, writing the input's dtype.

The statistics are kept per lane: each of a program's BLOCK lanes runs Welford's update over the elements it loads,
every lane having seen the same number of elements, so the loop has no reduction across threads (no shared memory,
no barrier between one block's loads and the next); the lanes are merged with Chan's formula once, at the end, and a
short last block is merged the same way. Reducing every block as it was loaded, as this kernel did before, put a
cross-warp reduction between consecutive loads: in a CUDA graph on the H200 the per-lane design took 0.37-0.41x its
time in channels_last and 0.85-0.88x in NCHW on maps of 16 MB and more (benchmarks/results/gpu_kernels_h200.jsonl,
third record). The output passes run in launch order: reversing them (to re-read from L2 what the statistics pass left
there) with evict-first hints measured slower in 15 of 16 graphed rows of two runs, so that was taken out.

Tensors of at most ``ONE_PASS_MAX_ELEMENTS`` (SD's 8x8 to 32x32 UNet levels) are launch-bound rather than
bandwidth-bound: ``_group_norm_one_pass_kernel`` has one program per group compute the statistics and then normalize,
in a single launch with no partials buffer (its second read of the group comes from L2).

Large channels_last tensors take three launches instead (kernels/_group_norm_channels_last.py): programs tile
(positions x 64 channels) across groups, so they load whole aligned rows, where a group's own C/G channels are a short
unaligned run at each position.

No program waits on another. Element addresses are computed in int64. A group's elements are walked in memory order:
in NCHW a group is one contiguous run of (C/G)*H*W elements; in channels_last it is C/G contiguous channels at each of
the H*W positions (stride C).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from diffusion_fast import _validate
from ._group_norm_channels_last import channels_last_split
from ._host import cdiv, next_power_of_2
from ._welford import _chan_merge, _lanes_merged

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 256 if INTERPRET else 2048  # elements per loop iteration
NUM_WARPS = 8
# a few waves on an H100 (132 SMs); interpreted, where every program costs milliseconds, fewer and larger chunks (the
# tests' multi-chunk shapes still get several chunks a group in both layouts, some with a short last one)
TARGET_PROGRAMS = 32 if INTERPRET else 4 * 132
ONE_PASS_MAX_ELEMENTS = 1 << 20  # up to this size: one launch, one program per group (not yet timed on a GPU)
# NCHW, large tensors: 16-byte loads a thread of the two passes keeps in flight. At 1 a thread waits for each block's
# load and then computes with nothing in flight, and 4 x 132 programs of 8 warps hold ~16 KB an SM in flight, short
# of what HBM's latency needs at full bandwidth. At 2 the statistics pass keeps a Welford state for twice the lanes
# (two adjacent loads a thread an iteration, 32 -> 60 registers, compiled for sm_90 by Triton 3.6 and 3.9; two
# blocks an iteration with BLOCK lanes had Triton 3.6 issue the second load after using the first) and the output
# pass issues each block's load one block ahead of the previous block's arithmetic and store. Not yet timed on a
# GPU: benchmarks/gpu_kernels.py times 2 beside this default.
LOADS_IN_FLIGHT = 1


@triton.jit
def _element_offsets(e, hw, CPG: tl.constexpr, channels, CHANNELS_LAST: tl.constexpr):  # CPG: channels_last only
    """Memory offset (within a sample, from its group's first channel) and channel-in-group of element index e."""
    if CHANNELS_LAST:  # e = position * CPG + channel_in_group; CPG constant: a multiply-shift, runs known contiguous
        c_local = e % CPG
        return (e // CPG) * channels + c_local, c_local
    else:  # e = channel_in_group * hw + position: the group is one contiguous run
        return e, e // hw


@triton.jit
def _group_chunk(pid_group, pid_chunk, hw, cpg, CPG: tl.constexpr, channels, group_len, chunk_len, num_groups,
                 CHANNELS_LAST: tl.constexpr):
    """Group index g, the group's first element's offset, and this chunk's [start, end) in the group's elements."""
    n = pid_group // num_groups
    g = pid_group % num_groups
    if CHANNELS_LAST:
        base = n * hw * channels + g * CPG
    else:
        base = n * hw * channels + g * cpg * hw
    start = pid_chunk * chunk_len
    return g, base, start, tl.minimum(start + chunk_len, group_len)


@triton.jit
def _chunk_moments(x_ptr, base, start, end, hw, CPG: tl.constexpr, channels, CHANNELS_LAST: tl.constexpr,
                   BLOCK: tl.constexpr):
    """(count, mean, M2) of a group's elements [start, end) (end > start): Welford per lane over the whole blocks,
    the lanes merged once, then the short last block, if any, merged (Chan)."""
    full_end = start + (end - start) // BLOCK * BLOCK
    count = 0.0
    lane_mean = tl.zeros([BLOCK], dtype=tl.float32)
    lane_m2 = tl.zeros([BLOCK], dtype=tl.float32)
    for block_start in range(start, full_end, BLOCK):  # no masks, no reductions: loads run back to back
        offs, _ = _element_offsets(block_start + tl.arange(0, BLOCK), hw, CPG, channels, CHANNELS_LAST)
        x = tl.load(x_ptr + base + offs).to(tl.float32)
        count += 1.0  # elements per lane so far, the same in every lane
        delta = x - lane_mean
        lane_mean += delta * (1.0 / count)
        lane_m2 += delta * (x - lane_mean)
    count, mean, m2 = _lanes_merged(count + tl.zeros([BLOCK], dtype=tl.float32), lane_mean, lane_m2, None)
    for block_start in range(full_end, end, BLOCK):  # the short last block, if any
        e = block_start + tl.arange(0, BLOCK)
        mask = e < end
        offs, _ = _element_offsets(e, hw, CPG, channels, CHANNELS_LAST)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        n_b = tl.minimum(end - block_start, BLOCK).to(tl.float32)
        b_mean = tl.sum(x, axis=0) / n_b
        diff = tl.where(mask, x - b_mean, 0.0)
        b_m2 = tl.sum(diff * diff, axis=0)
        count, mean, m2 = _chan_merge(count, mean, m2, n_b, b_mean, b_m2)
    return count, mean, m2


@triton.jit
def _normalize_chunk(x_ptr, y_ptr, w_ptr, b_ptr, base, start, end, g, mean, rstd, hw, cpg, CPG: tl.constexpr, channels,
                     CHANNELS_LAST: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SILU: tl.constexpr, CHANNEL_PER_BLOCK: tl.constexpr, BLOCK: tl.constexpr, LOADS: tl.constexpr):
    """y = f((x - mean) * rstd * w + b) over a group's elements [start, end), f = SiLU or identity.

    CHANNEL_PER_BLOCK (NCHW with H*W a multiple of BLOCK, blocks starting at multiples of BLOCK): every block lies in
    one channel, so weight and bias are one scalar load per block instead of a per-element divide and gather.
    LOADS=2: each block's load is issued one block ahead, before the previous block's arithmetic and store. At 1 a
    thread has nothing in flight while it computes: the compiler cannot move the next load above a store to memory
    that may alias it."""
    if LOADS == 2:
        e = start + tl.arange(0, BLOCK)
        offs, _ = _element_offsets(e, hw, CPG, channels, CHANNELS_LAST)
        x_next = tl.load(x_ptr + base + offs, mask=e < end, other=0.0)
    for block_start in range(start, end, BLOCK):
        e = block_start + tl.arange(0, BLOCK)
        mask = e < end
        offs, c_local = _element_offsets(e, hw, CPG, channels, CHANNELS_LAST)
        if LOADS == 2:
            x = x_next.to(tl.float32)
            e_next = e + BLOCK  # (past the chunk on the last block: masked off, no memory read)
            offs_next, _ = _element_offsets(e_next, hw, CPG, channels, CHANNELS_LAST)
            x_next = tl.load(x_ptr + base + offs_next, mask=e_next < end, other=0.0)
        else:
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if CHANNEL_PER_BLOCK:
            channel = g * cpg + block_start // hw
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + channel).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + channel).to(tl.float32)
        else:
            if CHANNELS_LAST:
                channel = g * CPG + c_local
            else:
                channel = g * cpg + c_local
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + channel, mask=mask, other=1.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + channel, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_stats_kernel(
    x_ptr,  # input, (N, C, *spatial) NCHW-contiguous (large channels_last tensors take the _cl_* kernels)
    partials_ptr,  # fp32 (3, N * G * SPLIT) out: each chunk's mean, M2 and count
    hw, cpg, channels, group_len, chunk_len, split,  # H*W, C/G, C, (C/G)*H*W, elements per chunk, chunks per group
    num_groups,  # G
    BLOCK: tl.constexpr,  # BLOCK * LOADS_IN_FLIGHT lanes: that many 16-byte loads a thread an iteration
):
    pid_group = tl.program_id(0).to(tl.int64)  # n * G + g
    pid_chunk = tl.program_id(1)
    _, base, start, end = _group_chunk(pid_group, pid_chunk, hw, cpg, 0, channels, group_len, chunk_len, num_groups,
                                       False)
    count, mean, m2 = _chunk_moments(x_ptr, base, start, end, hw, 0, channels, False, BLOCK)
    out = pid_group * split + pid_chunk
    row = tl.num_programs(0).to(tl.int64) * split  # N * G * SPLIT: one row of partials
    tl.store(partials_ptr + out, mean)
    tl.store(partials_ptr + row + out, m2)
    tl.store(partials_ptr + 2 * row + out, count)


@triton.jit
def _group_apply_kernel(
    x_ptr, y_ptr,  # input and output, (N, C, *spatial) NCHW-contiguous
    w_ptr, b_ptr,  # (C,) weight and bias (ignored unless HAS_WEIGHT / HAS_BIAS)
    partials_ptr,  # fp32 (3, N * G * SPLIT): each chunk's mean, M2 and count, from _group_stats_kernel
    hw, cpg, channels, group_len, chunk_len, split, num_groups, eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    CHANNEL_PER_BLOCK: tl.constexpr,  # H*W % BLOCK == 0 (see _normalize_chunk)
    SPLIT_BLOCK: tl.constexpr,  # next power of two >= split
    BLOCK: tl.constexpr,
    LOADS: tl.constexpr,  # 1, or 2: each block's load issued a block ahead (LOADS_IN_FLIGHT)
):
    pid_group = tl.program_id(0).to(tl.int64)
    pid_chunk = tl.program_id(1)
    g, base, start, end = _group_chunk(pid_group, pid_chunk, hw, cpg, 0, channels, group_len, chunk_len, num_groups,
                                       False)
    # Combine the group's partials (Chan): mean = sum(c_i m_i) / sum(c_i), M2 = sum(M2_i) + sum(c_i (m_i - mean)^2).
    s = tl.arange(0, SPLIT_BLOCK)
    smask = s < split
    row = tl.num_programs(0).to(tl.int64) * split  # the same grid as _group_stats_kernel's
    means = tl.load(partials_ptr + pid_group * split + s, mask=smask, other=0.0)
    m2s = tl.load(partials_ptr + row + pid_group * split + s, mask=smask, other=0.0)
    counts = tl.load(partials_ptr + 2 * row + pid_group * split + s, mask=smask, other=0.0)
    total = tl.sum(counts, axis=0)
    mean = tl.sum(counts * means, axis=0) / total
    d = tl.where(smask, means - mean, 0.0)
    var = (tl.sum(m2s, axis=0) + tl.sum(counts * d * d, axis=0)) / total
    rstd = 1.0 / tl.sqrt(var + eps)
    _normalize_chunk(x_ptr, y_ptr, w_ptr, b_ptr, base, start, end, g, mean, rstd, hw, cpg, 0, channels, False,
                     HAS_WEIGHT, HAS_BIAS, SILU, CHANNEL_PER_BLOCK, BLOCK, LOADS)


@triton.jit
def _group_norm_one_pass_kernel(
    x_ptr, y_ptr,  # input and output, (N, C, *spatial), same shape and memory format
    w_ptr, b_ptr,  # (C,) weight and bias (ignored unless HAS_WEIGHT / HAS_BIAS)
    hw, cpg, channels, group_len, num_groups, eps,  # H*W, C/G, C, (C/G)*H*W, G, epsilon
    CPG: tl.constexpr,  # C/G as a compile-time constant in channels_last; 0 in NCHW
    CHANNELS_LAST: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    CHANNEL_PER_BLOCK: tl.constexpr,  # NCHW and H*W % BLOCK == 0 (see _normalize_chunk)
    BLOCK: tl.constexpr,
):
    pid_group = tl.program_id(0).to(tl.int64)  # n * G + g: one program per group, statistics then output
    g, base, start, end = _group_chunk(pid_group, 0, hw, cpg, CPG, channels, group_len, group_len, num_groups,
                                       CHANNELS_LAST)
    count, mean, m2 = _chunk_moments(x_ptr, base, start, end, hw, CPG, channels, CHANNELS_LAST, BLOCK)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    _normalize_chunk(x_ptr, y_ptr, w_ptr, b_ptr, base, start, end, g, mean, rstd, hw, cpg, CPG, channels,
                     CHANNELS_LAST, HAS_WEIGHT, HAS_BIAS, SILU, CHANNEL_PER_BLOCK, BLOCK, 1)


def _layout(x: torch.Tensor):
    """(tensor to read, channels_last?) — NCHW-contiguous and channels_last are read in place; others are copied."""
    if x.is_contiguous():
        return x, False
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False  # documented copy for any other layout


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=True):
    """GroupNorm (+ SiLU) of ``x`` (N, C, *spatial); statistics in fp32, output in x's dtype and memory format."""
    _validate.group_norm_args(x, num_groups, weight, bias, eps)
    return _group_norm_silu_unchecked(x, num_groups, weight, bias, eps, silu)


def _group_norm_silu_unchecked(x, num_groups, weight, bias, eps, silu=True):
    """``group_norm_silu`` for arguments its caller has validated: ``diffusion_fast.ops`` checks the public call's
    once, and its internal entry passes a GroupNorm module's own parameters. Outside a CUDA graph this host code runs
    before every launch, and the checks cost as much as the rest of it (benchmarks/launcher_host_cost.py)."""
    if x.dtype == torch.float64:
        raise TypeError("x: the Triton group_norm_silu kernel takes float16, bfloat16 or float32, got float64")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("x is on the CPU: the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1")
    x, channels_last = _layout(x)
    n, c = x.shape[:2]
    hw = math.prod(x.shape[2:])
    cpg = c // num_groups
    group_len = cpg * hw
    y = torch.empty_like(x)  # same memory format as x
    w = weight.contiguous() if weight is not None else x
    b = bias.contiguous() if bias is not None else x
    # In channels_last C/G is a compile-time constant, so the offsets are multiply-shifts with known contiguous runs,
    # which the compiler vectorises (benchmarks/sass_report.py); one compile per C/G value (SD's UNet has nine, none
    # per resolution). NCHW gains nothing from it (a group is one contiguous run) and keeps one compile for all C/G.
    output = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=bool(silu))
    flags = dict(output, CHANNEL_PER_BLOCK=not channels_last and hw % BLOCK == 0, BLOCK=BLOCK, num_warps=NUM_WARPS)
    if x.numel() <= ONE_PASS_MAX_ELEMENTS:
        _group_norm_one_pass_kernel[(n * num_groups,)](x, y, w, b, hw, cpg, c, group_len, num_groups, float(eps),
                                                       CPG=cpg if channels_last else 0, CHANNELS_LAST=channels_last,
                                                       **flags)
        return y
    if channels_last:
        return channels_last_split(x, y, w, b, num_groups, eps, output, BLOCK, TARGET_PROGRAMS, NUM_WARPS)
    stats_block = BLOCK * LOADS_IN_FLIGHT  # chunks are whole statistics blocks (and so whole output blocks)
    split = max(1, min(cdiv(TARGET_PROGRAMS, n * num_groups), cdiv(group_len, stats_block)))
    chunk_len = cdiv(cdiv(group_len, split), stats_block) * stats_block
    split = cdiv(group_len, chunk_len)
    partials = torch.empty((3, n * num_groups * split), device=x.device, dtype=torch.float32)
    grid = (n * num_groups, split)
    _group_stats_kernel[grid](x, partials, hw, cpg, c, group_len, chunk_len, split, num_groups, BLOCK=stats_block,
                              num_warps=NUM_WARPS)
    _group_apply_kernel[grid](x, y, w, b, partials, hw, cpg, c, group_len, chunk_len, split, num_groups, float(eps),
                              SPLIT_BLOCK=next_power_of_2(split), LOADS=LOADS_IN_FLIGHT, **flags)
    return y
