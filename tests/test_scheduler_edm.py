"""EDMDPMSolverMultistepScheduler (Playground v2.5's) and EDMEulerScheduler (CosXL's): ours and accelerate's fused
steps for diffusers' own, against diffusers step by step over orders, algorithms, solver types, prediction types,
sigma schedules and churn; their errors."""
import itertools

import pytest
import torch

import diffusers
import diffusion_fast.schedulers as S
from _scheduler_parity import (SHAPE, _loop, _loop_by_2x_rule, _run_schedule, assert_add_noise_matches, count_op_calls,
                               fused)
from diffusion_fast.schedulers import edm

DPM, EULER = "EDMDPMSolverMultistepScheduler", "EDMEulerScheduler"
# Playground v2.5's shipped scheduler config (its other fields are the defaults)
PLAYGROUND = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, solver_order=2, prediction_type="epsilon",
                  final_sigmas_type="zero", lower_order_final=True)
COSXL = dict(sigma_min=0.002, sigma_max=120.0, sigma_data=1.0, sigma_schedule="exponential",
             prediction_type="v_prediction")


@pytest.fixture(autouse=True)
def same_noise_in_every_dtype(monkeypatch):
    """The SDE variant and Euler's churn draw noise in the model output's dtype, and a float64 and a float32 randn
    from one seed are different numbers: the 2x rule's float64 run would add other noise than the fp32 runs it
    judges, and pass whatever they computed. Here every draw (ours, diffusers', the fused steps) is float32 rounded
    to the dtype asked for. (The pipeline tests compare the noise as drawn, against diffusers' images.)"""
    from diffusers.schedulers import scheduling_edm_dpmsolver_multistep, scheduling_edm_euler
    from diffusion_fast.schedulers import dpm_solver

    real = edm.randn_tensor

    def float32_draw(shape, generator=None, device=None, dtype=None):
        return real(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    # (the SDE solvers draw through dpm_solver.sde_noise, Euler's churn in edm)
    for module in (scheduling_edm_dpmsolver_multistep, scheduling_edm_euler, edm, dpm_solver):
        monkeypatch.setattr(module, "randn_tensor", float32_draw)


def _made(name, cfg, ours=None):
    """Ours (or ``ours``), diffusers', and diffusers' again (run in float64 by the 2x-rule loop)."""
    return [ours or S.SCHEDULERS[name](**cfg), getattr(diffusers, name)(**cfg), getattr(diffusers, name)(**cfg)]


# Every order, algorithm and solver type (diffusers' EDM solver has no SDE third order), both prediction types, both
# sigma schedules; 1 step (onto sigma 0), 2, 5 and 16 (past the 15-step limit of lower_order_final). By the 2x rule
# against diffusers' arithmetic in float64 (its coefficients are fp32 tensors), for ours and the fused step.
@pytest.mark.parametrize("order, algorithm, solver_type", [
    (order, algorithm, solver) for order, algorithm, solver in itertools.product(
        [1, 2, 3], ["dpmsolver++", "sde-dpmsolver++"], ["midpoint", "heun"])
    if (order > 1 or solver == "midpoint") and not (order == 3 and algorithm == "sde-dpmsolver++")])
@pytest.mark.parametrize("prediction_type, sigma_schedule", [("epsilon", "karras"), ("v_prediction", "exponential")])
def test_edm_dpm_solver_matches_diffusers_by_the_2x_rule(order, algorithm, solver_type, prediction_type,
                                                         sigma_schedule):
    cfg = dict(solver_order=order, algorithm_type=algorithm, solver_type=solver_type, prediction_type=prediction_type,
               sigma_schedule=sigma_schedule)
    for steps in (1, 2, 5, 16):
        assert _loop_by_2x_rule(*_made(DPM, cfg), steps, generator=True) == steps
    assert _loop_by_2x_rule(*_made(DPM, cfg, fused(DPM, **cfg)), 16, generator=True) == 16


@pytest.mark.parametrize("cfg", [
    PLAYGROUND,
    dict(PLAYGROUND, final_sigmas_type="sigma_min", solver_type="heun", euler_at_final=True),
    dict(PLAYGROUND, lower_order_final=False, rho=5.0, sigma_max=120.0),
    dict(PLAYGROUND, thresholding=True, sample_max_value=1.5),
])
def test_edm_dpm_solver_schedules_and_fp16_match_diffusers(cfg):
    for steps in (4, 12, 20):
        assert _loop(S.EDMDPMSolverMultistepScheduler(**cfg), diffusers.EDMDPMSolverMultistepScheduler(**cfg),
                     steps=steps) <= 1
    assert _loop(S.EDMDPMSolverMultistepScheduler(**cfg), diffusers.EDMDPMSolverMultistepScheduler(**cfg), steps=8,
                 dtype=torch.float16) <= 2e-2


@pytest.mark.parametrize("prediction_type, sigma_schedule, final", list(itertools.product(
    ["epsilon", "v_prediction"], ["karras", "exponential"], ["zero", "sigma_min"])))
def test_edm_euler_matches_diffusers_by_the_2x_rule(prediction_type, sigma_schedule, final):
    cfg = dict(prediction_type=prediction_type, sigma_schedule=sigma_schedule, final_sigmas_type=final)
    for steps in (1, 2, 10):
        assert _loop_by_2x_rule(*_made(EULER, cfg), steps) == steps
        assert _loop_by_2x_rule(*_made(EULER, cfg, fused(EULER, **cfg)), steps) == steps


@pytest.mark.parametrize("churn", [dict(s_churn=0.5), dict(s_churn=5.0, s_tmin=0.1, s_tmax=10.0, s_noise=1.003)])
def test_edm_euler_churn_and_fp16_match_diffusers(churn):
    """Churn raises sigma to sigma_hat with fresh noise from the generator (everywhere, or in a window)."""
    for ours in (S.EDMEulerScheduler(**COSXL), fused(EULER, **COSXL)):
        assert _loop(ours, diffusers.EDMEulerScheduler(**COSXL), steps=10, **churn) <= 1
        assert _loop(ours, diffusers.EDMEulerScheduler(**COSXL), steps=6, dtype=torch.float16, **churn) <= 2e-3


def test_edm_euler_custom_ramp_and_given_x0_match_diffusers():
    ours, theirs = S.EDMEulerScheduler(), diffusers.EDMEulerScheduler()
    ramp = [0.0, 0.2, 0.5, 0.9]  # diffusers' sigmas= is a ramp position in [0, 1], 0 being sigma_max
    assert _loop(ours, theirs, schedule=dict(sigmas=torch.tensor(ramp))) <= 1
    for sched in (ours, theirs):
        sched.set_timesteps(5)
    x, m, given = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(k)) for k in range(3))
    a = theirs.step(m, theirs.timesteps[0], x, pred_original_sample=given)
    b = ours.step(m, ours.timesteps[0], x, pred_original_sample=given)
    torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=2e-6, atol=2e-6)
    assert b.pred_original_sample is given


