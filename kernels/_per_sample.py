"""What the scheduler-step kernels share: a per-sample coefficient (one value per sample of the batch) for a block."""
import triton
import triton.language as tl


@triton.jit
def per_sample_value(
    ptr,  # fp32 (B,): one value per sample
    block_start, offs, mask,  # this program's first element, its element offsets and their mask
    per_sample,  # elements per sample
    other,  # the value for masked-off elements (any that keeps the arithmetic finite)
    SAMPLE_PER_BLOCK: tl.constexpr,  # per_sample % BLOCK == 0: the block lies in one sample
):
    """The block's value as a scalar, read once, when the block lies in one sample (so every coefficient derived
    from it is computed once, not per element); else each element's own."""
    if SAMPLE_PER_BLOCK:
        value = tl.load(ptr + block_start // per_sample)
    else:
        value = tl.load(ptr + offs // per_sample, mask=mask, other=other)
    return value
