"""Our schedulers against diffusers', step by step, over every configuration combination that changes the numbers."""
import itertools
import warnings

import pytest
import torch

import diffusers
from diffusion_fast import schedulers as S
from _scheduler_parity import SHAPE, _diffusers_unipc_is_finite, _loop, _loop_by_2x_rule, _run_schedule
from conftest import NEEDS_SCIPY

# diffusers' Euler calls np.array on a tensor (a numpy 2 DeprecationWarning inside diffusers, not in our code)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

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
    theirs.step(combined, t, x, eta=0.0, variance_noise=noise, generator=torch.Generator())  # diffusers: fine at eta=0
    ours.step(combined, t, x, eta=0.0, variance_noise=noise, generator=torch.Generator())


@pytest.mark.parametrize("thresholding", [False, True])  # thresholding falls back to combine + step
def test_step_cfg_equals_combine_then_our_step(thresholding):
    sched = S.DDIMScheduler(beta_schedule="scaled_linear", thresholding=thresholding, prediction_type="v_prediction")
    sched.set_timesteps(7)  # 7 steps: N // n = 142, prev_t not a multiple of 100
    u, c, x = (torch.randn(SHAPE) for _ in range(3))
    for t in (sched.timesteps[0], int(sched.timesteps[6])):  # a 0-d tensor and a Python int; the last has prev_t < 0
        combined = u + 5.0 * (c - u)
        a = sched.step(combined, t, x, eta=0.4, generator=torch.Generator().manual_seed(3))
        b = sched.step_cfg(u, c, 5.0, t, x, eta=0.4, generator=torch.Generator().manual_seed(3), return_dict=False)
        torch.testing.assert_close(b[0], a.prev_sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b[1], a.pred_original_sample, rtol=1e-6, atol=1e-6)
    a_t, a_prev = sched.alphas_at(sched.timesteps[6])
    assert a_t.device == x.device and float(a_prev) == 1.0  # set_alpha_to_one at prev_t < 0
    torch.testing.assert_close(a_t, sched.alphas_cumprod[sched.timesteps[6]].reshape(1))


def test_ddim_trained_betas_and_per_sample_timesteps_in_step():
    betas = torch.linspace(1e-4, 2e-2, 1000) ** 1.1  # a schedule no named beta_schedule makes
    cfg = dict(trained_betas=betas.tolist(), clip_sample=False)
    assert _loop(S.DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg)) <= 1
    sched = S.DDIMScheduler(**cfg)
    sched.set_timesteps(10)
    m, x = torch.randn(SHAPE), torch.randn(SHAPE)
    both = sched.step(m, sched.timesteps[[2, 5]], x).prev_sample  # one timestep per sample
    for i, t in enumerate(sched.timesteps[[2, 5]]):
        torch.testing.assert_close(both[i:i + 1], sched.step(m[i:i + 1], t, x[i:i + 1]).prev_sample)


@pytest.mark.parametrize("beta_schedule, spacing, prediction_type, variance_type, clip, thresholding", list(
    itertools.product(["linear", "scaled_linear"], ["leading", "trailing", "linspace"],
                      ["epsilon", "v_prediction", "sample"], ["fixed_small", "fixed_small_log", "fixed_large"],
                      [True, False], [False, True])))
def test_ddpm_matches_diffusers(beta_schedule, spacing, prediction_type, variance_type, clip, thresholding):
    cfg = dict(beta_schedule=beta_schedule, timestep_spacing=spacing, prediction_type=prediction_type,
               variance_type=variance_type, clip_sample=clip, thresholding=thresholding, steps_offset=1)
    assert _loop(S.DDPMScheduler(**cfg), diffusers.DDPMScheduler(**cfg)) <= 1


@pytest.mark.parametrize("cfg", [
    dict(beta_schedule="sigmoid"),  # GeoDiff's schedule, DDPM-only in diffusers
    dict(beta_schedule="squaredcos_cap_v2", clip_sample=False),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(steps_offset=0, timestep_spacing="leading", variance_type="fixed_small_log"),
])
def test_ddpm_other_schedules(cfg):
    assert _loop(S.DDPMScheduler(**cfg), diffusers.DDPMScheduler(**cfg), steps=5) <= 1


def test_custom_schedules():
    # DDPM custom integer timesteps (uneven gaps): previous_timestep follows the given list
    assert _loop(S.DDPMScheduler(), diffusers.DDPMScheduler(), schedule=dict(timesteps=[937, 700, 411, 90, 3])) <= 1
    # Euler: custom float timesteps (sigmas interpolated) and custom sigmas (timesteps interpolated)
    assert _loop(S.EulerDiscreteScheduler(), diffusers.EulerDiscreteScheduler(),
                 schedule=dict(timesteps=[950.5, 600.0, 301.25, 20.0])) <= 1
    assert _loop(S.EulerDiscreteScheduler(), diffusers.EulerDiscreteScheduler(),
                 schedule=dict(sigmas=[14.6, 5.0, 1.7, 0.3, 0.0])) <= 1
    with pytest.raises(ValueError, match="timesteps must be in descending order"):
        S.DDPMScheduler().set_timesteps(timesteps=[10, 500])
    with pytest.raises(ValueError, match="pass num_inference_steps or timesteps, not both"):
        S.DDPMScheduler().set_timesteps(5, timesteps=[500, 10])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        S.DDPMScheduler().set_timesteps(timesteps=[1000, 10])
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        S.EulerDiscreteScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[500.0, 10.0])


