"""The Triton GroupNorm(+SiLU) kernel against the float64 reference, by flash-attention's 2x rule.

Runs under Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1) and compiled on a GPU. Every output is
allocated while torch.empty* returns NaN-filled tensors, so an element the kernel forgets to write fails the test.
"""
import pytest
import torch
from conftest import DEVICE, ON_GPU

from _numerics import assert_2x_rule, poisoned_allocations
from diffusion_fast import ops, reference
from diffusion_fast.kernels import group_norm_silu as gn_module
from diffusion_fast.kernels.group_norm_silu import group_norm_silu

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])  # no bf16 arithmetic in the interpreter

SHAPES = [
    ((2, 64, 16, 16), 32),  # SD-like, scaled down: 2 channels a group, a square power-of-two map
    ((3, 96, 7, 9), 32),  # C=96 with 32 groups (3 channels a group, not a power of two), odd 7x9 map, batch 3
    ((2, 64, 1, 1), 32),  # a 1x1 map: two elements a group, and NCHW and channels_last strides describe one layout
    ((1, 32, 48, 40), 4),  # 15360 elements a group on 4 groups: several chunks a group, several tiles a chunk
    ((2, 40, 300), 8),  # a 3-d (N, C, L) input, as a 1-d sequence (5 channels a group)
]
if ON_GPU:
    SHAPES += [((2, 320, 64, 64), 32), ((1, 512, 128, 128), 32)]  # real SD1.5 UNet and VAE-decoder shapes


def _inputs(shape, dtype, channels_last, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3 + 0.7).to(DEVICE, dtype)  # non-zero mean, non-unit variance
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(shape[1], generator=gen) + 1).to(DEVICE, dtype)
    b = torch.randn(shape[1], generator=gen).to(DEVICE, dtype)
    return x, w, b


def _check(x, groups, weight, bias, silu, floor, what):
    with poisoned_allocations():
        out = group_norm_silu(x, groups, weight, bias, 1e-5, silu=silu)
    ref64 = reference.group_norm_silu(x.double(), groups, None if weight is None else weight.double(),
                                      None if bias is None else bias.double(), 1e-5, silu=silu)
    plain = reference.group_norm_silu(x, groups, weight, bias, 1e-5, silu=silu)  # PyTorch in x's dtype
    assert_2x_rule(out, ref64, plain, floor=floor, what=what)
    assert out.dtype == x.dtype
    return out


@pytest.mark.parametrize("shape, groups", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference(shape, groups, dtype, channels_last):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is a 4-d memory format")
    x, w, b = _inputs(shape, dtype, channels_last, seed=sum(shape) + groups)
    out = _check(x, groups, w, b, True, FLOOR[dtype], f"{shape} {dtype} channels_last={channels_last}")
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("use_weight, use_bias, silu", [(True, False, False), (False, True, True), (False, False, False)])
def test_affine_and_silu_are_optional(channels_last, use_weight, use_bias, silu):
    # 5x7 map, 4 channels a group: small, odd, and every combination the SD-shaped test above does not cover
    x, w, b = _inputs((2, 16, 5, 7), torch.float16, channels_last, seed=7)
    _check(x, 4, w if use_weight else None, b if use_bias else None, silu, FLOOR[torch.float16],
           f"weight={use_weight} bias={use_bias} silu={silu} channels_last={channels_last}")


def test_multi_chunk_shape_really_splits():
    """The 48x40 shape above must run the partial-statistics merge in both layouts, or that path is untested."""
    groups, cpg, hw = 4, 8, 48 * 40
    _, split_nchw = gn_module.plan(groups, cpg * hw, gn_module.BLOCK)
    _, split_cl = gn_module.plan(groups, hw, gn_module.BLOCK // cpg)
    assert split_nchw > 1 and split_cl > 1


@pytest.mark.parametrize("n_groups, length, tile, target", [(64, 40960, 2048, 1056), (32, 1 << 20, 2048, 1056),
                                                             (4, 7, 512, 16), (1, 1000, 64, 16), (200, 5000, 64, 16)])
def test_plan_covers_every_element_in_whole_tiles(n_groups, length, tile, target):
    chunk_len, split = gn_module.plan(n_groups, length, tile, target)
    assert chunk_len % tile == 0 and chunk_len > 0
    assert (split - 1) * chunk_len < length <= split * chunk_len  # covered, and no chunk is empty
    if length >= target // n_groups * tile:  # enough work: the grid reaches the target program count
        assert n_groups * split >= target // 2


def test_large_offset_group_keeps_fp32_accuracy():
    # One group of 262,144 elements (the VAE decoder's size) with mean 300 and std 1: sum and sum-of-squares in
    # fp32 would lose ~3 digits of the variance to cancellation; per-tile two-pass + Chan merging does not.
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 4, 256, 256, generator=gen) + 300).to(DEVICE)
    _check(x, 1, None, None, False, 1e-5, "262144-element group, mean 300")


