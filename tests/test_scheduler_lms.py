"""LMSDiscreteScheduler: ours and accelerate's fused step for diffusers' own, against diffusers' step by step (which
integrates the Lagrange weights with scipy's quad; ours integrates them exactly), over its schedules, prediction types
and orders; its errors."""
import itertools

import pytest
import torch

import diffusers
import diffusion_fast.schedulers as S
from _scheduler_parity import SHAPE, _loop, _loop_by_2x_rule, count_op_calls, fused
from conftest import NEEDS_SCIPY
from diffusion_fast.schedulers.lms import lms_coefficients

pytestmark = [NEEDS_SCIPY,  # diffusers' Karras sigmas call np.array on a tensor (numpy 2 warns inside diffusers)
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


def test_lms_weights_are_the_integrals_diffusers_computes():
    # every order on an uneven (Karras) schedule: exact polynomial integrals vs scipy's quad, to quad's accuracy
    # (diffusers evaluates the Lagrange basis on its fp32 sigma tensors, so it is given them in float64 here)
    theirs = diffusers.LMSDiscreteScheduler(use_karras_sigmas=True)
    theirs.set_timesteps(8)
    theirs.sigmas = theirs.sigmas.double()
    values = theirs.sigmas.tolist()
    for index in range(8):
        for order in range(1, min(index + 1, 4) + 1):
            ours = lms_coefficients(values, index, order)
            expected = [theirs.get_lms_coefficient(order, index, j) for j in range(order)]
            assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert lms_coefficients(values, 0, 1) == [values[1] - values[0]]  # order 1 is Euler


# Every prediction type over every spacing, with Karras sigmas or not; 1 step, 2, 5 (every order up to 4) and 10. By
# the 2x rule against diffusers' arithmetic in float64 too: the fourth order's weights are large and alternate, so
# the fp32 result of either implementation is some way from the exact one.
@pytest.mark.parametrize("prediction_type, spacing, karras", list(itertools.product(
    ["epsilon", "v_prediction", "sample"], ["linspace", "leading", "trailing"], [False, True])))
def test_lms_matches_diffusers(prediction_type, spacing, karras):
    cfg = dict(prediction_type=prediction_type, timestep_spacing=spacing, use_karras_sigmas=karras,
               steps_offset=1 if spacing == "leading" else 0)
    for steps in (1, 2, 5, 10):
        assert _loop(S.LMSDiscreteScheduler(**cfg), diffusers.LMSDiscreteScheduler(**cfg), steps=steps,
                     noise=None) <= 1
        made = [S.LMSDiscreteScheduler(**cfg), diffusers.LMSDiscreteScheduler(**cfg),
                diffusers.LMSDiscreteScheduler(**cfg)]
        with pytest.warns(UserWarning, match="scale_model_input"):  # diffusers' own warning: the 2x loop skips it
            assert _loop_by_2x_rule(*made, steps) == steps


@pytest.mark.parametrize("order", [1, 2, 3, 6])
def test_lms_other_orders_schedules_and_fp16(order):
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # SD's betas
    assert _loop(S.LMSDiscreteScheduler(**cfg), diffusers.LMSDiscreteScheduler(**cfg), steps=8, noise=None,
                 order=order) <= 1
    assert _loop(S.LMSDiscreteScheduler(**cfg), diffusers.LMSDiscreteScheduler(**cfg), steps=5, noise=None,
                 order=order, dtype=torch.float16) <= 2e-2


def test_lms_config_and_errors():
    sched = S.LMSDiscreteScheduler.from_config(diffusers.PNDMScheduler(beta_schedule="scaled_linear").config)
    assert sched.config.beta_schedule == "scaled_linear"
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="call set_timesteps first"):
        sched.step(x, 999, x)
    with pytest.raises(ValueError, match="beta_schedule must be linear, scaled_linear or squaredcos_cap_v2"):
        S.LMSDiscreteScheduler(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="use_beta_sigmas=True is not supported"):
        S.LMSDiscreteScheduler(use_beta_sigmas=True)
    sched.set_timesteps(3)
    with pytest.raises(ValueError, match="order must be a positive int, got 0"):
        sched.step(x, sched.timesteps[0], x, order=0)
    for t in sched.timesteps:
        sched.step(x, t, x)
    assert len(sched.derivatives) == 3
    with pytest.raises(ValueError, match="step called 4 times for a 3-step schedule"):
        sched.step(x, sched.timesteps[-1], x)
    sched.set_timesteps(3)
    assert sched.derivatives == []
    sched.step(x, 999, x)  # an int timestep is a schedule value here, as in diffusers' LMS
    with pytest.raises(ValueError, match="call set_timesteps to start a new run"):
        sched.step(x[:1], sched.timesteps[1], x[:1])


# accelerate's fused step for diffusers' LMSDiscreteScheduler: every step one linear_step pass, no scipy call
@pytest.mark.parametrize("cfg", [
    {},
    dict(beta_schedule="scaled_linear", use_karras_sigmas=True, prediction_type="v_prediction"),
    dict(prediction_type="sample", timestep_spacing="trailing"),
])
def test_fused_lms_step_matches_diffusers(monkeypatch, cfg):
    from diffusers.schedulers import scheduling_lms_discrete

    calls = count_op_calls(monkeypatch, "linear_step")
    assert _loop(fused("LMSDiscreteScheduler", **cfg), diffusers.LMSDiscreteScheduler(**cfg), steps=6,
                 noise=None) <= 1
    assert len(calls) == 6

    def no_quad(*args, **kwargs):
        raise AssertionError("the fused LMS step called scipy's quad")

    monkeypatch.setattr(scheduling_lms_discrete.integrate, "quad", no_quad)
    ours, x = fused("LMSDiscreteScheduler", **cfg), torch.randn(SHAPE)
    ours.set_timesteps(4)
    for t in ours.timesteps:
        x = ours.step(x, t, ours.scale_model_input(x, t)).prev_sample
    assert torch.isfinite(x).all()


def test_lms_weights_are_made_again_for_a_new_schedule():
    # both keep each step's integrated weights for the schedule: a new schedule (or order) must not reuse them
    ours, patched, theirs = S.LMSDiscreteScheduler(), fused("LMSDiscreteScheduler"), diffusers.LMSDiscreteScheduler()
    for steps, order in ((6, 4), (6, 2), (4, 4), (9, 3)):
        assert _loop(ours, theirs, steps=steps, noise=None, order=order) <= 1
        assert _loop(patched, theirs, steps=steps, noise=None, order=order) <= 1


def test_fused_lms_leaves_what_it_does_not_mirror_to_diffusers(caplog):
    ours, theirs = fused("LMSDiscreteScheduler"), diffusers.LMSDiscreteScheduler()
    x = torch.randn(SHAPE)
    for sched in (ours, theirs):
        sched.set_timesteps(3)
    with pytest.warns(UserWarning, match="scale_model_input"):  # diffusers' warning, from its own step
        ours.step(x, ours.timesteps[0], x)
    for sched in (ours, theirs):
        sched.set_timesteps(3)
        sched.scale_model_input(x, sched.timesteps[0])
    torch.testing.assert_close(ours.step(x, ours.timesteps[0], x, order=0).prev_sample,
                               theirs.step(x, theirs.timesteps[0], x, order=0).prev_sample, rtol=0, atol=0)
