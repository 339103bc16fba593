"""GroupNorm(+SiLU) for large channels_last tensors: the three-launch plan that ``group_norm_silu`` runs.

A group's C/G channels are a short run inside each position's C contiguous channels (10 elements at SD's 320
channels), too short and too unaligned for 16-byte loads; so programs tile (positions x 64 channels) across groups,
reduce per-channel partials over chunks of positions (``_cl_channel_stats_kernel``), a small kernel turns them into
each group's mean and 1/std (``_cl_group_stats_kernel``), and the output pass reads whole aligned rows again
(``_cl_apply_kernel``). The channel tile is the fastest-varying program index, so the programs resident at one time
read whole rows of memory between them, not one 128-byte column of many rows each (no measurable change on the
H200). Element addresses are computed in int64; no program waits on another.
"""
import torch
import triton
import triton.language as tl

from ._host import cdiv, next_power_of_2
from ._welford import _chan_merge, _lanes_merged

CL_BLOCK_C = 64  # channels per tile (128 bytes of fp16 a row)


@triton.jit
def _cl_tile(hw, channels, chunk, c_tiles, BLOCK_C: tl.constexpr):
    """Program (n * split + s) * c_tiles + channel tile: sample n, positions [p_start, p_end) of chunk s, channels c
    (c < C). The channel tile varies fastest, so programs running side by side read neighbouring parts of the same
    rows of memory. Returns the program's (sample, chunk) index too."""
    pid = tl.program_id(0).to(tl.int64)
    tile_c = pid % c_tiles
    pid = pid // c_tiles
    split = tl.cdiv(hw, chunk)
    n = pid // split
    p_start = (pid % split) * chunk
    p_end = tl.minimum(p_start + chunk, hw)
    c = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid, n, p_start, p_end, c, c < channels


@triton.jit
def _cl_channel_stats_kernel(
    x_ptr,  # (N, C, H, W) channels_last: element (n, c, position p) at n*HW*C + p*C + c
    partials_ptr,  # fp32 (2, N, SPLIT, C) out: each channel's mean and M2 over one chunk of positions
    hw, channels, chunk, c_tiles,  # H*W, C, positions per chunk (a multiple of BLOCK_P), channel tiles
    BLOCK_P: tl.constexpr,  # positions per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    pid, n, p_start, p_end, c, c_ok = _cl_tile(hw, channels, chunk, c_tiles, BLOCK_C)
    x_ptr += n * hw * channels
    full_end = p_start + (p_end - p_start) // BLOCK_P * BLOCK_P
    count = 0.0
    lane_mean = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    lane_m2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(p_start, full_end, BLOCK_P):  # Welford per (position lane, channel): no reductions in the loop
        p = p0 + tl.arange(0, BLOCK_P)
        x = tl.load(x_ptr + p[:, None] * channels + c[None, :], mask=c_ok[None, :], other=0.0).to(tl.float32)
        count += 1.0
        delta = x - lane_mean
        lane_mean += delta * (1.0 / count)
        lane_m2 += delta * (x - lane_mean)
    count, mean, m2 = _lanes_merged(count + tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32), lane_mean, lane_m2, 0)
    count = tl.max(count, axis=0)  # (the same for every channel)
    for p0 in range(full_end, p_end, BLOCK_P):  # the short last tile, if any: Chan's formula per channel
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < p_end
        x = tl.load(x_ptr + p[:, None] * channels + c[None, :], mask=p_ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32)
        n_b = tl.minimum(p_end - p0, BLOCK_P).to(tl.float32)
        b_mean = tl.sum(x, axis=0) / n_b
        diff = tl.where(p_ok[:, None], x - b_mean[None, :], 0.0)
        b_m2 = tl.sum(diff * diff, axis=0)
        count, mean, m2 = _chan_merge(count, mean, m2, n_b, b_mean, b_m2)
    row = tl.num_programs(0).to(tl.int64) // c_tiles * channels  # N * SPLIT * C: one row of partials
    tl.store(partials_ptr + pid * channels + c, mean, mask=c_ok)
    tl.store(partials_ptr + row + pid * channels + c, m2, mask=c_ok)


