"""DEISMultistepScheduler: ours and accelerate's fused step for diffusers' own, against diffusers step by step over
its orders, prediction types, schedules and lower_order_final; its errors."""
import itertools

import pytest
import torch

import diffusers
import diffusion_fast.schedulers as S
from _scheduler_parity import (SHAPE, _loop, _loop_by_2x_rule, assert_add_noise_matches, check_multistep_run_errors,
                               count_op_calls, fused)

# diffusers' Karras and exponential sigmas call np.array on a tensor, and its coefficients np.log on 0-d tensors
# (numpy 2 DeprecationWarnings inside diffusers, 80 000 of them)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]


def _made(cfg, ours=None):
    """Ours (or ``ours``), diffusers', and diffusers' again (run in float64 by the 2x-rule loop)."""
    return [ours or S.DEISMultistepScheduler(**cfg), diffusers.DEISMultistepScheduler(**cfg),
            diffusers.DEISMultistepScheduler(**cfg)]


# Every order with every prediction type and sigma schedule, lower_order_final on and off; 1, 3, 10 and 16 steps
# (16: past diffusers' 15-step limit for lower_order_final, so the last steps keep the full order). By the 2x rule
# against diffusers' arithmetic in float64: its fp32 coefficients (np.log of fp32 rho) and x0 -> noise conversion
# at t=999 (alpha = 0.006) round differently from our float64-folded weights, 2e-5 of the sample apart (measured).
@pytest.mark.parametrize("order, prediction_type, sigmas", list(itertools.product(
    [1, 2, 3], ["epsilon", "v_prediction", "sample"], ["plain", "karras", "exponential"])))
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_deis_matches_diffusers_by_the_2x_rule(order, prediction_type, sigmas, lower_order_final):
    cfg = dict(solver_order=order, prediction_type=prediction_type, lower_order_final=lower_order_final,
               use_karras_sigmas=sigmas == "karras", use_exponential_sigmas=sigmas == "exponential")
    for steps in (1, 3, 10, 16):
        assert _loop_by_2x_rule(*_made(cfg), steps) == steps


@pytest.mark.parametrize("cfg", [
    dict(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear"),  # SD's scheduler config
    dict(timestep_spacing="trailing", solver_order=3),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
    dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist(), solver_order=3),
])
def test_deis_schedules_and_fp16_match_diffusers(cfg):
    assert _loop_by_2x_rule(*_made(cfg), 8) == 8
    assert _loop(S.DEISMultistepScheduler(**cfg), diffusers.DEISMultistepScheduler(**cfg), steps=8, noise=None) <= 10
    if cfg.get("beta_schedule") != "squaredcos_cap_v2":  # (its first sigma, 2e4, overflows fp16 samples)
        assert _loop(S.DEISMultistepScheduler(**cfg), diffusers.DEISMultistepScheduler(**cfg), steps=8, noise=None,
                     dtype=torch.float16) <= 2e-2
    assert_add_noise_matches(S.DEISMultistepScheduler(**cfg), diffusers.DEISMultistepScheduler(**cfg))


def test_deis_config_and_errors(tmp_path):
    diffusers.DEISMultistepScheduler(beta_schedule="scaled_linear").save_config(tmp_path)
    sched = S.load_scheduler(tmp_path)  # by _class_name, no warning
    assert type(sched) is S.DEISMultistepScheduler and sched.config.beta_schedule == "scaled_linear"
    # a DPM-Solver config takes DEIS's algorithm and solver type, as diffusers' from_config does
    dpm = S.DEISMultistepScheduler.from_config(diffusers.DPMSolverMultistepScheduler(solver_type="heun").config)
    assert (dpm.config.algorithm_type, dpm.config.solver_type) == ("deis", "logrho")
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="call set_timesteps first"):
        sched.step(x, 999, x)
    for kwargs, message in [(dict(thresholding=True), "thresholding=True is not supported"),
                            (dict(use_beta_sigmas=True), "use_beta_sigmas=True is not supported"),
                            (dict(use_flow_sigmas=True), "use_flow_sigmas=True is not supported"),
                            (dict(solver_order=4), r"solver_order must be one of \(1, 2, 3\)"),
                            (dict(algorithm_type="sde-dpmsolver++"), "algorithm_type must be one of"),
                            (dict(use_karras_sigmas=True, use_exponential_sigmas=True), "choose one")]:
        with pytest.raises(ValueError, match=message):
            S.DEISMultistepScheduler(**kwargs).set_timesteps(4)
    check_multistep_run_errors(sched, x)


# accelerate's fused step for diffusers' own: every step one linear_step pass (three orders' weights folded)
@pytest.mark.parametrize("cfg", [
    {},
    dict(solver_order=3, use_karras_sigmas=True, prediction_type="v_prediction", beta_schedule="scaled_linear"),
    dict(solver_order=3, lower_order_final=False, use_exponential_sigmas=True, prediction_type="sample"),
])
def test_fused_deis_step_matches_diffusers_by_the_2x_rule(monkeypatch, cfg):
    calls = count_op_calls(monkeypatch, "linear_step")
    assert _loop_by_2x_rule(*_made(cfg, fused("DEISMultistepScheduler", **cfg)), 16) == 16 and len(calls) == 16
    assert _loop(fused("DEISMultistepScheduler", **cfg), diffusers.DEISMultistepScheduler(**cfg), steps=6,
                 noise=None) <= 10


def test_fused_deis_leaves_thresholding_and_a_call_past_the_schedule_to_diffusers():
    from diffusion_fast import diffusers_schedulers

    sched = diffusers.DEISMultistepScheduler(thresholding=True)
    assert "thresholding" in diffusers_schedulers.fuse_step(sched) and "step" not in vars(sched)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    runs = []
    for sched in (fused("DEISMultistepScheduler"), diffusers.DEISMultistepScheduler()):
        sched.set_timesteps(2)
        runs.append([sched.step(x, t, x).prev_sample for t in sched.timesteps])
        with pytest.raises(IndexError):  # a call past the schedule: diffusers' own step and its error
            sched.step(x, sched.timesteps[-1], x)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
