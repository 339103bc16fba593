"""accelerate's fused scheduler steps: diffusers' DDIM, Euler, Heun, LMS, DPM-Solver++, PNDM, UniPC, LCM and DDPM
schedulers, patched, against the same schedulers unpatched, step by step and through whole pipelines; which
schedulers are left alone, and why (LCM, Heun and LMS also have their own files, with our schedulers)."""
import itertools

import numpy as np
import pytest
import torch

import _tiny_diffusers
import diffusers
from conftest import NEEDS_SCIPY, ON_GPU
import diffusion_fast
from _scheduler_parity import (SHAPE, _diffusers_unipc_is_finite, _loop, _loop_by_2x_rule, count_op_calls,
                               fused)
from diffusion_fast import diffusers_schedulers
from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

# diffusers' Euler calls np.array on a tensor (a numpy 2 DeprecationWarning inside diffusers, not in our code)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              # a deliberately tested configuration that diffusers deprecates
              pytest.mark.filterwarnings("ignore:`algorithm_types dpmsolver:FutureWarning"),
              # diffusers' KDPM2 schedules run numpy functions on tensors
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]

OP = {"DDIMScheduler": "ddim_step", "EulerDiscreteScheduler": "euler_step", "DDPMScheduler": "ddpm_step",
      "EulerAncestralDiscreteScheduler": "euler_ancestral_step", "DPMSolverMultistepScheduler": "linear_step",
      "PNDMScheduler": "linear_step", "UniPCMultistepScheduler": "linear_step", "LCMScheduler": "linear_step",
      "HeunDiscreteScheduler": "linear_step", "LMSDiscreteScheduler": "linear_step",
      "KDPM2DiscreteScheduler": "linear_step", "KDPM2AncestralDiscreteScheduler": "linear_step",
      "DEISMultistepScheduler": "linear_step", "TCDScheduler": "linear_step",
      "DPMSolverSinglestepScheduler": "linear_step", "EDMDPMSolverMultistepScheduler": "linear_step",
      "EDMEulerScheduler": "linear_step"}
SDXL_EULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
                  steps_offset=1)  # the scheduler config SDXL checkpoints ship


def _images(pipe, steps=3):
    return pipe("a red cube", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="np").images


@pytest.mark.parametrize("name, cfg, step_kwargs", [
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", SDXL_EULER, {}),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", use_karras_sigmas=True), {}),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", timestep_type="continuous"), {}),
    ("EulerDiscreteScheduler", dict(prediction_type="sample", final_sigmas_type="sigma_min"), {}),
    # churn inside a sigma window: noise from the generator on some steps only
    ("EulerDiscreteScheduler", {}, dict(s_churn=2.0, s_tmin=0.5, s_tmax=5.0, s_noise=1.003)),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("EulerAncestralDiscreteScheduler", dict(SDXL_EULER, prediction_type="v_prediction"), {}),
    ("EulerAncestralDiscreteScheduler", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                             timestep_spacing="trailing"), {}),  # zero SNR: the first sigma is huge
    ("DDPMScheduler", {}, {}),
    ("DDPMScheduler", dict(variance_type="fixed_small_log", prediction_type="v_prediction"), {}),
    ("DDPMScheduler", dict(variance_type="fixed_large", prediction_type="sample", clip_sample=False), {}),
    ("DDPMScheduler", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"), {}),
    ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1), {"eta": 0.7}),
    ("DDIMScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing"), {}),
])
def test_fused_step_matches_the_schedulers_own(monkeypatch, name, cfg, step_kwargs):
    steps = 5
    calls = count_op_calls(monkeypatch, OP[name])
    ours, theirs = fused(name, **cfg), getattr(diffusers, name)(**cfg)
    assert _loop(ours, theirs, steps=steps, **step_kwargs) <= 1
    assert len(calls) == steps  # every step ran the fused op: nothing went back to diffusers' step


