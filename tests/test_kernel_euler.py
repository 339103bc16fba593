"""The Euler and ancestral Euler Triton kernels (SDXL's default sampler and "Euler a" on CUDA) against the float64
reference."""
import pytest
import torch
from conftest import DEVICE

from _numerics import STEP_DTYPES, STEP_FLOOR, assert_2x_rule, poisoned_allocations
from diffusion_fast import ops, reference

FLOOR, DTYPES = STEP_FLOOR, STEP_DTYPES
SHAPES = [
    (3, 4, 7, 9),  # batch 3, odd latent size: a block spans samples, each element looks its sigmas up
    (2, 4, 16, 32),  # 2048 elements a sample, two whole blocks: the sigmas are read once per block
]


def _sigmas(kind):
    if kind == "float":
        return 3.0, 2.5
    # per-sample (img2img batches at different steps); the last goes to the final sigma of 0
    return torch.tensor([14.6, 3.0, 0.5], device=DEVICE), torch.tensor([10.0, 2.0, 0.0], device=DEVICE)


def _per_sample(value, batch, dtype):
    if torch.is_tensor(value):
        return value[:batch].to(dtype)
    return value


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [0.0, 0.4])  # 0.4: the churn adds noise before the step
@pytest.mark.parametrize("sigmas", ["float", "per-sample"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_euler_matches_reference(shape, dtype, sigmas, gamma, prediction_type):
    gen = torch.Generator().manual_seed(21)
    mo, x, noise = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(3))
    sigma, sigma_next = (_per_sample(s, shape[0], torch.float32) for s in _sigmas(sigmas))
    kw = dict(gamma=gamma, s_noise=1.003, prediction_type=prediction_type)
    with poisoned_allocations():
        out = ops.euler_step(mo, x, sigma, sigma_next, noise=noise if gamma else None, backend="triton", **kw)

    def run(dt):
        return reference.euler_step(mo.to(dt), x.to(dt), _per_sample(sigma, shape[0], dt),
                                    _per_sample(sigma_next, shape[0], dt), noise=noise.to(dt) if gamma else None,
                                    upcast=dt != torch.float64, **kw)

    _check(out, run(torch.float64), run(dtype), dtype)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])  # (diffusers' ancestral step has no "sample")
@pytest.mark.parametrize("sigmas", ["float", "per-sample"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_euler_ancestral_matches_reference(shape, dtype, sigmas, prediction_type):
    gen = torch.Generator().manual_seed(22)
    mo, x, noise = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(3))
    sigma, sigma_next = (_per_sample(s, shape[0], torch.float32) for s in _sigmas(sigmas))
    with poisoned_allocations():
        out = ops.euler_ancestral_step(mo, x, sigma, sigma_next, noise, prediction_type=prediction_type,
                                       backend="triton")

    def run(dt):
        return reference.euler_ancestral_step(mo.to(dt), x.to(dt), _per_sample(sigma, shape[0], dt),
                                              _per_sample(sigma_next, shape[0], dt), noise.to(dt),
                                              prediction_type=prediction_type, upcast=dt != torch.float64)

    _check(out, run(torch.float64), run(dtype), dtype)


def _check(out, ref64, plain, dtype):
    for i, name in enumerate(("prev_sample", "pred_original_sample")):
        assert out[i].dtype == dtype
        scale = max(1.0, ref64[i].abs().max().item())  # x0 = x - 14.6 m reaches ~60: compare relative
        assert_2x_rule(out[i] / scale, ref64[i] / scale, plain[i] / scale, floor=FLOOR[dtype], what=name)


def test_ancestral_step_does_not_cancel_at_a_huge_first_sigma():
    # The cosine schedule's first step (sigma ~ 2e4 to ~1e2): diffusers' sqrt(sigma_next^2 - sigma_up^2) rounds below
    # zero in fp32 (NaN); the kernel takes sigma_down = sigma_next^2 / sigma, as the C++ op does
    x = torch.randn(1, 4, 8, 8, device=DEVICE) * 2e4
    m, noise = torch.randn(1, 4, 8, 8, device=DEVICE), torch.randn(1, 4, 8, 8, device=DEVICE)
    sigma, sigma_next = torch.tensor([20291.0], device=DEVICE), torch.tensor([157.4], device=DEVICE)
    prev, _ = ops.euler_ancestral_step(m, x, sigma, sigma_next, noise, backend="triton")
    ref = reference.euler_ancestral_step(m.double(), x.double(), sigma.double(), sigma_next.double(),
                                         noise.double(), upcast=False)[0]
    assert prev.isfinite().all()
    torch.testing.assert_close(prev.double(), ref, rtol=1e-4, atol=1e-2)


def test_schedulers_fp32_sample_with_fp16_outputs_and_bad_input():
    # the schedulers pass model_output.float() and sample.float() and cast back; a caller may also mix dtypes
    m = torch.randn(2, 4, 5, 7, device=DEVICE, dtype=torch.float16)
    x = torch.randn(2, 4, 5, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    sigma, sigma_next = torch.tensor([3.0], device=DEVICE), torch.tensor([2.0], device=DEVICE)  # one for all samples
    prev, x0 = ops.euler_step(m, x, sigma, sigma_next, backend="triton")
    ref_prev, ref_x0 = reference.euler_step(m, x, sigma, sigma_next)
    assert prev.dtype == x0.dtype == torch.float16
    torch.testing.assert_close(prev, ref_prev, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="noise is required when gamma > 0"):
        ops.euler_step(m, x, sigma, sigma_next, gamma=0.5, backend="triton")
    with pytest.raises(ValueError, match="sigma must be"):
        ops.euler_step(m, x, torch.ones(3, device=DEVICE), sigma_next, backend="triton")
    from diffusion_fast.kernels.euler import euler_ancestral_step as kernel

    with pytest.raises(TypeError, match="noise: the Triton Euler kernels take float16, bfloat16 or float32"):
        kernel(m, x, sigma, sigma_next, m.double())