def test_other_layouts_are_copied_and_still_right():
    x = torch.randn(2, 16, 5, 6, device=DEVICE)[:, :, :, ::2]  # a strided view: neither NCHW nor channels_last
    out = _check(x, 4, None, None, True, 1e-5, "strided view")
    assert out.is_contiguous()


def test_channels_last_with_huge_groups_warns_and_keeps_the_format():
    cpg = 2 * gn_module.BLOCK  # one group's channels do not fit one channels_last tile
    x = torch.randn(1, cpg, 2, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with pytest.warns(UserWarning, match="copies x to NCHW"):
        out = _check(x, 1, None, None, True, 1e-5, "channels_last, one group of 2*BLOCK channels")
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_ops_dispatch_with_triton_backend():
    x = torch.randn(2, 32, 5, 5, device=DEVICE)
    out = ops.group_norm_silu(x, 8, backend="triton")
    torch.testing.assert_close(out, reference.group_norm_silu(x, 8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, error, message", [
    ((torch.randn(2, 30, 4, 4), 8), ValueError, "num_groups=8 must be positive and divide the channel count 30"),
    ((torch.randn(2, 32, 4, 4), 0), ValueError, "num_groups=0 must be positive"),
    ((torch.randn(2, 32, 4, 4), 8, torch.ones(16)), ValueError, "weight must have 32 elements"),
    ((torch.randn(2, 32, 4, 4), 8, None, torch.ones(32, 1)), ValueError, "bias must be 1-d"),
    ((torch.ones(2, 32, 4, 4, dtype=torch.int32), 8), TypeError, "x must have dtype in"),
    ((torch.randn(0, 32, 4, 4), 8), ValueError, "x is empty"),
    ((torch.randn(2, 32, 4, 4), 8.0), TypeError, "num_groups must be an int"),
    ((torch.randn(32), 8), ValueError, "x must have at least 2 dims"),
    ((torch.randn(2, 32, 4, 4, dtype=torch.float64), 8), TypeError, "takes float16, bfloat16 or float32"),
    ((torch.randn(2, 32, 4, 4), 8, None, None, 0.0), ValueError, "eps must be > 0"),
    ((torch.randn(2, 32, 4, 4), 8, None, None, float("nan")), ValueError, "eps must be finite"),
])
def test_bad_input_names_the_argument(args, error, message):
    args = tuple(a.to(DEVICE) if torch.is_tensor(a) else a for a in args)
    with pytest.raises(error, match=message):
        group_norm_silu(*args)


def test_group_past_int32_indexing_is_refused_before_any_copy():
    x = torch.ones(1, device=DEVICE).expand(1, 2, 2**15, 2**16)  # a 2^32-element group as a stride-0 view: no memory
    with pytest.raises(ValueError, match="x: a group of 4294967296 elements"):
        group_norm_silu(x, 1)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(gn_module, "INTERPRET", False)  # on CPU machines the interpreter is on: pretend it is off
    with pytest.raises(ValueError, match="x is on cpu"):
        group_norm_silu(torch.randn(1, 4, 2, 2), 2)