def test_euler_sigma_tables_follow_the_schedule():
    # The fused Euler step keeps the sigmas as floats and as a table on the sample's device, made once per schedule:
    # a new schedule (set_timesteps) and sigmas changed in place must both be seen.
    ours, theirs = fused("EulerDiscreteScheduler"), diffusers.EulerDiscreteScheduler()
    assert _loop(ours, theirs, steps=5) <= 1
    assert _loop(ours, theirs, steps=7) <= 1
    x, m = torch.randn(2, 4, 5, 7), torch.randn(2, 4, 5, 7)
    for sched in (ours, theirs):
        sched.set_timesteps(4)
        sched.scale_model_input(x, sched.timesteps[0])
        sched.step(m, sched.timesteps[0], x)
        sched.sigmas.mul_(0.5)  # in place, after the tables were made: the same tensor object, a new version
    # with churn below 0.75 * the old sigma: only the halved sigma is inside the window, so it draws and adds noise
    window = dict(s_churn=1.0, s_tmax=0.75 * float(theirs.sigmas[1]) / 0.5)
    torch.testing.assert_close(
        ours.step(m, ours.timesteps[1], x, generator=torch.Generator().manual_seed(3), **window).prev_sample,
        theirs.step(m, theirs.timesteps[1], x, generator=torch.Generator().manual_seed(3), **window).prev_sample,
        rtol=1e-6, atol=1e-6)


# DPM-Solver++: orders 1 to 3 ("DPM++ 2M" is order 2, "3M" order 3), ODE and SDE ("DPM++ 2M SDE"), both solver
# types, Karras sigmas or not; inside, every prediction type, lower_order_final on and off, 5 steps (lower_order_final
# steps down near the end) and 20 (it does not). The SDE variant draws its noise from equally seeded generators.
@pytest.mark.parametrize("algorithm, order, solver_type, karras", list(
    itertools.product(["dpmsolver++", "sde-dpmsolver++"], [1, 2, 3], ["midpoint", "heun"], [False, True])))
def test_fused_dpm_solver_matches_its_own(monkeypatch, algorithm, order, solver_type, karras):
    calls = count_op_calls(monkeypatch, "linear_step")
    for prediction_type, lower_order_final, steps in itertools.product(
            ["epsilon", "v_prediction", "sample"], [True, False], [5, 20]):
        cfg = dict(SDXL_EULER, algorithm_type=algorithm, solver_order=order, solver_type=solver_type,
                   prediction_type=prediction_type, use_karras_sigmas=karras, lower_order_final=lower_order_final)
        ours, theirs = fused("DPMSolverMultistepScheduler", **cfg), diffusers.DPMSolverMultistepScheduler(**cfg)
        calls.clear()
        assert _loop(ours, theirs, steps=steps) <= 1, cfg  # each step's x0 is also what the next step reads
        assert len(calls) == steps, cfg


# PNDM in its PLMS mode (SD1.5's shipped scheduler) and with diffusers' default Runge-Kutta warm-up (four calls a
# step for three steps): 1 to 4 model outputs combined, the second call's re-step, every spacing, both prediction
# types. Judged by the 2x rule against diffusers' own step run in float64 (see _loop_by_2x_rule).
# (diffusers' warm-up needs 4 inference steps or more)
@pytest.mark.parametrize("skip_prk_steps, prediction_type, spacing, steps", [
    (skip, *combo) for skip in (True, False) for combo in itertools.product(
        ["epsilon", "v_prediction"], ["leading", "trailing", "linspace"], [1, 2, 3, 5, 20] if skip else [4, 5, 20])])
def test_fused_pndm_matches_its_own_by_the_2x_rule(monkeypatch, skip_prk_steps, prediction_type, spacing, steps):
    cfg = dict(skip_prk_steps=skip_prk_steps, prediction_type=prediction_type, timestep_spacing=spacing,
               steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               set_alpha_to_one=False)
    calls = count_op_calls(monkeypatch, "linear_step")
    ours, theirs, exact = fused("PNDMScheduler", **cfg), diffusers.PNDMScheduler(**cfg), diffusers.PNDMScheduler(**cfg)
    n = _loop_by_2x_rule(ours, theirs, exact, steps)
    assert len(calls) == n and ours.counter == theirs.counter and len(ours.ets) == len(theirs.ets)


