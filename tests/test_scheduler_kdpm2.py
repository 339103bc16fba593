"""KDPM2DiscreteScheduler ("DPM2") and KDPM2AncestralDiscreteScheduler ("DPM2 a"): ours and accelerate's fused steps
for diffusers' own, against diffusers step by step over their schedules and prediction types; their errors."""
import copy
import itertools

import pytest
import torch

import diffusers
import diffusion_fast.schedulers as S
from _scheduler_parity import SHAPE, _loop, _loop_by_2x_rule, check_two_call_run_errors, count_op_calls, fused

# diffusers' timesteps of the midpoints run numpy functions on tensors (numpy 2 DeprecationWarnings inside diffusers)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]

NAMES = ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"]
# The midpoints' timesteps are fractions interpolated in log sigma: ours are one fp32 ulp (6e-5 near t=999) from
# diffusers' at most, and diffusers keeps its Karras and exponential timesteps in float64
T_ATOL = 1e-4


@pytest.fixture(autouse=True)
def same_noise_in_every_dtype(monkeypatch):
    """The ancestral step draws its noise in the model output's dtype, and a float64, float32 and float16 randn from
    one seed are different numbers: the 2x rule's float64 run would add other noise than the fp32 / fp16 runs it
    judges, and pass whatever they computed. Here every draw (ours, diffusers', ours fused) is float32 rounded to
    the dtype asked for. (The pipeline tests compare the noise as drawn, against diffusers' images.)"""
    from diffusers.schedulers import scheduling_k_dpm_2_ancestral_discrete as theirs
    from diffusion_fast.schedulers import kdpm2 as ours

    real = ours.randn_tensor

    def float32_draw(shape, generator=None, device=None, dtype=None):
        return real(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    for module in (theirs, ours):
        monkeypatch.setattr(module, "randn_tensor", float32_draw)


def _noisy(name):
    """Whether the step takes a generator (the ancestral variant's second call draws noise)."""
    return "Ancestral" in name


_BUILT = {}


def _theirs(name, cfg):
    """diffusers' scheduler, copied from one built per config: its constructor makes a 1000-step schedule, 0.9 s of
    per-sigma interpolation."""
    key = (name, repr(sorted(cfg.items())))
    if key not in _BUILT:
        _BUILT[key] = getattr(diffusers, name)(**cfg)
    return copy.deepcopy(_BUILT[key])


def _made(name, cfg):
    """Ours, diffusers', and diffusers' again (run in float64 by the 2x-rule loop)."""
    return [S.SCHEDULERS[name](**cfg), _theirs(name, cfg), _theirs(name, cfg)]


# Both variants, both prediction types diffusers implements, every spacing, plain, Karras and exponential sigmas;
# 1 step (the first call alone, onto sigma 0), 2 and 10. By the 2x rule against diffusers' arithmetic in float64:
# with 2 steps the second call's derivative (x - x0) / sigma_mid is taken at sigma_mid = 0.03 and multiplied by
# dt = -14.6, so diffusers' fp32 rounding of x - x0 is amplified ~500x (2e-5 relative, measured); ours folds the
# derivative's weights in float64 and stays closer to the exact result.
@pytest.mark.parametrize("name, prediction_type, spacing, sigmas", list(itertools.product(
    NAMES, ["epsilon", "v_prediction"], ["linspace", "leading", "trailing"], ["plain", "karras", "exponential"])))
def test_dpm2_matches_diffusers_by_the_2x_rule(name, prediction_type, spacing, sigmas):
    cfg = dict(prediction_type=prediction_type, timestep_spacing=spacing,
               steps_offset=1 if spacing == "leading" else 0, use_karras_sigmas=sigmas == "karras",
               use_exponential_sigmas=sigmas == "exponential")
    for steps in (1, 2, 10):
        calls = _loop_by_2x_rule(*_made(name, cfg), steps, timestep_atol=T_ATOL, generator=_noisy(name))
        assert calls == 2 * steps - 1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cfg", [
    dict(beta_schedule="scaled_linear"),  # SD's betas
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
    dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()),
])
def test_dpm2_schedules_scaling_and_fp16_match_diffusers(name, cfg):
    if _noisy(name) and cfg.get("beta_schedule") == "squaredcos_cap_v2":
        pytest.skip("diffusers' own tables are NaN there: see test_dpm2_ancestral_where_diffusers_tables_are_nan")
    assert _loop_by_2x_rule(*_made(name, cfg), 5, timestep_atol=T_ATOL, generator=_noisy(name)) == 9
    # the whole sampling call sequence (scale_model_input included), the ancestral noise from the generator
    assert _loop(S.SCHEDULERS[name](**cfg), _theirs(name, cfg), steps=5, timestep_atol=T_ATOL,
                 noise="generator" if _noisy(name) else None) <= 10
    if cfg.get("beta_schedule") == "squaredcos_cap_v2":
        return  # its first sigma is 2.0e4: x * sigma overflows fp16
    # fp16 samples and model outputs, by the 2x rule too: diffusers computes in fp16, and its (x - x0) / sigma_mid
    # divides an fp16 rounding by sigma_mid (2.7% of the sample off with the ancestral variant, measured); ours
    # computes in fp32 and rounds once
    made = _made(name, cfg)
    assert _loop_by_2x_rule(*made, 5, timestep_atol=T_ATOL, generator=_noisy(name), dtype=torch.float16) == 9


