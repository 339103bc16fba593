"""The Triton flash-attention kernel against the float64 reference, by flash-attention's 2x rule.

Under the interpreter the kernel runs its pinned config (32 x 32 tiles), so the lengths below are chosen against 32:
a whole number of key tiles, whole tiles plus a masked tail, and a lone masked tail.
"""
import warnings

import pytest
import torch
from conftest import DEVICE, ON_GPU

import diffusion_fast.ops as ops
from _numerics import assert_2x_rule, poisoned_allocations
from diffusion_fast import reference
from diffusion_fast.kernels import attention as kernel

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

CASES = [  # (B, H, Lq, Lk, D)
    (2, 3, 50, 77, 40),  # SD1.5's head dim 40 (padded to 64) against 77 text tokens: neither a block multiple
    (1, 2, 97, 97, 80),  # head dim 80 (padded to 128), self-attention of odd length 97: 3 whole key tiles + 1 key
    (3, 2, 33, 33, 64),  # batch 3, a power-of-two head dim (no head-dim mask), a length just past a block
    (1, 2, 45, 64, 32),  # Lk exactly 2 key tiles and D = BLOCK_D: the fully unmasked loop, no tail tile
    (1, 1, 40, 40, 160),  # head dim 160 (SD1.5's deepest blocks), padded to 256
    (2, 1, 1, 77, 40),  # a single query row
    (1, 2, 20, 20, 8),  # head dim below the 16-wide minimum of a dot, keys fewer than one tile: a lone masked tail
]
SD_SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 256, 256, 160),
             (1, 10, 4096, 4096, 64)]  # real SD1.5 / SDXL shapes: GPU only (the interpreter would take minutes)
if ON_GPU:
    CASES += SD_SHAPES


def _qkv(shape, dtype, gen, as_views, magnitude=1.0):
    b, h, lq, lk, d = shape
    if as_views:  # (B, L, H*D) projections viewed as (B, H, L, D): the layout the models pass, no copy
        mk = lambda length: (torch.randn(b, length, h * d, generator=gen) * magnitude).to(DEVICE, dtype).view(
            b, length, h, d).transpose(1, 2)
        return mk(lq), mk(lk), mk(lk)
    return tuple((torch.randn(b, h, n, d, generator=gen) * magnitude).to(DEVICE, dtype) for n in (lq, lk, lk))


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("as_views", [False, True])
def test_matches_reference(shape, dtype, as_views, monkeypatch):
    # On a GPU, tune only the real shapes in the models' fp16 view layout (tuning every case would take minutes);
    # the rest run the fixed tile table.
    monkeypatch.setattr(kernel, "AUTOTUNE", kernel.AUTOTUNE and shape in SD_SHAPES and dtype == torch.float16
                        and as_views)
    q, k, v = _qkv(shape, dtype, torch.Generator().manual_seed(sum(shape)), as_views)
    if as_views and shape[1] > 1 and shape[2] > 1:  # one head or one row is trivially contiguous
        assert not q.is_contiguous()
    with poisoned_allocations():
        out = kernel.attention(q, k, v)
    assert out.is_contiguous() and out.dtype == dtype
    ref64 = reference.attention(q.double(), k.double(), v.double())
    plain = reference.attention(q, k, v)
    assert_2x_rule(out, ref64, plain, floor=FLOOR[dtype], what=f"{shape} {dtype}")