# UniPC: orders 1-3, both B(h) variants, data or noise prediction, Karras sigmas or not; inside, every prediction
# type, lower_order_final and 5/20 steps. Judged by the 2x rule against diffusers in float64 (UniPC's third order
# solves a small ill-conditioned system); a config whose diffusers result is not finite runs diffusers' own step.
# A step after the first is two fused passes (corrector, predictor), the first step one.
@pytest.mark.parametrize("order, solver_type, predict_x0, karras", list(
    itertools.product([1, 2, 3], ["bh1", "bh2"], [True, False], [False, True])))
def test_fused_unipc_matches_its_own(monkeypatch, order, solver_type, predict_x0, karras):
    calls = count_op_calls(monkeypatch, "linear_step")
    checked = 0
    for prediction_type, lower_order_final, steps in itertools.product(
            ["epsilon", "v_prediction", "sample"], [True, False], [5, 20]):
        # (onto a final sigma of 0, diffusers' noise-prediction and bh1 updates are NaN: see the next test)
        final = "zero" if predict_x0 and solver_type == "bh2" else "sigma_min"
        cfg = dict(SDXL_EULER, solver_order=order, solver_type=solver_type, predict_x0=predict_x0,
                   prediction_type=prediction_type, use_karras_sigmas=karras, lower_order_final=lower_order_final,
                   final_sigmas_type=final)
        ours = fused("UniPCMultistepScheduler", **cfg)
        theirs, exact = diffusers.UniPCMultistepScheduler(**cfg), diffusers.UniPCMultistepScheduler(**cfg)
        calls.clear()
        if not _diffusers_unipc_is_finite(cfg, steps):
            continue
        assert _loop_by_2x_rule(ours, theirs, exact, steps) == steps
        assert len(calls) == 2 * steps - 1, cfg
        checked += 1
    assert checked >= 6  # lower_order_final=True is finite everywhere (repeated final sigmas need it)


def test_fused_unipc_leaves_what_diffusers_computes_as_nan_to_diffusers():
    # bh1 onto a final sigma of 0: diffusers multiplies B(h) = -inf by a zero residual (NaN); fused, the same NaN
    cfg = dict(solver_type="bh1")
    ours, theirs = fused("UniPCMultistepScheduler", **cfg), diffusers.UniPCMultistepScheduler(**cfg)
    assert _loop(ours, theirs, steps=5, noise=None) <= 1  # NaN at the same places (checked by the comparison)


def test_fused_pndm_keeps_diffusers_errors():
    sched = fused("PNDMScheduler")  # skip_prk_steps=False: PLMS needs the warm-up's outputs first
    sched.set_timesteps(5)
    sched.counter = len(sched.prk_timesteps)  # a caller that skipped the warm-up
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="can only be run AFTER scheduler has been run in 'prk' mode"):
        sched.step(x, sched.timesteps[-1], x)


def test_dpm_solver_step_diffusers_computes_with_infinities_is_its_own():
    # Karras sigmas ending at sigma_min repeat the last sigma, so the last step has h = 0: heun's (e^-h - 1) / h is
    # 0 / 0 and diffusers' image is NaN there. The coefficients are not finite, so that step is diffusers' own.
    cfg = dict(solver_order=2, solver_type="heun", use_karras_sigmas=True, final_sigmas_type="sigma_min")
    ours, theirs = fused("DPMSolverMultistepScheduler", **cfg), diffusers.DPMSolverMultistepScheduler(**cfg)
    assert _loop(ours, theirs, steps=5) <= 1  # NaN at the same places (checked by the comparison)


