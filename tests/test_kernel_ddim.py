"""The fused (CFG+)DDIM Triton kernel against the float64 reference and against diffusers' DDIMScheduler.step."""
import itertools

import pytest
import torch
from conftest import DEVICE

from _numerics import STEP_DTYPES, STEP_FLOOR, assert_2x_rule, poisoned_allocations
from diffusion_fast import ops, reference

FLOOR, DTYPES = STEP_FLOOR, STEP_DTYPES
SHAPE = (3, 4, 7, 9)  # batch 3 with a different alpha per sample; an odd latent size (a block spans samples)
# 2048 elements a sample, two whole kernel blocks each: the kernel reads each block's alphas once, as scalars
SHAPES = [SHAPE, (3, 4, 16, 32)]


def _alphas(kind):
    if kind == "float":
        return 0.3, 0.45
    if kind == "0-d":
        return torch.tensor(0.3, device=DEVICE), torch.tensor(0.45, device=DEVICE)
    # per-sample: the last sample is at the final step (alpha_prev = 1, as with set_alpha_to_one)
    return torch.tensor([0.05, 0.5, 0.93], device=DEVICE), torch.tensor([0.1, 0.62, 1.0], device=DEVICE)


def _d(a, dtype):
    return a.to(dtype) if torch.is_tensor(a) else a


@pytest.mark.parametrize("prediction_type, eta, clip, use_clipped", [
    c for c in itertools.product(["epsilon", "v_prediction", "sample"], [0.0, 0.8], [None, 1.5], [False, True])
    if not (c[3] and c[2] is None)  # the clipped model output only differs when clipping
])
@pytest.mark.parametrize("alphas", ["float", "0-d", "per-sample"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(prediction_type, eta, clip, use_clipped, alphas, dtype, cfg, shape):
    gen = torch.Generator().manual_seed(7)
    u, t, x, noise = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(4))
    a_t, a_prev = _alphas(alphas)
    kw = dict(eta=eta, variance_noise=noise if eta > 0 else None, prediction_type=prediction_type,
              clip_sample_range=clip, use_clipped_model_output=use_clipped)

    def run(dt, **extra):
        args = (u.to(dt), t.to(dt), 7.5) if cfg else (u.to(dt),)
        kwx = dict(kw, variance_noise=noise.to(dt) if eta > 0 else None)
        fn = reference.cfg_ddim_step if cfg else reference.ddim_step
        return fn(*args, x.to(dt), _d(a_t, dt), _d(a_prev, dt), **kwx, **extra)

    with poisoned_allocations():
        if cfg:
            out = ops.cfg_ddim_step(u, t, 7.5, x, a_t, a_prev, backend="triton", **kw)
        else:
            out = ops.ddim_step(u, x, a_t, a_prev, backend="triton", **kw)
    ref64, plain = run(torch.float64), run(dtype)
    for i, name in enumerate(("prev_sample", "pred_original_sample")):
        scale = max(1.0, ref64[i].abs().max().item())  # x0 = x / sqrt(0.05) reaches ~20: compare relative
        assert_2x_rule(out[i] / scale, ref64[i] / scale, plain[i] / scale, floor=FLOOR[dtype], what=name)
        assert out[i].dtype == dtype


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_matches_diffusers_scheduler_step(prediction_type, set_alpha_to_one):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type,
                                    set_alpha_to_one=set_alpha_to_one, clip_sample=True)
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(3)
    u, t, x, noise = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(4))
    for timestep in (sched.timesteps[0], sched.timesteps[-1]):  # the first step, and the last (prev_t < 0)
        prev_t = timestep - 1000 // 10
        a_t = sched.alphas_cumprod[timestep]
        a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
        theirs = sched.step(u + 7.5 * (t - u), timestep, x, eta=0.5, variance_noise=noise)
        ours = ops.cfg_ddim_step(u.to(DEVICE), t.to(DEVICE), 7.5, x.to(DEVICE), a_t.to(DEVICE), a_prev.to(DEVICE),
                                 eta=0.5, variance_noise=noise.to(DEVICE), prediction_type=prediction_type,
                                 clip_sample_range=1.0, backend="triton")
        torch.testing.assert_close(ours[0].cpu(), theirs.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[1].cpu(), theirs.pred_original_sample, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    base = torch.randn(4, 4, 8, 8, device=DEVICE)
    u, t = base[:2].transpose(2, 3), base[2:].transpose(2, 3)  # strided halves
    x = torch.randn(2, 4, 8, 8, device=DEVICE)
    out = ops.cfg_ddim_step(u, t, 5.0, x, 0.4, 0.5, backend="triton")
    ref = reference.cfg_ddim_step(u, t, 5.0, x, 0.4, 0.5)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, error, message", [
    (lambda x: ops.ddim_step(x[:1], x, 0.3, 0.4), ValueError, "model_output has shape"),
    (lambda x: ops.ddim_step(x.half(), x, 0.3, 0.4), TypeError, "model_output has dtype"),
    (lambda x: ops.ddim_step(x, x, 0.3, 0.4, eta=0.5, variance_noise=x[:, :2]), ValueError, "variance_noise has shape"),
    (lambda x: ops.ddim_step(x, x, 0.3, 0.4, eta=0.5, variance_noise=x.half()), TypeError, "variance_noise has dtype"),
    (lambda x: ops.ddim_step(x, x, float("nan"), 0.4), ValueError, "alpha_prod_t must be finite"),
    # a 0-d CPU tensor (the per-step case, read on the host): its own fast path, the same check
    (lambda x: ops.ddim_step(x, x, torch.tensor(float("inf")), 0.4), ValueError, "alpha_prod_t contains NaN or inf"),
    (lambda x: ops.ddim_step(x, x, 0.3, torch.tensor([0.4, float("nan"), 0.2])), ValueError,
     "alpha_prod_t_prev contains NaN"),
    (lambda x: ops.ddim_step(x, x, torch.tensor([0.3, 0.4]), 0.4), ValueError, r"alpha_prod_t must be .* shape \(3,\)"),
    (lambda x: ops.ddim_step(x, x, 0.3, 0.4, eta=0.5), ValueError, "variance_noise is required when eta > 0"),
    (lambda x: ops.ddim_step(x, x, 0.3, 0.4, prediction_type="eps"), ValueError, "prediction_type must be one of"),
    (lambda x: ops.cfg_ddim_step(x, x, float("inf"), x, 0.3, 0.4), ValueError, "guidance_scale must be finite"),
    (lambda x: ops.ddim_step(x, x, 0.3, 0.4, eta=-1.0), ValueError, "eta must be >= 0"),
])
def test_bad_input_names_the_argument(call, error, message):
    x = torch.randn(SHAPE)  # CPU tensors: the NaN checks read CPU alphas, which costs no device sync
    with pytest.raises(error, match=message):
        call(x)
