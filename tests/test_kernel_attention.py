"""The Triton flash-attention kernel against the float64 reference, by flash-attention's 2x rule."""
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
    (1, 2, 97, 97, 80),  # head dim 80 (padded to 128), self-attention of odd length 97
    (3, 2, 33, 33, 64),  # batch 3, a power-of-two head dim, a length just past a block
    (1, 1, 40, 40, 160),  # head dim 160 (SD1.5's deepest blocks), padded to 256
    (2, 1, 1, 77, 40),  # a single query row
    (1, 2, 20, 20, 8),  # head dim below the 16-wide minimum of a dot: padded up
    # lengths that are multiples of the blocks (32 interpreted; SD's 4096/1024/256 compiled): the unmasked
    # EVEN_M/EVEN_N path, at a split head dim (80), a padded one (24) and SD1.5's 40 (padded to 64)
    (2, 2, 64, 64, 80),
    (1, 2, 64, 32, 40),
    (1, 3, 32, 96, 24),
]
if ON_GPU:
    CASES += [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 256, 256, 160),
              (1, 10, 4096, 4096, 64),  # real SD1.5 / SDXL shapes
              (1, 2, 16384, 16384, 40)]  # SD1.5 at 1024 px (a 128x128 latent's first level): the longest length


def _qkv(shape, dtype, gen, as_views):
    b, h, lq, lk, d = shape
    if as_views:  # (B, L, H*D) projections viewed as (B, H, L, D): the layout the models pass, no copy
        mk = lambda length: torch.randn(b, length, h * d, generator=gen).to(DEVICE, dtype).view(b, length, h, d).transpose(1, 2)
        return mk(lq), mk(lk), mk(lk)
    return tuple(torch.randn(b, h, n, d, generator=gen).to(DEVICE, dtype) for n in (lq, lk, lk))


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("as_views", [False, True])
def test_matches_reference(shape, dtype, as_views):
    q, k, v = _qkv(shape, dtype, torch.Generator().manual_seed(sum(shape)), as_views)
    if as_views and shape[1] > 1 and shape[2] > 1:  # one head or one row is trivially contiguous
        assert not q.is_contiguous()
    with poisoned_allocations():
        out = kernel.attention(q, k, v)
    ref64 = reference.attention(q.double(), k.double(), v.double())
    plain = reference.attention(q, k, v)
    assert_2x_rule(out, ref64, plain, floor=FLOOR[dtype], what=f"{shape} {dtype}")


def test_custom_scale():
    q, k, v = _qkv((1, 2, 30, 45, 24), torch.float32, torch.Generator().manual_seed(1), False)
    out = kernel.attention(q, k, v, scale=0.05)
    assert_2x_rule(out, reference.attention(q.double(), k.double(), v.double(), scale=0.05),
                   reference.attention(q, k, v, scale=0.05), floor=1e-5)