@triton.jit
def _cl_group_stats_kernel(
    partials_ptr,  # fp32 (2, N, SPLIT, C): per-channel means and M2s from _cl_channel_stats_kernel
    stats_ptr,  # fp32 (N * G, 2) out: each group's mean and 1/std
    hw, channels, chunk, split, cpg, num_groups, eps,  # H*W, C, positions per chunk, chunks, C/G, G, epsilon
    SPLIT_BLOCK: tl.constexpr,  # next power of two >= split
    CPG_BLOCK: tl.constexpr,  # next power of two >= C/G
):
    pid = tl.program_id(0).to(tl.int64)  # n * G + g
    n = pid // num_groups
    g = pid % num_groups
    s = tl.arange(0, SPLIT_BLOCK)
    j = tl.arange(0, CPG_BLOCK)
    ok = (s[:, None] < split) & (j[None, :] < cpg)
    offs = (n * split + s[:, None]) * channels + g * cpg + j[None, :]
    row = tl.num_programs(0).to(tl.int64) // num_groups * split * channels  # N * SPLIT * C
    means = tl.load(partials_ptr + offs, mask=ok, other=0.0)
    m2s = tl.load(partials_ptr + row + offs, mask=ok, other=0.0)
    # Chan over (chunk, channel) pairs: a pair's count is its chunk's number of positions
    counts = tl.where(ok, tl.minimum(hw - s * chunk, chunk).to(tl.float32)[:, None], 0.0)
    total = tl.sum(tl.sum(counts, axis=1), axis=0)
    mean = tl.sum(tl.sum(counts * means, axis=1), axis=0) / total
    d = tl.where(ok, means - mean, 0.0)
    var = tl.sum(tl.sum(m2s + counts * d * d, axis=1), axis=0) / total
    tl.store(stats_ptr + pid * 2, mean)
    tl.store(stats_ptr + pid * 2 + 1, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _cl_apply_kernel(
    x_ptr, y_ptr,  # (N, C, H, W) channels_last, input and output
    w_ptr, b_ptr,  # (C,) weight and bias (ignored unless HAS_WEIGHT / HAS_BIAS)
    stats_ptr,  # fp32 (N * G, 2): each group's mean and 1/std
    hw, channels, chunk, c_tiles, cpg, num_groups,  # H*W, C, positions per chunk, channel tiles, C/G, G
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    _, n, p_start, p_end, c, c_ok = _cl_tile(hw, channels, chunk, c_tiles, BLOCK_C)
    group = n * num_groups + c // cpg  # per channel, once per program
    mean = tl.load(stats_ptr + group * 2, mask=c_ok, other=0.0)
    scale = tl.load(stats_ptr + group * 2 + 1, mask=c_ok, other=0.0)
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        shift = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    x_ptr += n * hw * channels
    y_ptr += n * hw * channels
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < p_end)[:, None] & c_ok[None, :]
        offs = p[:, None] * channels + c[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * scale[None, :] + shift[None, :]  # x - mean first: no cancellation at large means
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def channels_last_split(x, y, w, b, num_groups, eps, output, block, target_programs, num_warps):
    """The three-launch plan for a large channels_last x, into y (allocated, channels_last); output: the HAS_WEIGHT,
    HAS_BIAS and SILU constexprs; block, target_programs, num_warps: group_norm_silu's BLOCK (elements a program
    loads an iteration), TARGET_PROGRAMS and NUM_WARPS, passed so that a change to them there holds here."""
    n, c = x.shape[:2]
    hw = x.shape[2] * x.shape[3]
    cpg = c // num_groups
    block_c = min(CL_BLOCK_C, next_power_of_2(c))
    block_p = block // block_c
    c_tiles = cdiv(c, block_c)
    # enough programs to fill the GPU, and few enough chunks that the group kernel's (chunks x C/G) tile stays at
    # 4096 values or fewer (8 warps hold that without spilling, compiled for sm_90)
    cpg_block = next_power_of_2(cpg)
    split = max(1, min(cdiv(target_programs, n * c_tiles), cdiv(hw, block_p), 4096 // cpg_block))
    chunk = cdiv(cdiv(hw, split), block_p) * block_p
    split = cdiv(hw, chunk)
    partials = torch.empty((2, n * split * c), device=x.device, dtype=torch.float32)
    stats = torch.empty((n * num_groups, 2), device=x.device, dtype=torch.float32)
    grid = (n * split * c_tiles,)
    _cl_channel_stats_kernel[grid](x, partials, hw, c, chunk, c_tiles, BLOCK_P=block_p, BLOCK_C=block_c,
                                   num_warps=num_warps)
    _cl_group_stats_kernel[(n * num_groups,)](partials, stats, hw, c, chunk, split, cpg, num_groups,
                                              float(eps), SPLIT_BLOCK=next_power_of_2(split),
                                              CPG_BLOCK=cpg_block, num_warps=8)
    _cl_apply_kernel[grid](x, y, w, b, stats, hw, c, chunk, c_tiles, cpg, num_groups, **output, BLOCK_P=block_p,
                           BLOCK_C=block_c, num_warps=num_warps)
    return y
