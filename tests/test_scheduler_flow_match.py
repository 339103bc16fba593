"""FlowMatchEulerDiscreteScheduler (SD3's sampler) against diffusers' step by step: static and dynamic shifts, the
sigma re-spacings, custom schedules, stochastic sampling, half precision, image-to-image's scale_noise; its errors."""
import pytest
import torch

import diffusers
import diffusion_fast.schedulers as S
from _scheduler_parity import SHAPE, _compare


def _run_both(cfg, schedule, dtype=torch.float32, begin_index=None):
    """Both schedulers on the same random velocities; returns the worst relative difference of the samples."""
    ours, theirs = S.FlowMatchEulerDiscreteScheduler(**cfg), diffusers.FlowMatchEulerDiscreteScheduler(**cfg)
    ours.set_timesteps(**schedule)
    theirs.set_timesteps(**schedule)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas.cpu(), rtol=0, atol=0)
    if begin_index is not None:
        ours.set_begin_index(begin_index)
        theirs.set_begin_index(begin_index)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen).to(dtype)
    worst = 0.0
    for t in theirs.timesteps[begin_index or 0:]:
        v = torch.randn(SHAPE, generator=gen).to(dtype)
        a = theirs.step(v, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        b = ours.step(v, t, x.clone(), generator=torch.Generator().manual_seed(1)).prev_sample
        assert b.dtype == a.dtype and b.shape == a.shape
        worst = max(worst, _compare(a, b))
        x = a
    return worst


@pytest.mark.parametrize("cfg, schedule", [
    (dict(shift=3.0), dict(num_inference_steps=28)),  # SD3 / SD3.5's scheduler config
    (dict(), dict(num_inference_steps=1)),  # no shift, one step (sigma 1 to 0)
    # Flux's: the shift from the image's token count (mu), exponential and linear
    (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), dict(num_inference_steps=7, mu=0.9)),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(num_inference_steps=5, mu=1.3)),
    (dict(shift=3.0, shift_terminal=0.02), dict(num_inference_steps=6)),  # LTX-style terminal stretch
    (dict(shift=3.0, use_karras_sigmas=True), dict(num_inference_steps=9)),
    (dict(shift=2.0, use_exponential_sigmas=True), dict(num_inference_steps=9)),
    (dict(shift=3.0, invert_sigmas=True), dict(num_inference_steps=4)),  # sigmas rising to 1
    (dict(shift=3.0), dict(sigmas=[1.0, 0.75, 0.4, 0.1])),  # custom sigmas, shifted as the config says
    (dict(shift=3.0), dict(timesteps=[1000.0, 600.0, 200.0])),  # custom timesteps: used as given
    (dict(shift=3.0, stochastic_sampling=True), dict(num_inference_steps=5)),  # fresh noise from the generator
])
def test_flow_match_matches_diffusers(cfg, schedule):
    assert _run_both(cfg, schedule) <= 2e-6


def test_flow_match_half_precision_and_mid_schedule_start():
    assert _run_both(dict(shift=3.0), dict(num_inference_steps=8), dtype=torch.float16) <= 1e-3
    assert _run_both(dict(shift=3.0), dict(num_inference_steps=8), begin_index=3) <= 2e-6  # image-to-image's start


def test_flow_match_scale_noise_and_step_output():
    ours, theirs = S.FlowMatchEulerDiscreteScheduler(shift=3.0), diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    x, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    for sched in (ours, theirs):
        sched.set_timesteps(10)
        sched.set_begin_index(4)
    t = theirs.timesteps[4:5].repeat(SHAPE[0])
    torch.testing.assert_close(ours.scale_noise(x, t, noise), theirs.scale_noise(x, t, noise), rtol=0, atol=1e-6)
    # the step's x0 is the sample minus sigma times the velocity (diffusers returns prev alone)
    ours.set_timesteps(4)
    v = torch.randn(SHAPE)
    out = ours.step(v, ours.timesteps[0], x)
    torch.testing.assert_close(out.pred_original_sample, x - float(ours.sigmas[0]) * v)
    torch.testing.assert_close(out.prev_sample, x + float(ours.sigmas[1] - ours.sigmas[0]) * v)


def test_flow_match_config_and_errors(tmp_path):
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(tmp_path)
    sched = S.load_scheduler(tmp_path)  # by _class_name, no warning
    assert type(sched) is S.FlowMatchEulerDiscreteScheduler and sched.shift == 3.0
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="call set_timesteps first"):
        sched.step(x, sched.timesteps[0], x)
    with pytest.raises(ValueError, match="mu must be passed"):
        S.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(4)
    with pytest.raises(ValueError, match="shift must be a positive number"):
        S.FlowMatchEulerDiscreteScheduler(shift=0)
    with pytest.raises(ValueError, match="use_beta_sigmas"):
        S.FlowMatchEulerDiscreteScheduler(use_beta_sigmas=True)
    with pytest.raises(ValueError, match="choose one"):
        S.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="same length"):
        sched.set_timesteps(sigmas=[1.0, 0.5], timesteps=[1000.0, 500.0, 100.0])
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)
    sched.set_timesteps(2)
    with pytest.raises(ValueError, match="not an index"):
        sched.step(x, 0, x)
    with pytest.raises(TypeError, match="noise"):
        sched.scale_noise(x, sched.timesteps[:1], None)  # (diffusers fails inside the arithmetic)
    with pytest.raises(ValueError, match="noise has shape"):
        sched.scale_noise(x, sched.timesteps[:1], x[:1])
    sched.step(x, sched.timesteps[0], x)
    sched.step(x, sched.timesteps[1], x)
    with pytest.raises(ValueError, match="step called 3 times"):
        sched.step(x, sched.timesteps[1], x)