def test_ddpm_fixed_large_log_is_fixed_large_and_training_style_step():
    # diffusers' fixed_large_log takes sqrt(log(beta)) (NaN); ours is GLIDE's max_log: noise scale sqrt(beta).
    ours = S.DDPMScheduler(variance_type="fixed_large_log")
    assert _loop(ours, diffusers.DDPMScheduler(variance_type="fixed_large")) <= 1
    # Without set_timesteps, diffusers steps t -> t - 1 (the training chain); so do we.
    ours, theirs = S.DDPMScheduler(), diffusers.DDPMScheduler()
    m, x = torch.randn(SHAPE), torch.randn(SHAPE)
    for t in (500, 1, 0):
        a = theirs.step(m, t, x, generator=torch.Generator().manual_seed(2))
        b = ours.step(m, t, x, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta_schedule, spacing, prediction_type, interpolation, karras, final_sigmas", list(
    itertools.product(["linear", "scaled_linear"], ["leading", "trailing", "linspace"], ["epsilon", "v_prediction"],
                      ["linear", "log_linear"], [False, True], ["zero", "sigma_min"])))
def test_euler_matches_diffusers(beta_schedule, spacing, prediction_type, interpolation, karras, final_sigmas):
    cfg = dict(beta_schedule=beta_schedule, timestep_spacing=spacing, prediction_type=prediction_type,
               interpolation_type=interpolation, use_karras_sigmas=karras, final_sigmas_type=final_sigmas,
               steps_offset=1)
    for churn in (0.0, 0.7):  # churn > 0 adds generator noise before the step
        assert _loop(S.EulerDiscreteScheduler(**cfg), diffusers.EulerDiscreteScheduler(**cfg), s_churn=churn) <= 1


@pytest.mark.parametrize("cfg, step_kwargs", [
    (dict(prediction_type="sample"), {}),
    (dict(prediction_type="v_prediction", timestep_type="continuous"), {}),  # timesteps = 0.25 log(sigma)
    (dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"), {}),
    (dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), {}),  # config sigma range overrides the table
    (dict(beta_schedule="scaled_linear"), dict(s_churn=2.0, s_tmin=0.5, s_tmax=5.0, s_noise=1.003)),  # churn window
])
def test_euler_other_options(cfg, step_kwargs):
    assert _loop(S.EulerDiscreteScheduler(**cfg), diffusers.EulerDiscreteScheduler(**cfg), steps=5, **step_kwargs) <= 1


# Every combination but zero-SNR with epsilon prediction (see DDIM_SWEEP). The cosine schedule's first sigma is
# ~2e4: diffusers' sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancels there, and in fp32 it went negative (NaN)
# in our op until it took the exact sigma_next^2 / sigma.
@pytest.mark.parametrize("beta_schedule, spacing, prediction_type, zero_snr", [combo for combo in itertools.product(
    ["linear", "scaled_linear", "squaredcos_cap_v2"], ["leading", "trailing", "linspace"],
    ["epsilon", "v_prediction"], [False, True]) if not (combo[2] == "epsilon" and combo[3])])
def test_euler_ancestral_matches_diffusers(beta_schedule, spacing, prediction_type, zero_snr):
    cfg = dict(beta_schedule=beta_schedule, timestep_spacing=spacing, prediction_type=prediction_type,
               rescale_betas_zero_snr=zero_snr, steps_offset=1)
    ours, theirs = S.EulerAncestralDiscreteScheduler(**cfg), diffusers.EulerAncestralDiscreteScheduler(**cfg)
    assert _loop(ours, theirs, steps=5) <= 1  # each step draws its noise from an equally seeded generator


def test_euler_ancestral_config_and_errors():
    # diffusers' ancestral scheduler has none of Euler's schedule options; from_config drops them (as diffusers does
    # for another scheduler's fields), a constructor given one rejects it
    sched = S.EulerAncestralDiscreteScheduler.from_config(dict(S.EulerDiscreteScheduler().config, steps_offset=1))
    assert sched.config.steps_offset == 1 and "use_karras_sigmas" not in sched.config
    with pytest.raises(TypeError, match="unknown config fields \\['use_karras_sigmas'\\]"):
        S.EulerAncestralDiscreteScheduler(use_karras_sigmas=True)
    with pytest.raises(ValueError, match="prediction_type must be one of"):  # diffusers' step raises for "sample"
        S.EulerAncestralDiscreteScheduler(prediction_type="sample")
    sched.set_timesteps(2)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="not an index"):
        sched.step(x, 3, x)
    _step_past_the_end(sched, x)


def _step_before_set_timesteps_is_refused(cls):
    """A fresh scheduler's step before set_timesteps: a ValueError saying so. Returns (the scheduler, a sample)."""
    sched, x = cls(), torch.randn(SHAPE)
    with pytest.raises(ValueError, match="call set_timesteps first"):
        sched.step(x, 10, x)
    return sched, x


def _step_past_the_end(sched, x):
    """Every step of a 2-step schedule, then one more: a ValueError that counts the calls (not an IndexError)."""
    for t in sched.timesteps:
        sched.step(x, t, x)
    with pytest.raises(ValueError, match="step called 3 times for a 2-step schedule"):
        sched.step(x, sched.timesteps[-1], x)


# PNDM, SD1.5's shipped scheduler: PLMS from the first step (skip_prk_steps) or after diffusers' Runge-Kutta warm-up,
# every spacing and prediction type, the cosine schedule (alpha ~ 0 at t = 999), a final alpha of 1 or not; 1 to 3
# steps reach PLMS's special first steps only; 20 reach its four-output combination. Judged by the 2x rule against
# diffusers' own step in float64 (see _loop_by_2x_rule).
@pytest.mark.parametrize("skip_prk_steps, prediction_type, beta_schedule", list(itertools.product(
    [True, False], ["epsilon", "v_prediction"], ["scaled_linear", "squaredcos_cap_v2"])))
