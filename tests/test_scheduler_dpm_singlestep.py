"""DPMSolverSinglestepScheduler: ours and accelerate's fused step for diffusers' own, against diffusers step by step
over its orders, algorithms, solver types, prediction types and schedules; its order list; its errors."""
import itertools

import pytest
import torch

import diffusers
import diffusion_fast.schedulers as S
from _scheduler_parity import (SHAPE, _loop, _loop_by_2x_rule, assert_add_noise_matches, check_multistep_run_errors,
                               count_op_calls, fused)
from diffusion_fast.schedulers import dpm_singlestep

NAME = "DPMSolverSinglestepScheduler"
# diffusers' set_timesteps runs np.array on a tensor (a numpy 2 DeprecationWarning inside diffusers)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(autouse=True)
def same_noise_in_every_dtype(monkeypatch):
    """The SDE variant draws its noise in the model output's dtype, and a float64 and a float32 randn from one seed
    are different numbers: the 2x rule's float64 run would add other noise than the fp32 runs it judges, and pass
    whatever they computed. Here every draw (ours, diffusers', the fused step) is float32 rounded to the dtype asked
    for. (The pipeline tests compare the noise as drawn, against diffusers' images.)"""
    from diffusers.schedulers import scheduling_dpmsolver_singlestep as theirs
    from diffusion_fast.schedulers import dpm_solver

    real = dpm_solver.randn_tensor

    def float32_draw(shape, generator=None, device=None, dtype=None):
        return real(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    for module in (theirs, dpm_solver):  # (ours and the fused step draw through dpm_solver.sde_noise)
        monkeypatch.setattr(module, "randn_tensor", float32_draw)


def _made(cfg, ours=None):
    """Ours (or ``ours``), diffusers', and diffusers' again (run in float64 by the 2x-rule loop)."""
    return [ours or S.DPMSolverSinglestepScheduler(**cfg), diffusers.DPMSolverSinglestepScheduler(**cfg),
            diffusers.DPMSolverSinglestepScheduler(**cfg)]


# Every order, algorithm, solver type and prediction type, plain, Karras and exponential sigmas; 1 step (one call
# onto sigma 0), 2, 3 and 7 (groups cut short at the end) and 9 (3-call groups whole). By the 2x rule against
# diffusers' arithmetic in float64: its coefficients are fp32 tensors, and its order-3 heun update divides by
# r0 - r1; on the SDE variant that puts diffusers' fp32 result up to 1.7x a plain 2e-6 tolerance from ours
# (measured), while ours folds the weights in float64 and stays closer to the exact result.
@pytest.mark.parametrize("order, algorithm, solver_type", [  # (order 1 has no solver type)
    (order, algorithm, solver) for order, algorithm, solver in itertools.product(
        [1, 2, 3], ["dpmsolver++", "sde-dpmsolver++"], ["midpoint", "heun"]) if order > 1 or solver == "midpoint"])
@pytest.mark.parametrize("prediction_type, sigmas", [("epsilon", "plain"), ("v_prediction", "karras"),
                                                     ("sample", "exponential"), ("epsilon", "karras")])
def test_singlestep_matches_diffusers_by_the_2x_rule(order, algorithm, solver_type, prediction_type, sigmas):
    cfg = dict(solver_order=order, algorithm_type=algorithm, solver_type=solver_type, prediction_type=prediction_type,
               use_karras_sigmas=sigmas == "karras", use_exponential_sigmas=sigmas == "exponential")
    for steps in (1, 2, 3, 7, 9):
        assert _loop_by_2x_rule(*_made(cfg), steps, generator=True) == steps


@pytest.mark.parametrize("cfg", [
    dict(beta_schedule="scaled_linear", solver_order=3),  # SD's betas
    # a final sigma_min lets lower_order_final stay off where the order divides the steps: whole groups to the end
    dict(final_sigmas_type="sigma_min", solver_order=3, lower_order_final=False),
    dict(final_sigmas_type="sigma_min", algorithm_type="sde-dpmsolver++", solver_type="heun"),
    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, prediction_type="v_prediction"),
    dict(thresholding=True, prediction_type="sample", sample_max_value=1.5),
    dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist(), solver_order=3),
])
def test_singlestep_schedules_and_fp16_match_diffusers(cfg):
    for steps in (6, 8, 9):
        ours, theirs = S.DPMSolverSinglestepScheduler(**cfg), diffusers.DPMSolverSinglestepScheduler(**cfg)
        assert _loop(ours, theirs, steps=steps) <= 1
        # diffusers turns lower_order_final on in its config where the schedule needs it; so do we
        assert ours.order_list == theirs.order_list
        assert ours.config.lower_order_final == theirs.config.lower_order_final
    if cfg.get("beta_schedule") != "squaredcos_cap_v2":  # (its first sigma, 2e4, overflows fp16 samples)
        assert _loop(S.DPMSolverSinglestepScheduler(**cfg), diffusers.DPMSolverSinglestepScheduler(**cfg), steps=8,
                     dtype=torch.float16) <= 2e-2
    assert_add_noise_matches(S.DPMSolverSinglestepScheduler(**cfg), diffusers.DPMSolverSinglestepScheduler(**cfg))