@pytest.mark.parametrize("name, cfg", [
    ("EulerDiscreteScheduler", SDXL_EULER),
    ("EulerAncestralDiscreteScheduler", SDXL_EULER),
    ("DPMSolverMultistepScheduler", SDXL_EULER),
    ("DDPMScheduler", {}),
    ("DDIMScheduler", {}),
    ("LCMScheduler", {}),
    ("HeunDiscreteScheduler", SDXL_EULER),
    pytest.param("LMSDiscreteScheduler", SDXL_EULER, marks=NEEDS_SCIPY),
])
def test_fused_step_in_half_precision(name, cfg):
    # fp16 model outputs and samples, as in an fp16 pipeline: output dtypes as diffusers' (Euler's x0 stays fp32).
    # DDPM and DDIM compute in fp32 where diffusers computes in fp16, hence the wider bound there.
    tol = 2e-3 if name.startswith("Euler") else 2e-2
    noise = None if name in ("HeunDiscreteScheduler", "LMSDiscreteScheduler") else "generator"  # (steps without)
    assert _loop(fused(name, **cfg), getattr(diffusers, name)(**cfg), dtype=torch.float16, noise=noise) <= tol


@pytest.mark.parametrize("name, cfg, why", [
    ("DDPMScheduler", dict(thresholding=True), "thresholding"),
    ("DDPMScheduler", dict(variance_type="fixed_large_log"), "variance_type 'fixed_large_log'"),  # NaN in diffusers
    ("DDIMScheduler", dict(thresholding=True), "thresholding"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
     "algorithm_type 'dpmsolver'"),  # the noise-prediction solvers
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
     "algorithm_type 'sde-dpmsolver'"),
    ("DPMSolverMultistepScheduler", dict(thresholding=True), "thresholding"),
    ("UniPCMultistepScheduler", dict(solver_p=diffusers.DDIMScheduler()), "solver_p"),
    ("LCMScheduler", dict(thresholding=True), "thresholding"),
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="sample"), "prediction_type 'sample'"),  # diffusers raises
])
def test_configs_not_mirrored_are_left_alone_and_say_why(name, cfg, why):
    sched = getattr(diffusers, name)(**cfg)
    reason = diffusers_schedulers.fuse_step(sched)
    assert reason is not None and why in reason and "step" not in vars(sched)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler"])
def test_a_config_changed_after_fusing_runs_the_schedulers_own_step(monkeypatch, name):
    # register_to_config replaces a config after accelerate: each fused step checks it again
    calls = count_op_calls(monkeypatch, OP[name])
    ours, theirs = fused(name), getattr(diffusers, name)(thresholding=True)
    ours.register_to_config(thresholding=True)
    for sched in (ours, theirs):
        sched.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    x, model_output = torch.randn(2, 4, 5, 7, generator=gen), torch.randn(2, 4, 5, 7, generator=gen)
    for t in theirs.timesteps[:2]:
        a = theirs.step(model_output, t, x, generator=torch.Generator().manual_seed(1))
        b = ours.step(model_output, t, x, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=0, atol=0)
    assert calls == []


def test_euler_steps_keep_diffusers_errors_and_warnings(caplog):
    sched = fused("EulerDiscreteScheduler")
    sched.set_timesteps(3)
    x = torch.randn(1, 4, 5, 7)
    with pytest.raises(ValueError, match="Passing integer indices"):  # diffusers' own check
        sched.step(x, 3, x)
    with caplog.at_level("WARNING"):  # diffusers warns when scale_model_input was skipped; the step still runs
        out = sched.step(x, sched.timesteps[0], x)
    assert "scale_model_input" in caplog.text and out.prev_sample.shape == x.shape