def test_pndm_matches_diffusers_by_the_2x_rule(skip_prk_steps, prediction_type, beta_schedule):
    for spacing, set_alpha_to_one, steps in itertools.product(
            ["leading", "trailing", "linspace"], [False, True], [1, 2, 3, 4, 20] if skip_prk_steps else [4, 5, 20]):
        cfg = dict(skip_prk_steps=skip_prk_steps, prediction_type=prediction_type, beta_schedule=beta_schedule,
                   timestep_spacing=spacing, set_alpha_to_one=set_alpha_to_one, steps_offset=1)
        ours, theirs, exact = S.PNDMScheduler(**cfg), diffusers.PNDMScheduler(**cfg), diffusers.PNDMScheduler(**cfg)
        _loop_by_2x_rule(ours, theirs, exact, steps)
        assert ours.counter == theirs.counter and len(ours.ets) == len(theirs.ets)


@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_pndm_as_sd15_ships_it_in_fp32_and_fp16(skip_prk_steps):
    cfg = dict(skip_prk_steps=skip_prk_steps, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               set_alpha_to_one=False, steps_offset=1)
    assert _loop(S.PNDMScheduler(**cfg), diffusers.PNDMScheduler(**cfg), steps=10, noise=None) <= 1
    # fp16: diffusers computes in fp16, our fused pass in fp32 (and rounds once)
    assert _loop(S.PNDMScheduler(**cfg), diffusers.PNDMScheduler(**cfg), steps=10, noise=None,
                 dtype=torch.float16) <= 2e-2


def test_pndm_config_and_errors():
    sched = S.PNDMScheduler(skip_prk_steps=True)
    with pytest.raises(ValueError, match="call set_timesteps first"):
        sched.step(torch.randn(SHAPE), 10, torch.randn(SHAPE))
    sched.set_timesteps(3)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="timestep 5 is not this step's timestep 666"):  # steps go in order
        sched.step(x, 5, x)
    for t in sched.timesteps:
        x = sched.step(torch.randn(SHAPE), t, x).prev_sample
    with pytest.raises(ValueError, match="step called 5 times for a schedule of 4 timesteps"):
        sched.step(x, 0, x)
    sched.set_timesteps(3)  # a new schedule starts over
    assert sched.counter == 0 and sched.ets == [] and sched.cur_sample is None
    with pytest.raises(ValueError, match="at least 4 for PNDM's Runge-Kutta warm-up"):
        S.PNDMScheduler().set_timesteps(3)  # diffusers fails with a numpy broadcast error
    with pytest.raises(ValueError, match="prediction_type must be epsilon or v_prediction"):
        S.PNDMScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="beta_schedule must be linear, scaled_linear or squaredcos_cap_v2"):
        S.PNDMScheduler(beta_schedule="sigmoid")


# DPM-Solver++ multistep: orders 1 to 3, ODE and SDE, both solver types, and each sigma schedule; inside, every
# prediction type, both final sigmas and lower_order_final on and off, over 6 steps (so that order 3 runs). Where a
# step is 0 / 0 (equal last sigmas with heun or order 3; diffusers' image is NaN) ours refuses with a ValueError.
@pytest.mark.parametrize("algorithm, order, solver_type, sigmas", list(itertools.product(
    ["dpmsolver++", "sde-dpmsolver++"], [1, 2, 3], ["midpoint", "heun"], ["default", "karras", "lu", "exponential"])))
def test_dpm_solver_matches_diffusers(algorithm, order, solver_type, sigmas):
    refused = 0
    for prediction_type, final, lower_order_final in itertools.product(
            ["epsilon", "v_prediction", "sample"], ["zero", "sigma_min"], [True, False]):
        cfg = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type, beta_schedule="scaled_linear",
                   prediction_type=prediction_type, final_sigmas_type=final, lower_order_final=lower_order_final,
                   use_karras_sigmas=sigmas == "karras", use_lu_lambdas=sigmas == "lu",
                   use_exponential_sigmas=sigmas == "exponential")
        try:
            assert _loop(S.DPMSolverMultistepScheduler(**cfg), diffusers.DPMSolverMultistepScheduler(**cfg),
                         steps=6) <= 1, cfg
        except ValueError as error:
            assert "0 / 0" in str(error), cfg
            x = _run_schedule(diffusers.DPMSolverMultistepScheduler(**cfg), 6,
                              generator=torch.Generator().manual_seed(0))
            assert x.isnan().all(), cfg
            refused += 1
    # only the repeated final sigma (sigma_min schedules without lower_order_final) with heun or order 3 is refused
    expected = 3 if sigmas != "default" and order > 1 and (solver_type == "heun" or order == 3) else 0
    assert refused == expected


@pytest.mark.parametrize("spacing, beta_schedule", list(itertools.product(
    ["leading", "trailing", "linspace"], ["linear", "scaled_linear", "squaredcos_cap_v2"])))
def test_dpm_solver_schedules_and_options(spacing, beta_schedule):
    base = dict(timestep_spacing=spacing, beta_schedule=beta_schedule, steps_offset=1)
    for extra in ({}, dict(lambda_min_clipped=-5.1), dict(thresholding=True, prediction_type="sample"),
                  dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
                  dict(euler_at_final=True, lower_order_final=False, solver_order=3)):
        cfg = dict(base, **extra)
        for steps in (4, 20):
            assert _loop(S.DPMSolverMultistepScheduler(**cfg), diffusers.DPMSolverMultistepScheduler(**cfg),
                         steps=steps) <= 1, (cfg, steps)