def test_order_list_is_diffusers_and_custom_timesteps():
    for order, lower, zero, steps in itertools.product([1, 2, 3], [True, False], [True, False], range(1, 13)):
        cfg = dict(solver_order=order, lower_order_final=lower, final_sigmas_type="zero" if zero else "sigma_min")
        theirs = diffusers.DPMSolverSinglestepScheduler(**cfg)
        theirs.set_timesteps(steps)
        assert dpm_singlestep.order_list(steps, order, theirs.config.lower_order_final, zero) == theirs.order_list
    cfg = dict(solver_order=3)
    schedule = dict(timesteps=[999, 800, 500, 300, 200, 10])
    assert _loop(S.DPMSolverSinglestepScheduler(**cfg), diffusers.DPMSolverSinglestepScheduler(**cfg),
                 schedule=schedule) <= 1


@pytest.mark.parametrize("begin", [1, 2, 4])
def test_a_run_begun_mid_group_lowers_the_order_as_diffusers(begin):
    """img2img's strength starts the schedule at a call whose listed order needs x0s it never made: diffusers lowers
    that call's order (and keeps the sample as a group's first); ours must too, or the image changes."""
    cfg = dict(solver_order=3, algorithm_type="sde-dpmsolver++")
    ours, theirs = S.DPMSolverSinglestepScheduler(**cfg), diffusers.DPMSolverSinglestepScheduler(**cfg)
    for sched in (ours, theirs):
        sched.set_timesteps(10)
        sched.set_begin_index(begin)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen)
    for i, t in enumerate(theirs.timesteps[begin:]):
        m = torch.randn(SHAPE, generator=gen)
        a = theirs.step(m, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        b = ours.step(m, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)
        x = a


def test_singlestep_config_and_errors(tmp_path):
    diffusers.DPMSolverSinglestepScheduler(beta_schedule="scaled_linear").save_config(tmp_path)
    sched = S.load_scheduler(tmp_path)  # by _class_name, no warning
    assert type(sched) is S.DPMSolverSinglestepScheduler and sched.config.beta_schedule == "scaled_linear"
    # a DEIS config takes DPM-Solver's algorithm and solver type, as diffusers' from_config does
    deis = S.DPMSolverSinglestepScheduler.from_config(diffusers.DEISMultistepScheduler().config)
    assert (deis.config.algorithm_type, deis.config.solver_type) == ("dpmsolver++", "midpoint")
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="call set_timesteps first"):
        sched.step(x, 999, x)
    for kwargs, message in [(dict(algorithm_type="dpmsolver"), "the noise-prediction variants, are deprecated"),
                            (dict(variance_type="learned_range"), "variance_type='learned_range' is not supported"),
                            (dict(use_beta_sigmas=True), "use_beta_sigmas=True is not supported"),
                            (dict(use_flow_sigmas=True), "use_flow_sigmas=True is not supported"),
                            (dict(solver_order=4), r"solver_order must be one of \(1, 2, 3\)"),
                            (dict(final_sigmas_type="max"), "final_sigmas_type must be one of"),
                            (dict(use_karras_sigmas=True, use_exponential_sigmas=True), "choose one")]:
        with pytest.raises(ValueError, match=message):
            S.DPMSolverSinglestepScheduler(**kwargs).set_timesteps(4)
    with pytest.raises(ValueError, match="custom timesteps cannot be used with Karras"):
        S.DPMSolverSinglestepScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[900, 500, 100])
    check_multistep_run_errors(sched, x)  # (a group's first call keeps its x0 and sample for the second)
    repeated = S.DPMSolverSinglestepScheduler(solver_order=2)
    repeated.set_timesteps(timesteps=[900, 899, 500, 100])
    repeated._sigma_values[1] = repeated._sigma_values[0]  # two equal sigmas in a group: 0 / 0 in diffusers
    repeated.step(x, repeated.timesteps[0], x)
    with pytest.raises(ValueError, match="divides by zero for this schedule"):
        repeated.step(x, repeated.timesteps[1], x)