@pytest.mark.parametrize("name, cfg", [(DPM, PLAYGROUND), (EULER, COSXL)])
def test_edm_add_noise_load_and_timesteps(tmp_path, name, cfg):
    getattr(diffusers, name)(**cfg).save_config(tmp_path)
    ours = S.load_scheduler(tmp_path)  # by _class_name, no warning
    theirs = getattr(diffusers, name)(**cfg)
    assert type(ours) is S.SCHEDULERS[name] and ours.config.sigma_data == cfg["sigma_data"]
    assert_add_noise_matches(ours, theirs, steps=8)
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.float32
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=0)  # c_noise = log(sigma) / 4
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=0, atol=0)


def test_edm_errors():
    x = torch.randn(SHAPE)
    for name in (DPM, EULER):
        cls = S.SCHEDULERS[name]
        for kwargs, message in [(dict(prediction_type="sample"), "prediction_type must be one of"),
                                (dict(sigma_schedule="beta"), "sigma_schedule must be one of"),
                                (dict(final_sigmas_type="max"), "final_sigmas_type must be one of"),
                                (dict(sigma_data=0), "sigma_data must be a positive finite number"),
                                (dict(sigma_min=90.0), "sigma_min must be below sigma_max")]:
            with pytest.raises(ValueError, match=message):
                cls(**kwargs)
        with pytest.raises(ValueError, match="call set_timesteps first"):
            cls().step(x, 0.5, x)
    with pytest.raises(ValueError, match="diffusers' EDM third-order update has no SDE form"):
        S.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)
    euler = S.EDMEulerScheduler()
    euler.set_timesteps(2)
    with pytest.raises(ValueError, match="not an index"):
        euler.step(x, 0, x)
    with pytest.raises(ValueError, match=r"sigmas is a ramp in \[0, 1\]"):
        euler.set_timesteps(sigmas=[0.0, 1.5])
    # A final sigma_min: the Karras ramp's last sigma rounds just below sigma_min in fp32, so the last step is one
    # sigma twice, h = -2e-7 apart. diffusers' fp32 h rounds to 0 (no SDE noise: ours takes none either, not the
    # root of a negative rounding error); with heun past the 15-step lower_order_final limit its D1 is 0 / 0 and the
    # image NaN, where ours stays finite (a step to the same sigma)
    cfg = dict(algorithm_type="sde-dpmsolver++", final_sigmas_type="sigma_min")
    for steps in (2, 5):
        assert _loop(S.EDMDPMSolverMultistepScheduler(**cfg), diffusers.EDMDPMSolverMultistepScheduler(**cfg),
                     steps=steps) <= 1
    cfg = dict(solver_type="heun", final_sigmas_type="sigma_min")
    assert _run_schedule(diffusers.EDMDPMSolverMultistepScheduler(**cfg), 16).isnan().all()
    assert _run_schedule(S.EDMDPMSolverMultistepScheduler(**cfg), 16).isfinite().all()


def test_fused_edm_steps_run_one_op_per_step_and_leave_the_rest_to_diffusers(monkeypatch):
    from diffusion_fast import diffusers_schedulers

    calls = count_op_calls(monkeypatch, "linear_step")
    assert _loop(fused(DPM, **PLAYGROUND), diffusers.EDMDPMSolverMultistepScheduler(**PLAYGROUND), steps=6) <= 1
    assert _loop(fused(EULER, **COSXL), diffusers.EDMEulerScheduler(**COSXL), steps=6) <= 1
    assert len(calls) == 12
    for cfg, why in [(dict(thresholding=True), "thresholding"),
                     (dict(algorithm_type="sde-dpmsolver++", solver_order=3), "sde-dpmsolver++ of order 3")]:
        sched = diffusers.EDMDPMSolverMultistepScheduler(**cfg)
        assert why in diffusers_schedulers.fuse_step(sched) and "step" not in vars(sched)
    x = torch.randn(SHAPE)
    euler = fused(EULER)
    euler.set_timesteps(2)
    with pytest.raises(ValueError, match="integer indices"):  # diffusers' own step, and its error
        euler.step(x, 0, x)
    for name in (DPM, EULER):
        sched = fused(name)
        sched.set_timesteps(2)
        for t in sched.timesteps:
            sched.step(x, t, sched.scale_model_input(x, t))
        with pytest.raises(IndexError):  # a call past the schedule: diffusers' own step and its error
            sched.step(x, sched.timesteps[-1], x)