def test_dpm_solver_noise_custom_timesteps_fp16_and_add_noise():
    sde = dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)  # "DPM++ 2M SDE Karras"
    assert _loop(S.DPMSolverMultistepScheduler(**sde), diffusers.DPMSolverMultistepScheduler(**sde),
                 noise="given") <= 1  # variance_noise instead of the generator
    for timesteps in ([999, 800, 500, 200, 10], [901, 500, 1]):
        assert _loop(S.DPMSolverMultistepScheduler(), diffusers.DPMSolverMultistepScheduler(),
                     schedule=dict(timesteps=timesteps)) <= 1
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True)
    assert _loop(S.DPMSolverMultistepScheduler(**sd), diffusers.DPMSolverMultistepScheduler(**sd), steps=10,
                 dtype=torch.float16) <= 2e-2
    ours, theirs = S.DPMSolverMultistepScheduler(**sd), diffusers.DPMSolverMultistepScheduler(**sd)
    ours.set_timesteps(10), theirs.set_timesteps(10)
    x, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    ts = theirs.timesteps[[1, 6]]  # no begin index: each sample's sigma found from its timestep (Karras sigmas)
    torch.testing.assert_close(ours.add_noise(x, noise, ts), theirs.add_noise(x, noise, ts))
    ours.set_begin_index(3), theirs.set_begin_index(3)  # img2img: every sample at the begin index's sigma
    torch.testing.assert_close(ours.add_noise(x, noise, ts), theirs.add_noise(x, noise, ts))


def test_dpm_solver_config_and_errors():
    # Another algorithm's config loaded into DPM-Solver keeps its nearest settings, as diffusers does
    unipc = diffusers.UniPCMultistepScheduler(solver_type="bh2")
    assert S.DPMSolverMultistepScheduler.from_config(dict(unipc.config)).config.solver_type == "midpoint"
    assert S.DPMSolverMultistepScheduler(algorithm_type="deis").config.algorithm_type == "dpmsolver++"
    for bad, message in ((dict(algorithm_type="dpmsolver"), "deprecated in diffusers"),
                         (dict(solver_order=4), "solver_order must be one of"),
                         (dict(solver_order=True), "solver_order must be one of"),
                         (dict(prediction_type="flow_prediction"), "prediction_type must be one of"),
                         (dict(final_sigmas_type="one"), "final_sigmas_type must be one of"),
                         (dict(use_karras_sigmas=True, use_exponential_sigmas=True), "choose one"),
                         (dict(use_flow_sigmas=True), "use_flow_sigmas=True is not supported"),
                         (dict(variance_type="learned_range"), "variance_type='learned_range' is not supported"),
                         (dict(use_beta_sigmas=True), "use_beta_sigmas=True is not supported")):
        with pytest.raises(ValueError, match=message):
            S.DPMSolverMultistepScheduler(**bad)
    sched, x = _step_before_set_timesteps_is_refused(S.DPMSolverMultistepScheduler)
    with pytest.raises(ValueError, match="custom timesteps cannot be used with Karras"):
        S.DPMSolverMultistepScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[900, 500])
    with pytest.raises(ValueError, match="pass num_inference_steps or timesteps, not both"):
        sched.set_timesteps(3, timesteps=[900, 500])
    sched.set_timesteps(2)
    with pytest.raises(ValueError, match="timestep 7.0 is not in this scheduler's timesteps"):
        sched.step(x, 7, x)
    _step_past_the_end(sched, x)


def _unipc_outcome(cfg, steps=6):
    """'parity': diffusers is finite and ours is within the 2x rule of it against its float64 self at every step;
    'refused': diffusers is not, and ours raises a ValueError that says so; 'finite': diffusers is not, ours is."""
    if _diffusers_unipc_is_finite(cfg, steps):
        ours, theirs, exact = (S.UniPCMultistepScheduler(**cfg), diffusers.UniPCMultistepScheduler(**cfg),
                               diffusers.UniPCMultistepScheduler(**cfg))
        _loop_by_2x_rule(ours, theirs, exact, steps)
        return "parity"
    try:
        x = _run_schedule(S.UniPCMultistepScheduler(**cfg), steps)
    except ValueError as error:
        assert "not finite for this schedule" in str(error)
        return "refused"
    assert x.isfinite().all()
    return "finite"


# UniPC: every order (1-3), B(h) variant, data or noise prediction and sigma schedule; inside, every prediction type,
# final sigma and lower_order_final. Where diffusers' result is not finite, ours refuses with a ValueError, except
# bh1 onto a final sigma of 0, where diffusers multiplies B(h) = -inf by a zero residual (NaN) and ours takes the
# plain first-order update.
@pytest.mark.parametrize("order, solver_type, predict_x0, sigmas", list(itertools.product(
    [1, 2, 3], ["bh1", "bh2"], [True, False], ["default", "karras", "exponential"])))
def test_unipc_matches_diffusers(order, solver_type, predict_x0, sigmas):
    outcomes = {}
    for prediction_type, final, lower_order_final in itertools.product(
            ["epsilon", "v_prediction", "sample"], ["zero", "sigma_min"], [True, False]):
        cfg = dict(solver_order=order, solver_type=solver_type, predict_x0=predict_x0, beta_schedule="scaled_linear",
                   prediction_type=prediction_type, final_sigmas_type=final, lower_order_final=lower_order_final,
                   use_karras_sigmas=sigmas == "karras", use_exponential_sigmas=sigmas == "exponential")
        outcomes[(prediction_type, final, lower_order_final)] = _unipc_outcome(cfg)
    for (_, final, lower_order_final), outcome in outcomes.items():
        if outcome == "finite":
            assert solver_type == "bh1" and final == "zero" and predict_x0
        if lower_order_final and predict_x0 and final == "zero" and solver_type == "bh2":  # the default settings
            assert outcome == "parity"


@pytest.mark.parametrize("spacing, beta_schedule", list(itertools.product(
    ["leading", "trailing", "linspace"], ["linear", "scaled_linear", "squaredcos_cap_v2"])))
