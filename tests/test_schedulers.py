"""Our schedulers against diffusers', step by step, over every configuration combination that changes the numbers."""
import itertools
import warnings

import pytest
import torch

import diffusers
from diffusion_fast import schedulers as S

SHAPE = (2, 4, 5, 7)  # odd latent size, batch 2
# fp32 parity with diffusers, relative to max(|x|, 1): 2e-6, widened only where the step is ill-conditioned. With
# alpha_prod_t = 4e-5 (linear schedule, t=999), x0 = (x - sqrt(1-a) eps) / sqrt(a) amplifies one fp32 rounding by
# 1/sqrt(a) = 158, so two implementations that round in a different order (FMA contraction, a fused kernel) differ
# by ~1.4e-5 there (measured), while every step with alpha_prod_t >= 0.01 agrees within ~1e-6.
TOL = 2e-6


def _allowed(theirs, t):
    """The per-step tolerance: TOL, times the x0 amplification 1/sqrt(alpha_prod_t) / 10 where that exceeds 1."""
    if isinstance(theirs, diffusers.EulerDiscreteScheduler):  # its metric is already relative to |x| ~ sigma
        return TOL
    alpha = float(theirs.alphas_cumprod[int(t)])
    return TOL * max(1.0, 0.1 / max(alpha, 1e-30) ** 0.5)


def _compare(ta, tb):
    """Worst |a - b| / max(|a|, 1) over finite entries; NaN/inf must sit at the same places in both."""
    ta, tb = ta.double(), tb.double()
    for check in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(check(ta), check(tb)), f"non-finite values differ ({check.__name__})"
    finite = torch.isfinite(ta)
    if not finite.any():
        return 0.0
    return ((ta - tb).abs()[finite].max() / ta[finite].abs().max().clamp(min=1)).item()


def _loop(ours, theirs, steps=4, dtype=torch.float32, noise="generator", **step_kwargs):
    """Run both schedulers on the same random model outputs; return the worst difference / its allowed value.

    noise="generator": both draw their step noise from equally seeded generators (diffusers' randn_tensor rules);
    noise="given": DDIM gets the same variance_noise tensor instead.
    """
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    torch.testing.assert_close(ours.timesteps.double(), theirs.timesteps.double(), rtol=0, atol=0)
    torch.testing.assert_close(torch.as_tensor(ours.init_noise_sigma).double(),
                               torch.as_tensor(theirs.init_noise_sigma).double(), rtol=1e-6, atol=0)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(SHAPE, generator=gen) * float(theirs.init_noise_sigma)).to(dtype)
    worst = 0.0
    for t in theirs.timesteps:
        model_output = torch.randn(SHAPE, generator=gen).to(dtype)
        scaled_theirs, scaled_ours = theirs.scale_model_input(x, t), ours.scale_model_input(x.clone(), t)
        torch.testing.assert_close(scaled_ours, scaled_theirs, rtol=1e-6, atol=1e-6)
        if noise == "given":
            kw_a = kw_b = dict(step_kwargs, variance_noise=torch.randn(SHAPE, generator=gen).to(dtype))
        else:
            kw_a = dict(step_kwargs, generator=torch.Generator().manual_seed(1))
            kw_b = dict(step_kwargs, generator=torch.Generator().manual_seed(1))
        a = theirs.step(model_output, t, scaled_theirs, **kw_a)
        b = ours.step(model_output, t, scaled_ours, **kw_b)
        allowed = _allowed(theirs, t) if dtype == torch.float32 else 1.0
        for ta, tb in ((a.prev_sample, b.prev_sample), (a.pred_original_sample, b.pred_original_sample)):
            assert tb.dtype == ta.dtype and tb.shape == ta.shape
            worst = max(worst, _compare(ta, tb) / allowed)
        x = a.prev_sample
    return worst