@pytest.mark.parametrize("name, cfg", [
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction")),
    ("EulerAncestralDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),
    ("PNDMScheduler", dict(skip_prk_steps=True)),  # as SD1.5 ships it
    ("PNDMScheduler", dict(skip_prk_steps=False)),  # diffusers' default: 12 warm-up calls first
    ("UniPCMultistepScheduler", {}),
    ("LCMScheduler", {}),  # LCM-LoRA's sampler
    ("HeunDiscreteScheduler", {}),  # two model calls a step but the last
    ("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True)),  # "DPM2 Karras": the UNet at the midpoints too
    ("KDPM2AncestralDiscreteScheduler", {}),  # "DPM2 a": noise from the generator at every second call
    ("DEISMultistepScheduler", dict(solver_order=3)),  # two earlier noise predictions combined
    # "DPM++ SDE Karras" as diffusers maps it: a 3-call group, noise at every call
    ("DPMSolverSinglestepScheduler", dict(solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),
    ("EDMDPMSolverMultistepScheduler", {}),  # Playground v2.5's, on an SD1 UNet: c_in inputs, c_noise timesteps
    ("EDMEulerScheduler", dict(sigma_schedule="exponential", prediction_type="v_prediction")),  # CosXL-like
    ("TCDScheduler", {}),  # TCD-LoRA's (the pipeline's eta 0: deterministic)
    pytest.param("LMSDiscreteScheduler", {}, marks=NEEDS_SCIPY),
    ("DDPMScheduler", dict(variance_type="fixed_small_log")),
])
def test_pipelines_keep_their_images(monkeypatch, name, cfg):
    """The SD1 pipeline with the fused scheduler: the same images within the fp32 tolerance, and restore gives back
    the scheduler's own step exactly."""
    pipe = _tiny_diffusers.pipeline("sd1", seed=4)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **cfg)
    n = 3 if cfg.get("skip_prk_steps", True) else 4  # diffusers' Runge-Kutta warm-up needs 4 steps or more
    before = _images(pipe, n)
    calls = count_op_calls(monkeypatch, OP[name])
    diffusion_fast.accelerate(pipe)
    assert pipe._diffusion_fast_report["scheduler"] == 1
    fast = _images(pipe, n)
    steps = len(pipe.scheduler.timesteps)  # 3; 4 for PLMS (it steps its first timestep twice); 13 with RK warm-up
    passes = 2 * steps - 1 if name == "UniPCMultistepScheduler" else steps  # UniPC: corrector + predictor
    assert len(calls) == passes and np.abs(fast - before).max() <= PIPELINE_FP32_MAX_ABS
    diffusion_fast.restore(pipe)
    assert "step" not in vars(pipe.scheduler)
    assert np.array_equal(_images(pipe, n), before)


def test_sdxl_pipeline_with_its_default_euler_scheduler(monkeypatch):
    pipe = _tiny_diffusers.sdxl_pipeline(seed=5)
    pipe.scheduler = diffusers.EulerDiscreteScheduler(**SDXL_EULER)
    before = _images(pipe)
    calls = count_op_calls(monkeypatch, "euler_step")
    diffusion_fast.accelerate(pipe)
    fast = _images(pipe)
    assert len(calls) == 3 and np.abs(fast - before).max() <= PIPELINE_FP32_MAX_ABS
    diffusion_fast.restore(pipe)
    assert np.array_equal(_images(pipe), before)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "DPMSolverMultistepScheduler", "PNDMScheduler", "UniPCMultistepScheduler",
                                  "LCMScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                                  "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "TCDScheduler",
                                  "DPMSolverSinglestepScheduler", "EDMDPMSolverMultistepScheduler", "EDMEulerScheduler",
                                  pytest.param("LMSDiscreteScheduler", marks=NEEDS_SCIPY), "DDPMScheduler"])
def test_fused_steps_on_gpu_in_half_precision(monkeypatch, name):
    """The CUDA kernels of the fused steps inside an fp16 pipeline on the GPU, with the UNet graphed: the image stays
    within fp16 noise of the unpatched pipeline's, every step runs our op (a Triton kernel), replays are bit-identical."""
    pipe = _tiny_diffusers.pipeline("sd1", seed=4).to("cuda", torch.float16)
    extra = {"skip_prk_steps": True} if name == "PNDMScheduler" else {}  # PNDM as SD1.5 ships it
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    before = _images(pipe)
    calls = count_op_calls(monkeypatch, OP[name])
    diffusion_fast.accelerate(pipe)
    assert pipe._diffusion_fast_report["scheduler"] == 1
    first, second = _images(pipe), _images(pipe)
    steps = len(pipe.scheduler.timesteps)
    assert len(calls) == 2 * (2 * steps - 1 if name == "UniPCMultistepScheduler" else steps)
    # EDM's DPM-Solver starts at sigma 80, where fp16 rounding of the larger latents differs more: 2.25e-2 on the H200
    tolerance = 3e-2 if name == "EDMDPMSolverMultistepScheduler" else 2e-2
    assert np.abs(first - before).max() < tolerance and np.array_equal(first, second)
    diffusion_fast.restore(pipe)