def test_unipc_schedules_and_options(spacing, beta_schedule):
    base = dict(timestep_spacing=spacing, beta_schedule=beta_schedule, steps_offset=1)
    for extra in ({}, dict(disable_corrector=[0, 2]), dict(thresholding=True, prediction_type="sample"),
                  dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"), dict(solver_order=4),
                  dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0)):
        cfg = dict(base, **extra)
        for steps in (4, 20):
            ours, theirs, exact = (S.UniPCMultistepScheduler(**cfg), diffusers.UniPCMultistepScheduler(**cfg),
                                   diffusers.UniPCMultistepScheduler(**cfg))
            _loop_by_2x_rule(ours, theirs, exact, steps)


def test_unipc_as_sd_runs_it_in_fp32_and_fp16_and_config_errors():
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
              steps_offset=1)
    assert _loop(S.UniPCMultistepScheduler(**sd), diffusers.UniPCMultistepScheduler(**sd), steps=10, noise=None) <= 1
    assert _loop(S.UniPCMultistepScheduler(**sd), diffusers.UniPCMultistepScheduler(**sd), steps=10, noise=None,
                 dtype=torch.float16) <= 2e-2
    dpm = diffusers.DPMSolverMultistepScheduler(solver_type="heun")  # a DPM config: diffusers maps it to bh2
    assert S.UniPCMultistepScheduler.from_config(dict(dpm.config)).config.solver_type == "bh2"
    for bad, message in ((dict(solver_order=0), "solver_order must be a positive int"),
                         (dict(solver_type="bh3"), "solver_type must be one of"),
                         (dict(prediction_type="flow_prediction"), "prediction_type must be one of"),
                         (dict(disable_corrector=["first"]), "disable_corrector must be a list of step indices"),
                         (dict(use_flow_sigmas=True), "use_flow_sigmas=True is not supported"),
                         (dict(solver_p=S.DDIMScheduler()), "solver_p=.* is not supported")):
        with pytest.raises(ValueError, match=message):
            S.UniPCMultistepScheduler(**bad)
    sched, x = _step_before_set_timesteps_is_refused(S.UniPCMultistepScheduler)
    sched.set_timesteps(2)
    _step_past_the_end(sched, x)


@pytest.mark.parametrize("name", ["PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_multistep_schedulers_refuse_a_new_shape_mid_run(name):
    """These combine a step with tensors kept from earlier steps: a sample of another shape without set_timesteps
    (a new batch) is refused by name, where it used to fail inside the op with a message about an internal 'extra'."""
    sched = S.SCHEDULERS[name]()
    sched.set_timesteps(5)
    t0, t1 = sched.timesteps[:2]
    sched.step(torch.randn(2, 4, 8, 8), t0, torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"sample has shape \(1, 4, 8, 8\), but the earlier steps of this run had "
                                         r"\(2, 4, 8, 8\): call set_timesteps"):
        sched.step(torch.randn(1, 4, 8, 8), t1, torch.randn(1, 4, 8, 8))
    sched.set_timesteps(5)  # a new run takes the new shape
    for t in sched.timesteps[:3]:
        sched.step(torch.randn(1, 4, 8, 8), t, torch.randn(1, 4, 8, 8))


def test_euler_begin_index_add_noise_and_velocity():
    ours, theirs = S.EulerDiscreteScheduler(), diffusers.EulerDiscreteScheduler()
    ours.set_timesteps(10), theirs.set_timesteps(10)
    x, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    ts = theirs.timesteps[[1, 6]]
    torch.testing.assert_close(ours.get_velocity(x, noise, ts), theirs.get_velocity(x, noise, ts))
    torch.testing.assert_close(ours.add_noise(x, noise, ts), theirs.add_noise(x, noise, ts))  # looked up per sample
    ours.set_begin_index(3), theirs.set_begin_index(3)  # img2img: every sample at the begin index
    torch.testing.assert_close(ours.add_noise(x, noise, ts), theirs.add_noise(x, noise, ts))
    m = torch.randn(SHAPE)
    t = theirs.timesteps[3]
    a = theirs.step(m, t, theirs.scale_model_input(x, t))
    b = ours.step(m, t, ours.scale_model_input(x, t))
    torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-6, atol=1e-6)
    assert ours.step_index == theirs.step_index == 4
    torch.testing.assert_close(ours.add_noise(x, noise, ts), theirs.add_noise(x, noise, ts))  # inpainting: step index
    with pytest.raises(ValueError, match="not an index"):
        ours.step(m, 3, x)
    with pytest.raises(ValueError, match="begin_index must be"):
        ours.set_begin_index(-1)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler"])
def test_get_velocity(name):
    ours, theirs = S.SCHEDULERS[name](), getattr(diffusers, name)()
    x, noise, ts = torch.randn(SHAPE), torch.randn(SHAPE), torch.tensor([10, 990])
    torch.testing.assert_close(ours.get_velocity(x, noise, ts), theirs.get_velocity(x, noise, ts))


def test_randn_tensor_draws_as_diffusers():
    from diffusers.utils.torch_utils import randn_tensor

    for generator in (torch.Generator().manual_seed(5), [torch.Generator().manual_seed(i) for i in (5, 6, 7)],
                      [torch.Generator().manual_seed(8)]):
        clone = [torch.Generator().manual_seed(g.initial_seed()) for g in generator] if isinstance(generator, list) \
            else torch.Generator().manual_seed(generator.initial_seed())
        shape = (len(generator) if isinstance(generator, list) and len(generator) > 1 else 3, 4, 3, 5)
        ours = S.randn_tensor(shape, generator=generator, dtype=torch.float16)
        torch.testing.assert_close(ours, randn_tensor(shape, generator=clone, dtype=torch.float16), rtol=0, atol=0)
    with pytest.raises(ValueError, match="generator is a list of 2"):
        S.randn_tensor((3, 4), generator=[torch.Generator(), torch.Generator()])
    for bad in ("g", 3, []):  # as every scheduler step that draws noise receives it
        with pytest.raises(TypeError, match="generator must be a torch.Generator, a list of them or None"):
            S.randn_tensor((3, 4), generator=bad)


NO_GENERATOR = ("PNDMScheduler", "UniPCMultistepScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                "KDPM2DiscreteScheduler", "DEISMultistepScheduler")


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                                  "UniPCMultistepScheduler", "LCMScheduler", "HeunDiscreteScheduler",
                                  pytest.param("LMSDiscreteScheduler", marks=NEEDS_SCIPY)])