# accelerate's fused step for diffusers' own: every call one linear_step pass (a group's sample and x0s folded)
@pytest.mark.parametrize("cfg", [
    {},
    dict(solver_order=3, use_karras_sigmas=True, prediction_type="v_prediction", beta_schedule="scaled_linear"),
    dict(solver_order=3, algorithm_type="sde-dpmsolver++", solver_type="heun", use_exponential_sigmas=True,
         prediction_type="sample"),
    dict(final_sigmas_type="sigma_min", lower_order_final=False, algorithm_type="sde-dpmsolver++"),
])
def test_fused_singlestep_step_matches_diffusers_by_the_2x_rule(monkeypatch, cfg):
    calls = count_op_calls(monkeypatch, "linear_step")
    assert _loop_by_2x_rule(*_made(cfg, fused(NAME, **cfg)), 10, generator=True) == 10 and len(calls) == 10
    assert _loop(fused(NAME, **cfg), diffusers.DPMSolverSinglestepScheduler(**cfg), steps=6) <= 1
    ours, theirs = fused(NAME, **cfg), diffusers.DPMSolverSinglestepScheduler(**cfg)
    for sched in (ours, theirs):  # begun mid-group, as img2img begins
        sched.set_timesteps(9)
        sched.set_begin_index(4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen)
    for i, t in enumerate(theirs.timesteps[4:]):
        m = torch.randn(SHAPE, generator=gen)
        a = theirs.step(m, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        b = ours.step(m, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)
        x = a


@pytest.mark.filterwarnings("ignore:`algorithm_types=dpmsolver` is deprecated:FutureWarning")  # (tested on purpose)
def test_fused_singlestep_leaves_what_it_does_not_mirror_to_diffusers():
    from diffusion_fast import diffusers_schedulers

    for cfg, why in [(dict(thresholding=True), "thresholding"),
                     (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type 'dpmsolver'"),
                     (dict(variance_type="learned_range"), "variance_type 'learned_range'")]:
        sched = diffusers.DPMSolverSinglestepScheduler(**cfg)
        assert why in diffusers_schedulers.fuse_step(sched) and "step" not in vars(sched)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    runs = []
    for sched in (fused(NAME), diffusers.DPMSolverSinglestepScheduler()):
        sched.set_timesteps(3)
        runs.append([sched.step(x, t, x).prev_sample for t in sched.timesteps])
        with pytest.raises(IndexError):  # a call past the schedule: diffusers' own step and its error
            sched.step(x, sched.timesteps[-1], x)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
