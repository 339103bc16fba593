"""The Triton GroupNorm(+SiLU) kernel against the float64 reference, by flash-attention's 2x rule.

Runs under Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1) and compiled on a GPU.
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
    ((2, 64, 16, 16), 32),  # SD-like: 2 channels a group, a square power-of-two map
    ((3, 96, 7, 9), 32),  # C=96 with 32 groups (3 channels a group, not a power of two), odd 7x9 map, batch 3
    ((2, 64, 1, 1), 32),  # a 1x1 map: two elements per group
    ((1, 32, 24, 40), 4),  # 8*960 = 7680 elements a group: 30 interpreted blocks, so several chunks (the partial-
    # statistics combine runs) and the one-pass loop takes many iterations
    ((2, 40, 300), 8),  # a 3-d (N, C, L) input, as a 1-d sequence
    # H*W = 512, a multiple of the block (256 interpreted, 2048 compiled: the GPU's (1, 16, 64, 64) case below), so
    # NCHW takes weight and bias once per block; two blocks per channel move the channel on every other block
    ((1, 64, 16, 32), 16),
]
if ON_GPU:
    SHAPES += [((2, 320, 64, 64), 32), ((1, 512, 128, 128), 32),  # real SD1.5 UNet and VAE-decoder shapes
               ((1, 16, 64, 64), 4)]  # 4096 = two compiled blocks a channel (see (1, 64, 16, 32))


def _inputs(shape, dtype, channels_last, gen):
    x = (torch.randn(shape, generator=gen) * 3 + 0.7).to(DEVICE, dtype)  # non-zero mean, non-unit variance
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(shape[1], generator=gen) + 1).to(DEVICE, dtype)
    b = torch.randn(shape[1], generator=gen).to(DEVICE, dtype)
    return x, w, b


@pytest.fixture(params=["one pass", "split", "split, 2 loads"])
def path(request, monkeypatch):
    """Every launch plan on every shape: one program per group (small tensors), and the split two-launch reduction
    (large tensors), forced here by moving the size threshold; the NCHW split plan also with two blocks loaded at a
    time (LOADS_IN_FLIGHT = 2, the GPU benchmark's A/B; channels_last's split plan has its own kernels, so that
    path skips channels_last)."""
    if request.param == "one pass":
        monkeypatch.setattr(gn_module, "ONE_PASS_MAX_ELEMENTS", 1 << 62)
    else:
        monkeypatch.setattr(gn_module, "ONE_PASS_MAX_ELEMENTS", 0)
    if request.param == "split, 2 loads":
        monkeypatch.setattr(gn_module, "LOADS_IN_FLIGHT", 2)
    return request.param


def _skip_unused(path, channels_last, shape):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is a 4-d memory format")
    if channels_last and path == "split, 2 loads":
        pytest.skip("LOADS_IN_FLIGHT is the NCHW split plan's")


def _affine_kinds(shape_index, w, b):
    """(weight, bias, silu) kinds to run: all four compiled; under the interpreter (the suite's slowest tests) the full
    one and one of the other three, which rotates with the shape, so that every path, layout and dtype still meets
    every kind on two shapes each."""
    kinds = [(w, b, True), (w, None, False), (None, b, True), (None, None, False)]
    return kinds if ON_GPU else [kinds[0], kinds[1 + shape_index % 3]]


@pytest.mark.parametrize("shape_index", range(len(SHAPES)), ids=[f"shape{i}" for i in range(len(SHAPES))])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference(shape_index, dtype, channels_last, path):
    shape, groups = SHAPES[shape_index]
    _skip_unused(path, channels_last, shape)
    gen = torch.Generator().manual_seed(hash((shape, groups)) % 2**31)
    x, w, b = _inputs(shape, dtype, channels_last, gen)
    for weight, bias, silu in _affine_kinds(shape_index, w, b):
        with poisoned_allocations():
            out = group_norm_silu(x, groups, weight, bias, 1e-5, silu=silu)
        ref64 = reference.group_norm_silu(x.double(), groups, None if weight is None else weight.double(),
                                          None if bias is None else bias.double(), 1e-5, silu=silu)
        plain = reference.group_norm_silu(x, groups, weight, bias, 1e-5, silu=silu)
        assert_2x_rule(out, ref64, plain, floor=FLOOR[dtype], what=f"{shape} {dtype} cl={channels_last} silu={silu}")
        assert out.dtype == x.dtype
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_other_layouts_are_copied_and_still_right():
    x = torch.randn(2, 16, 5, 6, device=DEVICE)[:, :, :, ::2]  # a strided view: neither NCHW nor channels_last
    out = group_norm_silu(x, 4)
    assert_2x_rule(out, reference.group_norm_silu(x.double(), 4), reference.group_norm_silu(x, 4), floor=1e-5)


def test_ops_dispatch_with_triton_backend():
    x = torch.randn(2, 32, 5, 5, device=DEVICE)
    out = ops.group_norm_silu(x, 8, backend="triton")
    torch.testing.assert_close(out, reference.group_norm_silu(x, 8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, error, message", [
    ((torch.randn(2, 30, 4, 4), 8), ValueError, "num_groups=8 must be positive and divide the channel count 30"),
    ((torch.randn(2, 32, 4, 4), 8, torch.ones(16)), ValueError, "weight must have 32 elements"),
    ((torch.randn(2, 32, 4, 4), 8, None, torch.ones(32, 1)), ValueError, "bias must be 1-d"),
    ((torch.ones(2, 32, 4, 4, dtype=torch.int32), 8), TypeError, "x must have dtype in"),
    ((torch.randn(0, 32, 4, 4), 8), ValueError, "x is empty"),
    ((torch.randn(2, 32, 4, 4), 8.0), TypeError, "num_groups must be an int"),
    ((torch.randn(32), 8), ValueError, "x must have at least 2 dims"),
    ((torch.randn(2, 32, 4, 4, dtype=torch.float64), 8), TypeError, "takes float16, bfloat16 or float32"),
])
def test_bad_input_names_the_argument(args, error, message):
    args = tuple(a.to(DEVICE) if torch.is_tensor(a) else a for a in args)
    with pytest.raises(error, match=message):
        group_norm_silu(*args)


def test_bad_eps():
    with pytest.raises(ValueError, match="eps must be > 0"):
        ops.group_norm_silu(torch.randn(1, 4, 2, 2, device=DEVICE), 2, eps=0.0, backend="triton")


# The per-lane statistics and their merges on inputs of mean 1000 and std 1, where a sum of squares in fp32 loses the
# variance (E[x^2] - mean^2 cancels 6 digits). The shapes' chunks end on a whole block, end in a short one, or are
# shorter than one block (SHAPES' notes).
@pytest.mark.parametrize("shape, groups", [
    ((2, 40, 300), 8),  # NCHW: 1500 elements a group, 5 interpreted blocks and a short last one
    ((3, 96, 7, 9), 32),  # 189 elements a group, less than a block; channels_last: chunks of 12 positions, last 3
    ((1, 32, 24, 40), 4),  # whole blocks only, several chunks a group
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_statistics_hold_a_large_mean(shape, groups, channels_last, path):
    _skip_unused(path, channels_last, shape)
    gen = torch.Generator().manual_seed(5)
    x, w, b = _inputs(shape, torch.float32, channels_last, gen)
    x = x / 3 + 1000  # (3: _inputs' scale)
    with poisoned_allocations():
        out = group_norm_silu(x, groups, w, b)
    ref64 = reference.group_norm_silu(x.double(), groups, w.double(), b.double())
    assert_2x_rule(out, ref64, reference.group_norm_silu(x, groups, w, b), floor=FLOOR[torch.float32],
                   what=f"{shape} cl={channels_last}")


# The interpreter computes masked-off lanes too: their zero-filled inputs normalise to about -500, and SiLU's exp
# overflows there (NumPy warns; those lanes are never stored).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_keeps_fp32_accuracy(channels_last, path):
    """|mean| = 500 x std: the variance by Chan's formula keeps fp32 accuracy, where E[x^2] - E[x]^2 would leave
    about 2 of fp32's 7 digits (E[x^2] ~ 250001, its ulp 0.03 against a variance of 1). 8 groups of 3840 elements,
    so the split plans combine several chunks a group (interpreted: two in NCHW, the last one short)."""
    _skip_unused(path, channels_last, (2, 64, 24, 20))
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 64, 24, 20, generator=gen) + 500.0).to(DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(64, generator=gen).to(DEVICE) for _ in range(2))
    with poisoned_allocations():
        out = group_norm_silu(x, 8, w, b, 1e-5)
    ref64 = reference.group_norm_silu(x.double(), 8, w.double(), b.double(), 1e-5)
    assert_2x_rule(out, ref64, reference.group_norm_silu(x, 8, w, b, 1e-5), floor=FLOOR[torch.float32])


def test_two_loads_in_flight_doubles_the_statistics_block(monkeypatch):
    """LOADS_IN_FLIGHT = 2 gives the NCHW statistics pass twice the lanes (two adjacent 16-byte loads a thread,
    compiled for sm_90: tests/test_sass.py); the output pass keeps BLOCK and loads a block ahead instead."""
    seen = {}

    class Stop(Exception):
        pass

    class Record:  # stands in for a kernel: records its launch's constexprs, then stops the call
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.update(kwargs)
                raise Stop

            return launch

    monkeypatch.setattr(gn_module, "ONE_PASS_MAX_ELEMENTS", 0)
    monkeypatch.setattr(gn_module, "_group_stats_kernel", Record())
    for loads in (1, 2):
        monkeypatch.setattr(gn_module, "LOADS_IN_FLIGHT", loads)
        with pytest.raises(Stop):
            group_norm_silu(torch.randn(1, 32, 24, 40, device=DEVICE), 4)
        assert seen["BLOCK"] == gn_module.BLOCK * loads