# Every combination, except zero terminal SNR with epsilon prediction: there alpha_prod(999) = 0 and x0 = eps-noise
# / 0 is meaningless (diffusers gets +-inf, then +-clip_sample_range; a fused op computing x/sqrt(a) - m*sqrt(b/a)
# gets inf - inf = NaN). Zero-SNR schedules are for v_prediction models (Lin et al. 2023).
DDIM_SWEEP = [combo for combo in itertools.product(
    ["linear", "scaled_linear", "squaredcos_cap_v2"], ["leading", "trailing", "linspace"],
    ["epsilon", "v_prediction", "sample"], [0, 1], [True, False], [True, False], [False, True], [False, True],
) if not (combo[2] == "epsilon" and combo[7])]


@pytest.mark.parametrize(
    "beta_schedule, spacing, prediction_type, steps_offset, set_alpha_to_one, clip, thresholding, rescale", DDIM_SWEEP)
def test_ddim_matches_diffusers(beta_schedule, spacing, prediction_type, steps_offset, set_alpha_to_one, clip,
                                thresholding, rescale):
    # sample_max_value 1.5 / clip range 1.2: non-default values, so a field read from the wrong place shows.
    cfg = dict(beta_schedule=beta_schedule, timestep_spacing=spacing, prediction_type=prediction_type,
               steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one, clip_sample=clip,
               thresholding=thresholding, sample_max_value=1.5, clip_sample_range=1.2, rescale_betas_zero_snr=rescale)
    # eta > 0 adds variance noise: drawn from the generator exactly as diffusers, or passed in as variance_noise.
    for eta, noise in ((0.0, "generator"), (0.5, "generator"), (0.5, "given")):
        assert _loop(S.DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg), eta=eta, noise=noise) <= 1


@pytest.mark.parametrize("rescale, use_clipped", [(True, False), (False, True), (True, True)])
def test_ddim_zero_snr_and_clipped_model_output(rescale, use_clipped):
    cfg = dict(rescale_betas_zero_snr=rescale, timestep_spacing="trailing", prediction_type="v_prediction",
               clip_sample=True, beta_schedule="scaled_linear")
    assert _loop(S.DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg), steps=6, eta=0.3,
                 use_clipped_model_output=use_clipped) <= 1


def test_ddim_variance_noise_and_step_cfg_equal_combine_then_step():
    ours = S.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False)
    theirs = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False)
    ours.set_timesteps(10), theirs.set_timesteps(10)
    u, c, x, noise = (torch.randn(SHAPE) for _ in range(4))
    t = ours.timesteps[3]
    combined = u + 7.5 * (c - u)
    a = theirs.step(combined, t, x, eta=0.5, variance_noise=noise)
    b = ours.step_cfg(u, c, 7.5, t, x, eta=0.5, variance_noise=noise)
    torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="both generator and variance_noise"):
        ours.step(combined, t, x, eta=0.5, variance_noise=noise, generator=torch.Generator())


@pytest.mark.parametrize("beta_schedule, spacing, prediction_type, variance_type, clip, thresholding", list(
    itertools.product(["linear", "scaled_linear"], ["leading", "trailing", "linspace"],
                      ["epsilon", "v_prediction", "sample"], ["fixed_small", "fixed_small_log", "fixed_large"],
                      [True, False], [False, True])))
def test_ddpm_matches_diffusers(beta_schedule, spacing, prediction_type, variance_type, clip, thresholding):
    cfg = dict(beta_schedule=beta_schedule, timestep_spacing=spacing, prediction_type=prediction_type,
               variance_type=variance_type, clip_sample=clip, thresholding=thresholding, steps_offset=1)
    assert _loop(S.DDPMScheduler(**cfg), diffusers.DDPMScheduler(**cfg)) <= 1


@pytest.mark.parametrize("beta_schedule, spacing, prediction_type, interpolation, karras, final_sigmas", list(
    itertools.product(["linear", "scaled_linear"], ["leading", "trailing", "linspace"], ["epsilon", "v_prediction"],
                      ["linear", "log_linear"], [False, True], ["zero", "sigma_min"])))