def test_head_dim_512_falls_back_once_with_a_warning():
    """The VAE's mid-block attention has one head of dim 512: outside the kernel, routed to SDPA, announced once."""
    q = torch.randn(1, 1, 16, 512, device=DEVICE)
    assert not kernel.supports(q)
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
    ((2, 3, 5, 8), (2, 4, 7, 8), "must agree on B, H and D"),
    ((2, 3, 5, 8), (2, 3, 7, 16), "must agree on B, H and D"),
    ((3, 5, 8), (3, 7, 8), "q must be 4-d"),
])
def test_bad_shapes_name_the_argument(q_shape, k_shape, message):
    q, k = torch.randn(q_shape, device=DEVICE), torch.randn(k_shape, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        kernel.attention(q, k, k)


def test_bad_dtypes_name_the_argument():
    q = torch.randn(1, 1, 4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has dtype torch.float32"):
        ops.attention(q, q.half(), q.half(), backend="triton")
    with pytest.raises(TypeError, match="q must have dtype in"):
        ops.attention(q.int(), q.int(), q.int())
    with pytest.raises(ValueError, match="v has shape"):
        ops.attention(q, q, torch.randn(1, 1, 5, 8, device=DEVICE))


@pytest.mark.parametrize("strides, element_size, expected", [
    ([320, 40, 320, 0], 2, 8),  # SD1.5's head dim 40 as the models' (B, L, H*D) view: 16-byte rows in fp16
    ([163840, 40, 40], 4, 4),  # the same in fp32: 16 bytes is 4 elements
    ([40, 20, 12], 2, 4),  # 12 elements: 8-byte rows at best
    ([41, 320], 2, 1),  # an odd stride anywhere: element-aligned only
])
def test_alignment_is_the_largest_power_of_two_dividing_every_stride(strides, element_size, expected):
    assert kernel._alignment(strides, element_size) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("width, head_dim, offset", [
    (41, 40, 0),  # rows 41 elements apart (a slice of a wider tensor): the H200 got these wrong before the copy
    (12, 12, 0),  # head dim 12 contiguous: 24-byte rows in fp16, padded to 32 bytes by the copy
    (41, 40, 1),  # a base one element past the allocation's: no row is 16-byte aligned
])
def test_rows_not_16_bytes_apart(dtype, width, head_dim, offset, monkeypatch):
    """Views whose rows are not 16 bytes apart are copied into aligned rows before the launch, and the answer holds."""
    launched, real_launch = [], kernel._launch
    monkeypatch.setattr(kernel, "_launch", lambda *args, **kw: (launched.extend(args[:4]), real_launch(*args, **kw)))
    gen = torch.Generator().manual_seed(7)
    wide = [torch.randn(2, 3, n, width + offset, generator=gen).to(DEVICE, dtype) for n in (19, 23, 23)]
    q, k, v = (t[..., offset:offset + head_dim] for t in wide)
    aligned = kernel._kernel_ready(q)
    misaligned = q.stride(2) * q.element_size() % 16 or q.data_ptr() % 16  # (fp32's 12 is 48 bytes: aligned)
    assert (aligned is not q) == bool(misaligned) and torch.equal(aligned, q)
    assert aligned.stride(2) * aligned.element_size() % 16 == 0 and aligned.data_ptr() % 16 == 0
    with poisoned_allocations():
        out = kernel.attention(q, k, v)
    assert out.is_contiguous() and out.shape == q.shape
    assert all(t.stride(2) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0 for t in launched)  # q, k, v, out
    assert_2x_rule(out, reference.attention(q.double(), k.double(), v.double()), reference.attention(q, k, v),
                   floor=FLOOR[dtype])


def test_a_last_stride_other_than_one_is_copied_first():
    """q, k, v with head-dim elements strided (a (B, H, D, L) tensor transposed): copied into aligned rows, right."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 40, n, generator=gen).to(DEVICE).transpose(2, 3) for n in (19, 23, 23))
    assert q.stride(3) != 1
    with poisoned_allocations():
        out = kernel.attention(q, k, v)
    assert_2x_rule(out, reference.attention(q.double(), k.double(), v.double()), reference.attention(q, k, v),
                   floor=FLOOR[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_models_views_are_not_copied(dtype):
    """SD1.5's (B, L, H*D) projections viewed as (B, H, L, D) at head dim 40, fused q/k/v included: no copy."""
    x = torch.randn(2, 77, 3, 8, 40, dtype=dtype, device=DEVICE)  # (B, L, 3, H, D): the fused projection's view
    for t in (x[:, :, 0].transpose(1, 2), x.view(2, 77, 3 * 8 * 40)[..., :320].view(2, 77, 8, 40).transpose(1, 2)):
        assert kernel._kernel_ready(t) is t


def test_batches_past_the_grid_limit_launch_in_chunks(monkeypatch):
    """More (batch, head) columns than the grid's second axis holds: launched in batch chunks, every row written.
    The limit is lowered to 4 so batch 3 x 2 heads needs two launches (65535 real columns would take hours here)."""
    monkeypatch.setattr(kernel, "MAX_GRID_Y", 4)
    grids, real = [], kernel._flash_attention_kernel

    class Recording:  # records each launch's grid, then launches the real kernel
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(kernel, "_flash_attention_kernel", Recording())
    q, k, v = _qkv((3, 2, 9, 13, 16), torch.float32, torch.Generator().manual_seed(3), as_views=True)
    with poisoned_allocations():
        out = kernel.attention(q, k, v)
    assert [g[1] for g in grids] == [4, 2]  # batches {0, 1} then {2}, two heads each
    assert_2x_rule(out, reference.attention(q.double(), k.double(), v.double()), reference.attention(q, k, v),
                   floor=FLOOR[torch.float32])
    monkeypatch.setattr(kernel, "MAX_GRID_Y", 1)
    with pytest.raises(ValueError, match="q has 2 heads"):
        kernel.attention(q, k, v)


@pytest.mark.parametrize("shape", [c for c in CASES if c[-1] in (40, 80, 160)][:3])
def test_padded_head_dim_variant_matches_reference(shape, monkeypatch):
    """SPLIT_HEAD_DIM = False (the A/B the GPU benchmark times) pads the head dim instead: also right."""
    monkeypatch.setattr(kernel, "SPLIT_HEAD_DIM", False)
    assert kernel._head_dim_blocks(shape[-1], False)[1] == 0
    q, k, v = _qkv(shape, torch.float16, torch.Generator().manual_seed(11), as_views=True)
    with poisoned_allocations():
        out = kernel.attention(q, k, v)
    assert_2x_rule(out, reference.attention(q.double(), k.double(), v.double()), reference.attention(q, k, v),
                   floor=FLOOR[torch.float16])


@pytest.mark.parametrize("head_dim, blocks", [(40, (64, 0)), (80, (64, 16)), (160, (128, 32)), (64, (64, 0)),
                                              (24, (32, 0)), (8, (16, 0)), (72, (64, 16)), (96, (128, 0))])
def test_head_dim_blocks(head_dim, blocks):
    """16-bit: a split only where it saves more than a quarter of the padded lanes: 24 would be 16 + 16, no better
    than padding to 32; 40 = 32 + 16 and 96 = 64 + 32 save exactly a quarter (40 measured slower split on the H200).
    fp32 (no tensor cores) splits wherever a lane is saved."""
    assert kernel._head_dim_blocks(head_dim, True) == blocks
    assert kernel._head_dim_blocks(head_dim, True, torch.bfloat16) == blocks
    fp32 = {40: (32, 16), 96: (64, 32)}.get(head_dim, blocks)
    assert kernel._head_dim_blocks(head_dim, True, torch.float32) == fp32