def test_add_noise_per_sample_timesteps_and_fp16(name):
    cfg = dict(beta_schedule="scaled_linear")
    ours, theirs = S.SCHEDULERS[name](**cfg), getattr(diffusers, name)(**cfg)
    ours.set_timesteps(20), theirs.set_timesteps(20)
    x, noise = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    ts = theirs.timesteps[[0, 7, 19]]  # a different timestep per sample
    torch.testing.assert_close(ours.add_noise(x, noise, ts), theirs.add_noise(x, noise, ts), rtol=1e-6, atol=1e-6)
    # fp16 latents: diffusers computes DDIM/DDPM in fp16, we compute in fp32 and round once: close, not equal.
    # Euler: both compute in fp32 and round the result once, so only the rounding of fp32 differences remains.
    tol = 2e-3 if name.startswith("Euler") else 2e-2
    noise = None if name in NO_GENERATOR else "generator"
    assert _loop(S.SCHEDULERS[name](**cfg), getattr(diffusers, name)(**cfg), dtype=torch.float16,
                 noise=noise) <= tol


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                                  "UniPCMultistepScheduler", "LCMScheduler", "HeunDiscreteScheduler",
                                  "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
                                  "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "TCDScheduler",
                                  "DPMSolverSinglestepScheduler", "EDMDPMSolverMultistepScheduler",
                                  "EDMEulerScheduler"])
def test_outputs_fully_written_under_poisoned_allocations(name):
    """torch.empty* return NaN inside the block: an output element the op leaves unwritten would show as NaN."""
    from _numerics import poisoned_allocations

    def one_step():
        # the SDE DPM-Solvers add noise (single-step: order 3, its third call combining S and two x0s); PNDM's
        # third call combines three model outputs
        extra = {"algorithm_type": "sde-dpmsolver++"} if "DPMSolver" in name else {}
        if name == "DPMSolverSinglestepScheduler":
            extra["solver_order"] = 3
        sched = S.SCHEDULERS[name](**_sd_config(name), **extra)
        sched.set_timesteps(6)
        gen = torch.Generator().manual_seed(4)
        x, m = torch.randn(3, 4, 7, 9, generator=gen), torch.randn(3, 4, 7, 9, generator=gen)  # batch 3, odd 7x9
        kw = {"eta": 0.5} if name == "DDIMScheduler" else {}
        if name not in NO_GENERATOR:
            kw["generator"] = torch.Generator().manual_seed(9)
        for t in sched.timesteps[:3]:  # the multistep schedulers' third step reads two earlier outputs
            out = sched.step(m, t, sched.scale_model_input(x, t), **kw)
            m = m * 0.9
        return out

    clean = one_step()
    with poisoned_allocations():
        poisoned = one_step()
    for a, b in zip(clean, poisoned):
        if a is None:  # PNDM's output has no x0
            continue
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def _sd_config(name):
    """SD's betas, for the schedulers that have betas (the EDM ones have sigmas of their own)."""
    return {} if name.startswith("EDM") else {"beta_schedule": "scaled_linear"}


def _sampling_setup(name, device, thresholding=False):
    sched = S.SCHEDULERS[name](**_sd_config(name), **({"thresholding": True} if thresholding else {}))
    sched.set_timesteps(10, device=device)  # moves the coefficient tables to the device, once
    if hasattr(sched, "set_begin_index"):  # Euler, DPM-Solver
        sched.set_begin_index(0)  # as diffusers' pipelines do; otherwise the first step looks its timestep up
    return sched, torch.randn(SHAPE, device=device), torch.randn(SHAPE, device=device)


def _sampling_steps(name, sched, x, mo):
    """Every per-step call a sampling loop makes, with the timestep as a 0-d tensor on the schedule's device."""
    outs = []
    for t in sched.timesteps[:3]:
        x_in = sched.scale_model_input(x, t)
        if name == "DDIMScheduler":
            outs.append(sched.step_cfg(mo, mo * 0.5, 7.5, t, x_in, eta=0.5))  # eta > 0: noise drawn on the device
            outs.append(sched.step(mo, sched.timesteps[2:5:2], x_in))  # per-sample timesteps (a view: a list index
            # would copy itself to the device, a sync of the test's own that the H200 run flagged)
            sched.alphas_at(t)
        else:
            outs.append(sched.step(mo, t, x_in))
    if not hasattr(sched, "set_begin_index"):  # (theirs looks each timestep up on the host, as diffusers')
        outs.append(sched.add_noise(x, mo, sched.timesteps[1:4:2]))
    return outs


@pytest.mark.parametrize("name, thresholding", [("DDIMScheduler", False), ("DDIMScheduler", True),
                                                ("DDPMScheduler", False), ("DDPMScheduler", True),
                                                ("EulerDiscreteScheduler", False),
                                                ("EulerAncestralDiscreteScheduler", False), ("PNDMScheduler", False),
                                                ("DPMSolverMultistepScheduler", False),
                                                ("DPMSolverMultistepScheduler", True),
                                                ("UniPCMultistepScheduler", False),
                                                ("UniPCMultistepScheduler", True), ("LCMScheduler", False),
                                                ("LCMScheduler", True), ("HeunDiscreteScheduler", False),
                                                ("LMSDiscreteScheduler", False), ("KDPM2DiscreteScheduler", False),
                                                ("KDPM2AncestralDiscreteScheduler", False),
                                                ("DEISMultistepScheduler", False), ("TCDScheduler", False),
                                                ("DPMSolverSinglestepScheduler", False),
                                                ("DPMSolverSinglestepScheduler", True),
                                                ("EDMDPMSolverMultistepScheduler", False),
                                                ("EDMDPMSolverMultistepScheduler", True), ("EDMEulerScheduler", False)])
