"""What the scheduler-step kernels share: which sample a program works on, and its block of that sample's elements.

The grid is flat, ``blocks_per_sample * B`` programs, and no block spans two samples (a sample's last block is
masked), so a per-sample value (an alpha, a sigma) is one scalar load a program and every coefficient derived from
it is computed once a program, not per element. The sample index is an inline 32-bit divide of the program id; the
element offsets are int64 (a batch of latents can pass 2^31 elements). ``sample_blocks`` is the launch that
``sample_block`` expects."""
import math

import triton
import triton.language as tl

from ._host import cdiv


def sample_blocks(shape, block: int):
    """(grid, per_sample, blocks_per_sample) for a (B, *latent) tensor of this shape and BLOCK."""
    per_sample = math.prod(shape[1:])
    blocks_per_sample = cdiv(per_sample, block)
    return (blocks_per_sample * shape[0],), per_sample, blocks_per_sample


@triton.jit
def sample_block(
    per_sample,  # elements per sample
    blocks_per_sample,  # cdiv(per_sample, BLOCK)
    BLOCK: tl.constexpr,
):
    """(n, offs, mask): this program's sample, its block's element offsets in the (B, *latent) tensor and their
    mask (False past the sample's end)."""
    pid = tl.program_id(0)
    n = pid // blocks_per_sample
    within = (pid % blocks_per_sample).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return n, n.to(tl.int64) * per_sample + within, within < per_sample