def test_custom_scale():
    q, k, v = _qkv((1, 2, 30, 45, 24), torch.float32, torch.Generator().manual_seed(1), False)
    out = kernel.attention(q, k, v, scale=0.05)
    assert_2x_rule(out, reference.attention(q.double(), k.double(), v.double(), scale=0.05),
                   reference.attention(q, k, v, scale=0.05), floor=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_huge_scores_stay_finite(dtype):
    """Scores near +-2e3 (inputs of magnitude 7): exp of an unshifted score overflows even fp32, so this fails unless
    the running maximum is subtracted; the key tail (Lk = 77) also puts -inf lanes next to the largest scores."""
    q, k, v = _qkv((1, 2, 40, 77, 40), dtype, torch.Generator().manual_seed(7), False, magnitude=7.0)
    with poisoned_allocations():
        out = kernel.attention(q, k, v)
    assert_2x_rule(out, reference.attention(q.double(), k.double(), v.double()), reference.attention(q, k, v),
                   floor=FLOOR[dtype], what=f"huge scores {dtype}")


def test_head_dim_512_falls_back_once_with_a_warning():
    """The VAE's mid-block attention has one head of dim 512: outside the kernel, routed to SDPA, announced once."""
    q = torch.randn(1, 1, 16, 512, device=DEVICE)
    assert not kernel.supports(q)
    assert kernel.supports(q[..., :256]) and not kernel.supports(q[..., :256].double())
    ops._warned.discard(f"attn-fallback-512-{q.dtype}")
    with pytest.warns(RuntimeWarning, match="head dim 512"):
        out = ops.attention(q, q, q, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.attention(q, q, q, backend="triton")  # the second call is silent
    torch.testing.assert_close(out, reference.attention(q, q, q), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="outside the kernel's range"):
        kernel.attention(q, q, q)


@pytest.mark.parametrize("q_shape, k_shape, message", [
    ((2, 3, 5, 8), (2, 4, 7, 8), "must agree on B, H and D"),  # heads differ
    ((2, 3, 5, 8), (3, 3, 7, 8), "must agree on B, H and D"),  # batch differs
    ((2, 3, 5, 8), (2, 3, 7, 16), "must agree on B, H and D"),  # head dim differs
    ((3, 5, 8), (3, 7, 8), "q must be 4-d"),
    ((1, 3, 5, 8), (3, 7, 8), "k must be 4-d"),
])
def test_bad_shapes_name_the_argument(q_shape, k_shape, message):
    q, k = torch.randn(q_shape, device=DEVICE), torch.randn(k_shape, device=DEVICE)
    for attend in (kernel.attention, ops.attention):
        with pytest.raises(ValueError, match=message):
            attend(q, k, k)


def test_bad_dtypes_and_arguments_name_the_argument():
    q = torch.randn(1, 1, 4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has dtype torch.float32"):
        ops.attention(q, q.half(), q.half(), backend="triton")
    with pytest.raises(TypeError, match="v has dtype torch.float16 but q has dtype torch.float32"):
        kernel.attention(q, q, q.half())
    for attend in (kernel.attention, ops.attention):
        with pytest.raises(TypeError, match="q must have dtype in"):
            attend(q.int(), q.int(), q.int())
        with pytest.raises(ValueError, match="v has shape"):
            attend(q, q, torch.randn(1, 1, 5, 8, device=DEVICE))
        with pytest.raises(ValueError, match="scale must be > 0"):
            attend(q, q, q, scale=-1.0)
        with pytest.raises(TypeError, match="q must be a torch.Tensor"):
            attend(q.tolist(), q, q)


def _shared_memory_bytes(config, block_d, itemsize=2):
    """q tile + num_stages buffers of the k and v tiles: a lower bound on what the compiled kernel allocates."""
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return itemsize * (m * block_d + config.num_stages * 2 * n * block_d)


@pytest.mark.parametrize("len_q, len_k, head_dim", [
    (4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80), (1024, 77, 80), (256, 256, 160), (256, 77, 160),
    (64, 64, 160), (64, 77, 160),  # every SD1.5 attention at 512 px
    (9216, 9216, 40), (1, 77, 40), (5, 3, 256),  # 768 px, a single query row, the widest head with three keys
])
def test_tuning_space_is_small_and_fits_an_h100(len_q, len_k, head_dim):
    """The pruned autotune list (pure Python, so checked here without a GPU): non-empty, at most 14 configs, each
    within the H100's 227 KB of shared memory, no key tile wider than the keys need, and fp32 gets exactly one."""
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    for dtype in (torch.float16, torch.bfloat16):
        args = {"len_q": len_q, "len_k": len_k, "q_ptr": torch.empty(1, dtype=dtype)}
        configs = kernel._prune_configs(kernel._TUNING_SPACE, args, BLOCK_D=block_d, grid=None, warmup=False)
        assert 1 <= len(configs) <= 14
        for c in configs:
            assert _shared_memory_bytes(c, block_d) <= 227 * 1024, c
            assert c.kwargs["BLOCK_N"] <= max(32, 1 << (len_k - 1).bit_length()), c
            assert block_d < 256 or c.kwargs["BLOCK_M"] == 64, c
    args = {"len_q": len_q, "len_k": len_k, "q_ptr": torch.empty(1, dtype=torch.float32)}
    (fp32,) = kernel._prune_configs(kernel._TUNING_SPACE, args, BLOCK_D=block_d, grid=None, warmup=False)
    assert _shared_memory_bytes(fp32, block_d, itemsize=4) <= 227 * 1024
