"""Running statistics in fp32 that stay accurate over long reductions (GroupNorm's groups of up to 262,144 elements):
Welford's update per lane and Chan's formula to merge sets, where a plain sum of squares loses digits to
cancellation. Shared by GroupNorm's NCHW and channels_last plans."""
import triton
import triton.language as tl


@triton.jit
def _chan_merge(count, mean, m2, n_b, b_mean, b_m2):
    """Chan's parallel formula: (count, mean, M2) of a set merged with a block's (n_b, b_mean, b_m2)."""
    total = count + n_b
    delta = b_mean - mean
    return total, mean + delta * (n_b / total), m2 + b_m2 + delta * delta * (count * n_b / total)


@triton.jit
def _lanes_merged(count, mean, m2, AXIS: tl.constexpr):
    """(count, mean, M2) of lanes merged along AXIS (None: all), each lane's (count, mean, M2) given (Chan)."""
    total = tl.sum(count, axis=AXIS)
    merged = tl.sum(count * mean, axis=AXIS) / tl.maximum(total, 1.0)
    d = mean - (merged if AXIS is None else tl.expand_dims(merged, AXIS))
    return total, merged, tl.sum(m2 + count * d * d, axis=AXIS)