def test_euler_matches_diffusers(beta_schedule, spacing, prediction_type, interpolation, karras, final_sigmas):
    cfg = dict(beta_schedule=beta_schedule, timestep_spacing=spacing, prediction_type=prediction_type,
               interpolation_type=interpolation, use_karras_sigmas=karras, final_sigmas_type=final_sigmas,
               steps_offset=1)
    for churn in (0.0, 0.7):  # churn > 0 adds generator noise before the step
        assert _loop(S.EulerDiscreteScheduler(**cfg), diffusers.EulerDiscreteScheduler(**cfg), s_churn=churn) <= 1


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler"])
def test_add_noise_per_sample_timesteps_and_fp16(name):
    cfg = dict(beta_schedule="scaled_linear")
    ours, theirs = S.SCHEDULERS[name](**cfg), getattr(diffusers, name)(**cfg)
    ours.set_timesteps(20), theirs.set_timesteps(20)
    x, noise = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    ts = theirs.timesteps[[0, 7, 19]]  # a different timestep per sample
    torch.testing.assert_close(ours.add_noise(x, noise, ts), theirs.add_noise(x, noise, ts), rtol=1e-6, atol=1e-6)
    # fp16 latents: diffusers computes DDIM/DDPM in fp16, we compute in fp32 and round once: close, not equal.
    if name != "EulerDiscreteScheduler":
        assert _loop(S.SCHEDULERS[name](**cfg), getattr(diffusers, name)(**cfg), dtype=torch.float16) <= 2e-2


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler"])
def test_step_does_not_read_device_values(name):
    """The step must never read a device value on the host (on a GPU, a sync per step). Meta tensors have no values:
    any .item()/bool()/nonzero on them raises, so a step that completes on meta tensors cannot have synced."""
    import diffusion_fast

    sched = S.SCHEDULERS[name](beta_schedule="scaled_linear", clip_sample=False)
    sched.set_timesteps(10, device="meta")
    x, mo = torch.randn(SHAPE, device="meta"), torch.randn(SHAPE, device="meta")
    t = sched.timesteps[4]
    with diffusion_fast.backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "DDIMScheduler":
            out = sched.step_cfg(mo, mo * 0.5, 7.5, t, x)
            sched.step(mo, sched.timesteps[[2, 4]], x)  # per-sample timesteps too
        else:
            out = sched.step(mo, t, x)
    assert out.prev_sample.shape == SHAPE and out.prev_sample.device.type == "meta"


def test_from_config_of_another_scheduler_and_load_scheduler(tmp_path):
    pndm = diffusers.PNDMScheduler(beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    pndm.save_config(tmp_path)
    with pytest.warns(RuntimeWarning, match="PNDMScheduler is not implemented; using DDIMScheduler"):
        sched = S.load_scheduler(str(tmp_path))
    assert isinstance(sched, S.DDIMScheduler) and sched.config.steps_offset == 1
    assert sched.config["beta_schedule"] == "scaled_linear"
    theirs = diffusers.DDIMScheduler.from_config(pndm.config)
    assert _loop(S.DDIMScheduler.from_config(dict(pndm.config)), theirs) <= 1


@pytest.mark.parametrize("make, message", [
    (lambda: S.DDIMScheduler().set_timesteps(0), r"num_inference_steps must be in \[1, 1000\]"),
    (lambda: S.DDIMScheduler().set_timesteps(1001), r"num_inference_steps must be in \[1, 1000\]"),
    (lambda: S.DDIMScheduler(prediction_type="eps"), "prediction_type must be"),
    (lambda: S.DDIMScheduler(timestep_spacing="even"), "timestep_spacing must be"),
    (lambda: S.DDIMScheduler(beta_schedule="cubic").betas, "beta_schedule must be"),
    (lambda: S.DDPMScheduler(variance_type="learned"), "variance_type='learned' is not supported"),
    (lambda: S.EulerDiscreteScheduler(use_beta_sigmas=True), "use_beta_sigmas=True is not supported"),
    (lambda: S.DDIMScheduler().step(torch.randn(1, 4, 2, 2), 10, torch.randn(1, 4, 2, 2)), "call set_timesteps"),
])
def test_bad_input_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_config_is_read_only_and_unknown_fields_rejected():
    sched = S.DDIMScheduler()
    with pytest.raises(TypeError, match="read-only"):
        sched.config["beta_start"] = 0.5
    with pytest.raises(TypeError, match="unknown config fields"):
        S.DDIMScheduler(betastart=0.1)