def test_step_does_not_read_device_values(name, thresholding):
    """The step must never read a device value on the host (on a GPU, a sync per step). Meta tensors have no values:
    any .item()/bool()/nonzero/.cpu() on them raises, so a loop that completes on meta tensors cannot have synced."""
    import diffusion_fast

    with diffusion_fast.backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = _sampling_steps(name, *_sampling_setup(name, "meta", thresholding))
    for out in outs:
        prev = out.prev_sample if hasattr(out, "prev_sample") else out
        assert prev.shape == SHAPE and prev.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync detection needs a GPU (meta test covers CPU)")
@pytest.mark.parametrize("name, thresholding", [("DDIMScheduler", False), ("DDIMScheduler", True),
                                                ("DDPMScheduler", False), ("EulerDiscreteScheduler", False),
                                                ("EulerAncestralDiscreteScheduler", False), ("PNDMScheduler", False),
                                                ("DPMSolverMultistepScheduler", False),
                                                ("UniPCMultistepScheduler", False), ("LCMScheduler", False),
                                                ("HeunDiscreteScheduler", False), ("LMSDiscreteScheduler", False),
                                                ("KDPM2DiscreteScheduler", False),
                                                ("KDPM2AncestralDiscreteScheduler", False),
                                                ("DEISMultistepScheduler", False), ("TCDScheduler", False),
                                                ("DPMSolverSinglestepScheduler", False),
                                                ("EDMDPMSolverMultistepScheduler", False),
                                                ("EDMEulerScheduler", False)])
def test_step_does_not_sync_on_cuda(name, thresholding):
    setup = _sampling_setup(name, "cuda", thresholding)
    _sampling_steps(name, *_sampling_setup(name, "cuda", thresholding))  # warm up: kernels compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _sampling_steps(name, *setup)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_device_tables_key_cuda_and_its_current_index_alike(monkeypatch):
    """set_timesteps(device="cuda") fills the table cache; the step looks it up by the sample's device, cuda:0. Both
    must be one key, or the first step copies the table again: a host sync the test above caught on the H200."""
    from diffusion_fast.schedulers import base

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert base._device_key("cuda") == base._device_key(torch.device("cuda:1")) == "cuda:1"
    assert base._device_key("cuda:0") == "cuda:0" and base._device_key("cpu") == "cpu"


@pytest.mark.parametrize("name, tables", [("DDIMScheduler", ("alphas_cumprod", "final_alpha_cumprod")),
                                          ("DDPMScheduler", ("alphas_cumprod", "_ext")),
                                          ("EulerDiscreteScheduler", ("sigmas",)),
                                          ("EulerAncestralDiscreteScheduler", ("sigmas",))])
def test_set_timesteps_refreshes_device_tables_in_place(name, tables, device):
    """A CUDA graph captured with the scheduler reads its device tables by address. set_timesteps must keep a table's
    storage when its shape allows (updating the values), never free it: a freed table is reused by the allocator and
    the graph then reads garbage (this gave NaN images on the H100 after an eager run between two graphed ones)."""
    sched = S.SCHEDULERS[name](beta_schedule="scaled_linear")
    sched.set_timesteps(10, device=device)
    before = {n: sched._table(n, device) for n in tables}
    for steps in (10, 25, 25, 10):  # same length, a longer schedule (Euler's sigmas and DDPM's _ext grow), back
        sched.set_timesteps(steps, device=device)
        for n in tables:
            table = sched._table(n, device)
            torch.testing.assert_close(table.cpu(), getattr(sched, n), rtol=0, atol=0)  # current values
            assert table.device.type == device.type
            if table.shape == before[n].shape:
                assert table.data_ptr() == before[n].data_ptr(), f"{n} was reallocated by set_timesteps({steps})"
            before[n] = table
    assert sched._table(tables[0], device).data_ptr() != getattr(sched, tables[0]).data_ptr()  # a copy, not an alias
    # an unchanged source is not copied again (on CUDA that copy would wait for the device); an in-place change is seen
    table = sched._table(tables[0], device)
    version = table._version
    sched.set_timesteps(10, device=device)
    assert table._version == version or tables[0] != "alphas_cumprod"
    getattr(sched, tables[0]).mul_(0.5)
    sched.set_timesteps(10, device=device)
    torch.testing.assert_close(sched._table(tables[0], device).cpu(), getattr(sched, tables[0]), rtol=0, atol=0)
    with torch.inference_mode():  # inference tensors carry no version counter: still correct, just always copied
        fresh = S.SCHEDULERS[name](beta_schedule="scaled_linear")
        for steps in (10, 10, 25):
            fresh.set_timesteps(steps, device=device)
            for n in tables:
                torch.testing.assert_close(fresh._table(n, device).cpu(), getattr(fresh, n), rtol=0, atol=0)


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_lu_lambdas"])
def test_dpm_solver_cosine_karras_and_lu_timesteps_are_truncated_as_diffusers(sigmas):
    """diffusers' multistep DPM-Solver rounds Karras and Lu-lambda timesteps except for the cosine schedule, where
    the fractional ones are truncated to int64 (single-step and UniPC round them for cosine too)."""
    cfg = {"beta_schedule": "squaredcos_cap_v2", sigmas: True}
    ours, theirs = S.DPMSolverMultistepScheduler(**cfg), diffusers.DPMSolverMultistepScheduler(**cfg)
    for sched in (ours, theirs):
        sched.set_timesteps(12)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", sorted(S.SCHEDULERS))
