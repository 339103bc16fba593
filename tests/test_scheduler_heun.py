"""HeunDiscreteScheduler: ours and accelerate's fused step for diffusers' own, against diffusers' step by step, over
its schedules, prediction types and clipping; its errors."""
import itertools

import pytest
import torch

import diffusers
import diffusion_fast.schedulers as S
from _scheduler_parity import SHAPE, _loop, _loop_by_2x_rule, check_two_call_run_errors, count_op_calls, fused

# diffusers' Karras sigmas call np.array on a tensor (a numpy 2 DeprecationWarning inside diffusers)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# Every prediction type, clipped or not, over every spacing and Karras sigmas; 1 step (the Euler call alone), 2 and 10.
# By the 2x rule against diffusers' own arithmetic in float64: with 2 linspace steps the correction is taken at
# sigma(t=0) = 0.03, where diffusers' fp32 (x - x0) / sigma_next divides a rounding error by 0.03 (18x our plain
# tolerance, measured); our derivative weights are folded in float64 and stay closer to the exact result.
@pytest.mark.parametrize("prediction_type, clip, spacing, karras", list(itertools.product(
    ["epsilon", "v_prediction", "sample"], [False, True], ["linspace", "leading", "trailing"], [False, True])))
def test_heun_matches_diffusers_by_the_2x_rule(prediction_type, clip, spacing, karras):
    cfg = dict(prediction_type=prediction_type, clip_sample=clip, clip_sample_range=1.5, timestep_spacing=spacing,
               steps_offset=1 if spacing == "leading" else 0, use_karras_sigmas=karras)
    for steps in (1, 2, 10):
        made = [S.HeunDiscreteScheduler(**cfg), diffusers.HeunDiscreteScheduler(**cfg),
                diffusers.HeunDiscreteScheduler(**cfg)]
        assert _loop_by_2x_rule(*made, steps) == 2 * steps - 1


@pytest.mark.parametrize("cfg", [
    dict(beta_schedule="scaled_linear"),  # SD's betas
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
    dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()),
])
def test_heun_schedules_scaling_and_fp16_match_diffusers(cfg):
    made = [S.HeunDiscreteScheduler(**cfg), diffusers.HeunDiscreteScheduler(**cfg),
            diffusers.HeunDiscreteScheduler(**cfg)]
    assert _loop_by_2x_rule(*made, 5) == 9
    if cfg.get("beta_schedule") == "squaredcos_cap_v2":
        return  # its first sigma is 2.0e4: x * sigma overflows fp16
    # the whole sampling call sequence (scale_model_input included) in fp16, as an fp16 pipeline runs it
    assert _loop(S.HeunDiscreteScheduler(**cfg), diffusers.HeunDiscreteScheduler(**cfg), steps=5, noise=None,
                 dtype=torch.float16) <= 2e-2


def test_heun_custom_timesteps_and_integer_timesteps():
    schedule = {"timesteps": [900, 650, 400, 150, 20]}
    assert _loop(S.HeunDiscreteScheduler(), diffusers.HeunDiscreteScheduler(), noise=None, schedule=schedule) <= 1
    ours, theirs = S.HeunDiscreteScheduler(), diffusers.HeunDiscreteScheduler()
    for sched in (ours, theirs):
        sched.set_timesteps(3)
    x = torch.randn(SHAPE)
    # an int timestep is a schedule value for Heun (diffusers' Euler would reject it as an index)
    torch.testing.assert_close(ours.step(x, 999, x).prev_sample, theirs.step(x, 999, x).prev_sample,
                               rtol=2e-6, atol=2e-6)


def test_heun_config_and_errors():
    sched = S.HeunDiscreteScheduler.from_config(diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear").config)
    assert sched.config.beta_schedule == "scaled_linear" and sched.order == 2
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="call set_timesteps first"):
        sched.step(x, 999, x)
    with pytest.raises(ValueError, match="beta_schedule must be linear, scaled_linear or squaredcos_cap_v2"):
        S.HeunDiscreteScheduler(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="use_exponential_sigmas=True is not supported"):
        S.HeunDiscreteScheduler(use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="custom timesteps cannot be used with use_karras_sigmas"):
        S.HeunDiscreteScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[900, 500])
    sched.set_timesteps(2)
    assert sched.timesteps.tolist() == [999.0, 0.0, 0.0] and len(sched.sigmas) == 4
    for t in sched.timesteps:
        assert sched.state_in_first_order == (t == sched.timesteps[0] or sched.step_index == 2)
        sched.step(x, t, x)
    check_two_call_run_errors(sched, x)


# accelerate's fused step for diffusers' HeunDiscreteScheduler: every call one linear_step pass
@pytest.mark.parametrize("cfg", [
    {},
    dict(beta_schedule="scaled_linear", use_karras_sigmas=True, prediction_type="v_prediction"),
    dict(prediction_type="sample", clip_sample=True, timestep_spacing="trailing"),
])
def test_fused_heun_step_matches_diffusers_by_the_2x_rule(monkeypatch, cfg):
    calls = count_op_calls(monkeypatch, "linear_step")
    made = [fused("HeunDiscreteScheduler", **cfg), diffusers.HeunDiscreteScheduler(**cfg),
            diffusers.HeunDiscreteScheduler(**cfg)]
    assert _loop_by_2x_rule(*made, 6) == 11 and len(calls) == 11
    assert _loop(fused("HeunDiscreteScheduler", **cfg), diffusers.HeunDiscreteScheduler(**cfg), steps=4,
                 noise=None) <= 1  # with scale_model_input


def test_fused_heun_leaves_a_call_past_the_schedule_to_diffusers():
    # one call too many: diffusers' own step divides by the final sigma 0 (NaN), and the fused one does the same
    x = torch.randn(SHAPE)
    runs = []
    for sched in (fused("HeunDiscreteScheduler"), diffusers.HeunDiscreteScheduler()):
        sched.set_timesteps(2)
        runs.append([sched.step(x, t, x).prev_sample for t in [*sched.timesteps, sched.timesteps[-1]]])
    assert runs[0][-1].isnan().any()
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6, equal_nan=True)