def test_which_schedulers_are_left_alone_and_why():
    class OwnStep(diffusers.EulerDiscreteScheduler):
        def step(self, *args, **kwargs):  # a user's subclass: its step is not the one we mirror
            return super().step(*args, **kwargs)

    assert "overrides EulerDiscreteScheduler.step" in diffusers_schedulers.fuse_step(OwnStep())
    unfused = diffusers.SASolverScheduler()  # no fused step
    names = ("DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, "
             "KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, LMSDiscreteScheduler, "
             "DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, DEISMultistepScheduler, "
             "EDMDPMSolverMultistepScheduler, EDMEulerScheduler, PNDMScheduler, UniPCMultistepScheduler, "
             "LCMScheduler, TCDScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler")
    assert f"SASolverScheduler (fused: {names})" in diffusers_schedulers.fuse_step(unfused)
    assert "step" not in vars(unfused)


def test_a_scheduler_assigned_after_accelerate_isfused(monkeypatch, tmp_path):
    """Changing samplers by assigning pipe.scheduler (diffusers' documented way) after accelerate: the new scheduler
    is fused at the assignment (or left alone and listed), images as unpatched; restore undoes every one of them."""
    pipe = _tiny_diffusers.pipeline("sd1", seed=4)
    cls, config = type(pipe), pipe.scheduler.config
    dpm_before = _images(_with(pipe, diffusers.DPMSolverMultistepScheduler.from_config(config)))
    unfused_before = _images(_with(pipe, diffusers.SASolverScheduler.from_config(config)))
    ddim = pipe.scheduler = diffusers.DDIMScheduler.from_config(config)
    diffusion_fast.accelerate(pipe)
    assert isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__ and "step" in vars(ddim)
    calls = count_op_calls(monkeypatch, "linear_step")
    dpm = pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config)
    report = pipe._diffusion_fast_report
    assert report["scheduler"] == 1 and "step" in vars(dpm)
    assert pipe.config.scheduler[1] == "DPMSolverMultistepScheduler"  # diffusers' own bookkeeping still ran
    assert np.abs(_images(pipe) - dpm_before).max() <= PIPELINE_FP32_MAX_ABS and len(calls) == 3
    pipe.scheduler = diffusers.SASolverScheduler.from_config(config)  # not fused: listed, its own step
    assert report["scheduler"] == 0 and any("SASolverScheduler (fused:" in w for w in report["skipped"])
    assert np.abs(_images(pipe) - unfused_before).max() <= PIPELINE_FP32_MAX_ABS  # (the UNet is still accelerated)
    pipe.scheduler = dpm  # fused once, not twice (its fused step would otherwise be its own fallback)
    pipe.scheduler = dpm
    assert report["scheduler"] == 1 and not any(why.startswith("scheduler ") for why in report["skipped"])
    fresh = pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config)
    pipe.scheduler = fresh
    with pytest.raises(ValueError, match="Number of inference steps is 'None'"):  # diffusers' own step, not a loop
        fresh.step(torch.randn(SHAPE), 10, torch.randn(SHAPE))
    pipe.scheduler = dpm
    assert np.abs(_images(pipe) - dpm_before).max() <= PIPELINE_FP32_MAX_ABS
    pipe.save_pretrained(tmp_path)  # the pipeline's class name is written as diffusers writes it
    assert '"_class_name": "StableDiffusionPipeline"' in (tmp_path / "model_index.json").read_text()
    diffusion_fast.restore(pipe)
    assert type(pipe) is cls and "step" not in vars(dpm) and "step" not in vars(ddim)
    euler = pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(config)
    assert "step" not in vars(euler)  # no longer watched


def _with(pipe, scheduler):
    pipe.scheduler = scheduler
    return pipe