@pytest.mark.parametrize("name", NAMES)
def test_dpm2_schedule_tables_are_diffusers(name):
    # the repeated sigmas, midpoints (and the ancestral split) as diffusers lays them out: add_noise, img2img's
    # begin index and code reading the tables see the same values
    ours, theirs = S.SCHEDULERS[name](use_karras_sigmas=True), getattr(diffusers, name)(use_karras_sigmas=True)
    for sched in (ours, theirs):
        sched.set_timesteps(6)
    tables = ["sigmas", "sigmas_interpol"] + (["sigmas_up", "sigmas_down"] if _noisy(name) else [])
    for table in tables:
        torch.testing.assert_close(getattr(ours, table), getattr(theirs, table).cpu(), rtol=0, atol=0,
                                   equal_nan=True)
    x, noise = torch.randn(3, *SHAPE[1:]), torch.randn(3, *SHAPE[1:])
    for sched in (ours, theirs):
        sched.set_begin_index(4)  # img2img's start: two calls a step
    ts = theirs.timesteps[[4, 4, 4]]
    torch.testing.assert_close(ours.add_noise(x, noise, ts), theirs.add_noise(x, noise, ts), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_dpm2_config_and_errors(name, tmp_path):
    cls = S.SCHEDULERS[name]
    sched = cls.from_config(getattr(diffusers, name)(beta_schedule="scaled_linear").config)
    assert sched.config.beta_schedule == "scaled_linear" and sched.order == 2
    getattr(diffusers, name)().save_config(tmp_path)
    assert type(S.load_scheduler(tmp_path)) is cls  # by _class_name, no warning
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="call set_timesteps first"):
        sched.step(x, 999, x)
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon' or 'v_prediction'"):
        cls(prediction_type="sample")  # diffusers raises NotImplementedError at the first step
    with pytest.raises(ValueError, match="beta_schedule must be linear, scaled_linear or squaredcos_cap_v2"):
        cls(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="use_beta_sigmas=True is not supported"):
        cls(use_beta_sigmas=True)
    with pytest.raises(ValueError, match="use_karras_sigmas and use_exponential_sigmas: choose one"):
        cls(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\]"):
        sched.set_timesteps(0)
    sched.set_timesteps(2)
    assert len(sched.timesteps) == 3 and sched.timesteps[0] == 999.0 and sched.timesteps[2] == 0.0
    for i, t in enumerate(sched.timesteps):
        assert sched.state_in_first_order == (i % 2 == 0)
        sched.step(x, t, sched.scale_model_input(x, t))
    check_two_call_run_errors(sched, x)


