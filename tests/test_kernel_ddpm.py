"""The DDPM Triton kernel against the float64 reference and diffusers' DDPMScheduler.step."""
import pytest
import torch
from conftest import DEVICE

from _numerics import STEP_DTYPES, STEP_FLOOR, assert_2x_rule, poisoned_allocations
from diffusion_fast import ops, reference

FLOOR, DTYPES = STEP_FLOOR, STEP_DTYPES
SHAPES = [
    (3, 4, 7, 9),  # batch 3, odd latent size: a block spans samples, each element looks its alphas up
    (3, 4, 16, 32),  # 2048 elements a sample, two whole blocks: the alphas are read once per block
]


def _coefficients(kind):
    if kind == "float":
        return 0.3, 0.45, 0.2
    # per-sample (batches at different timesteps); the last sample is at the final step: alpha_prev 1, no noise
    return (torch.tensor([0.05, 0.5, 0.93], device=DEVICE), torch.tensor([0.1, 0.62, 1.0], device=DEVICE),
            torch.tensor([0.3, 0.1, 0.0], device=DEVICE))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", [None, 1.5])
@pytest.mark.parametrize("noise", [True, False])  # no noise: the last step
@pytest.mark.parametrize("coefficients", ["float", "per-sample"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, coefficients, noise, clip, prediction_type):
    gen = torch.Generator().manual_seed(31)
    mo, x, n = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(3))
    a_t, a_prev, std = _coefficients(coefficients)
    std = std if noise else 0.0
    kw = dict(prediction_type=prediction_type, clip_sample_range=clip)
    with poisoned_allocations():
        out = ops.ddpm_step(mo, x, a_t, a_prev, std=std, variance_noise=n if noise else None, backend="triton", **kw)

    def run(dt):
        cast = (lambda v: v.to(dt) if torch.is_tensor(v) else v)
        return reference.ddpm_step(mo.to(dt), x.to(dt), cast(a_t), cast(a_prev), std=cast(std),
                                   variance_noise=n.to(dt) if noise else None, **kw)

    ref64, plain = run(torch.float64), run(dtype)
    for i, name in enumerate(("prev_sample", "pred_original_sample")):
        assert out[i].dtype == dtype
        scale = max(1.0, ref64[i].abs().max().item())  # x0 = x / sqrt(0.05) reaches ~20: compare relative
        assert_2x_rule(out[i] / scale, ref64[i] / scale, plain[i] / scale, floor=FLOOR[dtype], what=name)


def test_matches_diffusers_step_and_bad_input():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", variance_type="fixed_small")
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(32)
    m, x = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(2))
    for t in (int(sched.timesteps[3]), 0):  # a noisy step (noise drawn as diffusers draws it) and the last one
        prev_t = int(sched.previous_timestep(t))
        a_t = float(sched.alphas_cumprod[t])
        a_prev = float(sched.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        std = float(sched._get_variance(t)) ** 0.5 if t > 0 else 0.0
        noise = torch.randn(m.shape, generator=torch.Generator().manual_seed(5)) if t > 0 else None
        ours = ops.ddpm_step(m.to(DEVICE), x.to(DEVICE), a_t, a_prev, std=std, clip_sample_range=1.0,
                             variance_noise=None if noise is None else noise.to(DEVICE), backend="triton")
        theirs = sched.step(m, t, x, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(ours[0].cpu(), theirs.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[1].cpu(), theirs.pred_original_sample, rtol=1e-5, atol=1e-5)
    from diffusion_fast.kernels.ddpm import ddpm_step as kernel

    one = torch.ones(2, device=DEVICE)
    with pytest.raises(TypeError, match="sample: the Triton DDPM kernel takes float16, bfloat16 or float32"):
        kernel(m.double().to(DEVICE), x.double().to(DEVICE), one, one, one, x.double().to(DEVICE))
