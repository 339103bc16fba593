"""The linear-step Triton kernel (DPM-Solver++, PNDM and UniPC updates on CUDA) against the float64 reference."""
import pytest
import torch
from conftest import DEVICE

from _numerics import STEP_DTYPES, STEP_FLOOR, assert_2x_rule, poisoned_allocations
from diffusion_fast import ops, reference

FLOOR, DTYPES = STEP_FLOOR, STEP_DTYPES
SHAPES = [
    (2, 4, 64, 64),  # SD1.5's latents at 512 px with CFG's batch: whole kernel blocks
    (3, 4, 7, 9),  # batch 3 and an odd latent size: the last block is partial
    (1, 1, 1, 1),  # one element: a block that is almost all mask
]
# DPM-Solver++ 2M's second-order update (x0 from epsilon, the earlier x0 as extra), PNDM's (no x0, a combination of
# earlier outputs as extra), a first-order step (no extra), and every coefficient nonzero at once
COEFFICIENTS = [
    dict(cx=1.4, cm=-0.9, p0=0.8, px=0.3, pm=0.0, pe=-0.2),
    dict(cx=0.0, cm=0.0, p0=0.0, px=1.01, pm=-0.05, pe=-0.03),
    dict(cx=1.4, cm=-0.9, p0=0.8, px=0.3),
    dict(cx=0.7, cm=-1.3, p0=0.6, px=0.2, pm=-0.4, pe=0.9),
]


@pytest.mark.parametrize("coefficients", COEFFICIENTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, coefficients):
    gen = torch.Generator().manual_seed(11)
    mo, x, extra = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(3))
    extra = extra if "pe" in coefficients else None
    with poisoned_allocations():  # an element the kernel does not write stays NaN
        out = ops.linear_step(mo, x, extra, backend="triton", **coefficients)

    def run(dt):
        return reference.linear_step(mo.to(dt), x.to(dt), None if extra is None else extra.to(dt), upcast=False,
                                     **coefficients)

    ref64, plain = run(torch.float64), run(dtype)
    for i, name in enumerate(("prev_sample", "pred_x0")):
        assert out[i].dtype == dtype and out[i].shape == shape
        assert_2x_rule(out[i], ref64[i], plain[i], floor=FLOOR[dtype], what=name)


def test_layouts_and_mixed_dtypes():
    # A channels_last sample with an NCHW model output and a permuted extra (read through contiguous copies), and
    # the schedulers' case of an fp32 sample with fp16 model outputs: results in the model output's dtype
    gen = torch.Generator().manual_seed(12)
    mo = torch.randn(2, 4, 5, 7, generator=gen).to(DEVICE, torch.float16)
    x = torch.randn(2, 4, 5, 7, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    extra = torch.randn(2, 5, 7, 4, generator=gen).to(DEVICE, torch.float16).permute(0, 3, 1, 2)
    coefficients = dict(cx=1.1, cm=-0.7, p0=0.9, px=0.2, pm=0.1, pe=-0.3)
    with poisoned_allocations():
        prev, x0 = ops.linear_step(mo, x, extra, backend="triton", **coefficients)
    ref_prev, ref_x0 = reference.linear_step(mo, x, extra, **coefficients)
    assert prev.dtype == x0.dtype == torch.float16 and prev.is_contiguous()
    torch.testing.assert_close(prev, ref_prev, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(x0, ref_x0, rtol=1e-3, atol=1e-3)


def test_bad_input():
    empty = torch.empty(0, 4, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match="sample is empty"):  # as every op: refused by name, not launched
        ops.linear_step(empty, empty, cx=1.0, cm=0.0, p0=1.0, px=0.0, backend="triton")
    x = torch.randn(1, 4, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match="extra"):  # the dispatcher names the argument
        ops.linear_step(x, x, torch.randn(1, 4, 8, 9, device=DEVICE), cx=1.0, cm=0.0, p0=1.0, px=0.0, pe=1.0,
                        backend="triton")
    with pytest.raises(ValueError, match="pe"):
        ops.linear_step(x, x, x, cx=1.0, cm=0.0, p0=1.0, px=0.0, pe=float("nan"), backend="triton")
    from diffusion_fast.kernels.linear_step import linear_step as kernel

    with pytest.raises(TypeError, match="model_output: the Triton linear_step kernel takes float16, bfloat16 or"):
        kernel(x.double(), x, cx=1.0, cm=0.0, p0=1.0, px=0.0)