def test_dpm2_ancestral_where_diffusers_tables_are_nan():
    # The cosine schedule's first sigma is 2.0e4: diffusers' sigma_down = sqrt(next^2 - up^2) rounds to 0, so its
    # first midpoint exp(lerp(log sigma, log 0)), that midpoint's timestep and its image are NaN. Ours takes the
    # exact next^2 / sigma there alone: every other entry is diffusers' own, and a run is finite.
    cfg = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    ours, theirs = S.KDPM2AncestralDiscreteScheduler(**cfg), diffusers.KDPM2AncestralDiscreteScheduler(**cfg)
    for sched in (ours, theirs):
        sched.set_timesteps(5)
    assert theirs.sigmas_interpol.isnan().any() and theirs.timesteps.isnan().any()
    assert ours.sigmas_interpol.isfinite().all() and ours.timesteps.isfinite().all()
    lost = (theirs.sigmas_down == 0) & (torch.arange(12) < 7)  # (from 7 on the next sigma is the final 0)
    assert lost.tolist() == [True] + [False] * 11
    torch.testing.assert_close(ours.sigmas_down[~lost], theirs.sigmas_down[~lost], rtol=0, atol=0)
    torch.testing.assert_close(ours.sigmas_down[0], ours.sigmas[1] ** 2 / ours.sigmas[0], rtol=0, atol=0)
    x = torch.randn(SHAPE) * ours.init_noise_sigma
    for t in ours.timesteps:
        x = ours.step(torch.randn(SHAPE), t, ours.scale_model_input(x, t), generator=torch.Generator()).prev_sample
    assert x.isfinite().all()


def test_dpm2_ancestral_draws_noise_from_the_generator():
    # the second call of each step adds sigma_up * noise: another seed, another sample; the same seed, the same
    runs = []
    for seed in (1, 1, 2):
        sched = S.KDPM2AncestralDiscreteScheduler()
        sched.set_timesteps(3)
        x = torch.ones(SHAPE)
        for t in sched.timesteps:
            x = sched.step(torch.full(SHAPE, 0.5), t, x, generator=torch.Generator().manual_seed(seed)).prev_sample
        runs.append(x)
    assert torch.equal(runs[0], runs[1]) and (runs[0] - runs[2]).abs().max() > 1e-3


# accelerate's fused steps for diffusers' own: every call one linear_step pass, on diffusers' own tables (so its
# beta sigmas, made with scipy, are fused too)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cfg", [
    {},
    dict(beta_schedule="scaled_linear", use_karras_sigmas=True, prediction_type="v_prediction"),
    dict(timestep_spacing="trailing", use_exponential_sigmas=True),
])
def test_fused_dpm2_steps_match_diffusers_by_the_2x_rule(monkeypatch, name, cfg):
    calls = count_op_calls(monkeypatch, "linear_step")
    made = [fused(name, **cfg), _theirs(name, cfg), _theirs(name, cfg)]
    assert _loop_by_2x_rule(*made, 6, generator=_noisy(name)) == 11 and len(calls) == 11
    assert _loop(fused(name, **cfg), _theirs(name, cfg), steps=4,
                 noise="generator" if _noisy(name) else None) <= 10  # with scale_model_input


@pytest.mark.parametrize("name", NAMES)
def test_fused_dpm2_keeps_diffusers_own_step_past_the_schedule_and_for_sample(name):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    runs = []
    for sched in (fused(name), getattr(diffusers, name)()):
        sched.set_timesteps(2)
        kw = (lambda: {"generator": torch.Generator().manual_seed(0)}) if _noisy(name) else dict
        runs.append([sched.step(x, t, x, **kw()).prev_sample for t in [*sched.timesteps, sched.timesteps[-1]]])
    assert runs[1][-1].isnan().all()  # (a midpoint of 0 there: 0 / 0)
    for a, b in zip(*runs):  # the call past the schedule is diffusers' own, whatever it gives; before it, with 2
        # steps diffusers' fp32 rounding of x - x0 is divided by a midpoint of 0.03 (2e-5 of the sample, measured)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)
    from diffusion_fast import diffusers_schedulers

    sched = getattr(diffusers, name)(prediction_type="sample")  # diffusers raises NotImplementedError in its step
    assert "prediction_type 'sample'" in diffusers_schedulers.fuse_step(sched) and "step" not in vars(sched)