def test_every_step_names_a_tensor_argument_that_is_not_one(name):
    """A None, a list or an integer tensor as the model output or the sample is a TypeError naming it, raised before
    the step reads it (it was an AttributeError from inside seven of the updates)."""
    sched = S.SCHEDULERS[name]()
    sched.set_timesteps(4)
    t, x = sched.timesteps[0], torch.randn(SHAPE)
    for bad in (None, [1.0], torch.ones(SHAPE, dtype=torch.int64)):
        for args, named in (((bad, t, x), "model_output"), ((x, t, bad), "sample")):
            with pytest.raises(TypeError, match=f"{named} must "):
                sched.step(*args)


def test_a_custom_schedule_that_is_not_numbers_is_named():
    for sched, kwargs in ((S.EulerDiscreteScheduler(), dict(sigmas=["a", "b"])),
                          (S.EDMEulerScheduler(), dict(sigmas="abc")),
                          (S.DPMSolverMultistepScheduler(), dict(timesteps=[900, None]))):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be a non-empty 1-d list of finite numbers"):
            sched.set_timesteps(**kwargs)


def test_from_config_of_another_scheduler_and_load_scheduler(tmp_path):
    single = diffusers.SASolverScheduler(beta_schedule="scaled_linear")
    single.register_to_config(steps_offset=1)  # (not its field: kept in the file, and DDIM takes it)
    single.save_config(tmp_path)
    with pytest.warns(RuntimeWarning, match="SASolverScheduler is not implemented; using DDIMScheduler"):
        sched = S.load_scheduler(str(tmp_path))
    assert isinstance(sched, S.DDIMScheduler) and sched.config.steps_offset == 1
    assert sched.config["beta_schedule"] == "scaled_linear"
    pndm = diffusers.PNDMScheduler(beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    pndm.save_config(tmp_path / "sd15")
    assert isinstance(S.load_scheduler(str(tmp_path / "sd15")), S.PNDMScheduler)  # SD1.5's folder: its own scheduler
    theirs = diffusers.DDIMScheduler.from_config(pndm.config)
    assert _loop(S.DDIMScheduler.from_config(dict(pndm.config)), theirs) <= 1
    # overrides win, as in diffusers' from_config(config, **kwargs); a dict with our class name picks our class
    over = S.EulerDiscreteScheduler.from_config(pndm.config, use_karras_sigmas=True)
    assert over.config.use_karras_sigmas and over.config.beta_schedule == "scaled_linear"
    euler_config = dict(over.config, _class_name="EulerDiscreteScheduler")
    assert isinstance(S.load_scheduler(euler_config), S.EulerDiscreteScheduler)
    (tmp_path / "scheduler").mkdir()
    diffusers.DDPMScheduler(variance_type="fixed_large").save_config(tmp_path / "scheduler")
    ddpm = S.DDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert ddpm.config.variance_type == "fixed_large"
    with pytest.raises(FileNotFoundError, match="no scheduler config"):
        S.DDIMScheduler.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("make, message", [
    (lambda: S.DDIMScheduler().set_timesteps(0), r"num_inference_steps must be in \[1, 1000\]"),
    (lambda: S.DDIMScheduler().set_timesteps(1001), r"num_inference_steps must be in \[1, 1000\]"),
    (lambda: S.DDIMScheduler(prediction_type="eps"), "prediction_type must be"),
    (lambda: S.DDIMScheduler(timestep_spacing="even"), "timestep_spacing must be"),
    (lambda: S.DDIMScheduler(beta_schedule="cubic").betas, "beta_schedule must be"),
    (lambda: S.DDPMScheduler(variance_type="learned"), "variance_type='learned' is not supported"),
    (lambda: S.EulerDiscreteScheduler(use_beta_sigmas=True), "use_beta_sigmas=True is not supported"),
    (lambda: S.DDIMScheduler().step(torch.randn(1, 4, 2, 2), 10, torch.randn(1, 4, 2, 2)), "call set_timesteps"),
    (lambda: S.DDPMScheduler(variance_type="learned_range"), "variance_type='learned_range' is not supported"),
    (lambda: S.EulerDiscreteScheduler(use_exponential_sigmas=True), "use_exponential_sigmas=True is not supported"),
    (lambda: S.EulerDiscreteScheduler(interpolation_type="cubic"), "interpolation_type must be"),
    (lambda: S.EulerDiscreteScheduler(final_sigmas_type="one"), "final_sigmas_type must be"),
    (lambda: _ddpm_10().step(torch.randn(1, 4, 2, 2), 7, torch.randn(1, 4, 2, 2)), r"timestep \[7\] is not in"),
    (lambda: _euler_10().step(torch.randn(1, 4, 2, 2), torch.tensor(7.5), torch.randn(1, 4, 2, 2)), "7.5 is not in"),
])
def test_bad_input_errors(make, message):
    """Each bad input is a ValueError whose message names the argument (never an assert or a deep IndexError)."""
    with pytest.raises(ValueError, match=message):
        make()


def _ddpm_10():
    sched = S.DDPMScheduler()
    sched.set_timesteps(10)
    return sched


def _euler_10():
    sched = S.EulerDiscreteScheduler()
    sched.set_timesteps(10)
    return sched


def test_num_inference_steps_must_be_an_int():
    for bad in (2.5, True, "10"):
        with pytest.raises(TypeError, match="num_inference_steps must be an int"):
            S.DDIMScheduler().set_timesteps(bad)


def test_config_is_read_only_and_unknown_fields_rejected():
    sched = S.DDIMScheduler()
    with pytest.raises(TypeError, match="read-only"):
        sched.config["beta_start"] = 0.5
    import copy
    assert copy.deepcopy(sched).config == sched.config  # (a copy rebuilds the read-only config whole)
    with pytest.raises(TypeError, match="unknown config fields"):
        S.DDIMScheduler(betastart=0.1)
