"""LCMScheduler (LCM-LoRA's sampler): ours and accelerate's fused step for diffusers' own, against diffusers' step by
step, over its schedules (strength, original_inference_steps, custom timesteps), prediction types, clipping and
thresholding; its errors."""
import contextlib
import itertools

import pytest
import torch

import diffusers
import diffusion_fast.schedulers as S
from _scheduler_parity import SHAPE, _loop, count_op_calls, fused


# Every prediction type with x0 as it is, clipped (x0 made first, then the pass) and thresholded; 1 step (the only
# step is the last: no noise), 4 (LCM-LoRA's usual) and 8.
@pytest.mark.parametrize("prediction_type, x0, steps", list(itertools.product(
    ["epsilon", "v_prediction", "sample"], ["plain", "clip", "threshold"], [1, 4, 8])))
def test_lcm_matches_diffusers(prediction_type, x0, steps):
    cfg = dict(prediction_type=prediction_type, clip_sample=x0 == "clip", clip_sample_range=1.5,
               thresholding=x0 == "threshold", sample_max_value=2.0)
    assert _loop(S.LCMScheduler(**cfg), diffusers.LCMScheduler(**cfg), steps=steps) <= 1


@pytest.mark.parametrize("cfg, schedule", [
    ({}, dict(num_inference_steps=4, strength=0.6)),  # img2img: the lower part of the distillation schedule
    ({}, dict(num_inference_steps=3, original_inference_steps=20)),
    (dict(original_inference_steps=10), dict(num_inference_steps=10)),  # every distillation timestep
    # custom timesteps, one off the distillation schedule (diffusers warns); with strength < 1 diffusers counts the
    # steps before the cut, so its last step still adds noise: mirrored
    ({}, dict(timesteps=[999, 759, 499, 260])),
    ({}, dict(timesteps=[999, 759, 499, 259, 19], strength=0.5)),
    (dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True, timestep_scaling=4.0,
          prediction_type="v_prediction"), dict(num_inference_steps=4)),  # zero SNR: alpha_prod_t at t=999 is 0
    (dict(beta_schedule="linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
          set_alpha_to_one=False, steps_offset=1), dict(num_inference_steps=6)),
])
def test_lcm_schedules_match_diffusers(cfg, schedule):
    # a custom schedule off the distillation timesteps is warned about (diffusers logs it)
    with pytest.warns(UserWarning, match="not on the distillation schedule") if "timesteps" in schedule else \
            contextlib.nullcontext():
        assert _loop(S.LCMScheduler(**cfg), diffusers.LCMScheduler(**cfg), schedule=schedule) <= 1


def test_lcm_in_half_precision_and_mixed_dtypes():
    from _numerics import assert_2x_rule

    # fp16 as in an fp16 pipeline: we compute in fp32 and round once, diffusers in fp16
    assert _loop(S.LCMScheduler(), diffusers.LCMScheduler(), dtype=torch.float16) <= 2e-2
    # an fp32 sample with fp16 model outputs: fp32 results as diffusers', which rounds sqrt(1 - a) * eps to fp16
    # first (0-d fp32 times fp16 is fp16): by the 2x rule against diffusers' own arithmetic in float64
    ours, theirs, exact = S.LCMScheduler(), diffusers.LCMScheduler(), diffusers.LCMScheduler()
    exact.alphas_cumprod = exact.alphas_cumprod.double()
    for sched in (ours, theirs, exact):
        sched.set_timesteps(4)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE).half()
    for t in ours.timesteps:
        a = theirs.step(m, t, x, generator=torch.Generator().manual_seed(0))
        b = ours.step(m, t, x, generator=torch.Generator().manual_seed(0))
        ref = exact.step(m.double(), int(t), x.double(), generator=torch.Generator().manual_seed(0))  # (int: fp64 c)
        assert b.prev_sample.dtype == a.prev_sample.dtype == b.denoised.dtype == torch.float32
        for field in ("prev_sample", "denoised"):
            assert_2x_rule(getattr(b, field), getattr(ref, field), getattr(a, field), floor=1e-5, what=field)
        x = a.prev_sample


def test_lcm_config_and_errors():
    sched = S.LCMScheduler.from_config(diffusers.PNDMScheduler(beta_schedule="scaled_linear").config)  # LCM-LoRA's way
    assert sched.config.original_inference_steps == 50 and sched.config.timestep_scaling == 10.0
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="call set_timesteps first"):
        sched.step(x, 999, x)
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 50\] \(original_inference_steps"):
        sched.set_timesteps(51)
    with pytest.raises(ValueError, match="leaves 5 timesteps, fewer than num_inference_steps = 8"):
        sched.set_timesteps(8, strength=0.1)
    with pytest.raises(ValueError, match="exactly one of num_inference_steps or timesteps"):
        sched.set_timesteps(4, timesteps=[999, 499])
    with pytest.raises(ValueError, match="descending"):
        sched.set_timesteps(timesteps=[499, 999])
    with pytest.raises(ValueError, match=r"lie in \[0, 1000\)"):
        sched.set_timesteps(timesteps=[1000, 499])
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        sched.set_timesteps(4, strength=1.5)
    with pytest.raises(ValueError, match="original_inference_steps must be an int in"):
        sched.set_timesteps(4, original_inference_steps=2000)
    with pytest.raises(TypeError, match="num_inference_steps must be an int"):
        sched.set_timesteps(4.0)
    with pytest.raises(ValueError, match="prediction_type must be epsilon, v_prediction or sample"):
        S.LCMScheduler(prediction_type="flow")
    with pytest.raises(ValueError, match="beta_schedule must be"):
        S.LCMScheduler(beta_schedule="sigmoid")
    zero_snr = S.LCMScheduler(rescale_betas_zero_snr=True)  # epsilon at alpha_prod_t = 0: NaN in diffusers' image
    zero_snr.set_timesteps(4)
    with pytest.raises(ValueError, match="alpha_prod_t = 0 .* use v_prediction"):
        zero_snr.step(x, zero_snr.timesteps[0], x)
    sched.set_timesteps(4)  # 999, 759, 499, 259
    sched.step(x, sched.timesteps[0], x)  # finds the step index
    with pytest.raises(ValueError, match="timestep 499 is not this step's timestep 759"):
        sched.step(x, 499, x)
    sched.set_timesteps(2)
    for t in sched.timesteps:
        out = sched.step(x, t, x)
    torch.testing.assert_close(out.prev_sample, out.denoised, rtol=0, atol=0)  # the last step adds no noise
    with pytest.raises(ValueError, match="step called 3 times for a 2-step schedule"):
        sched.step(x, 999, x)


# accelerate's fused step for diffusers' LCMScheduler: every step one linear_step pass, nothing left to diffusers
@pytest.mark.parametrize("cfg, schedule", [
    ({}, dict(num_inference_steps=4)),
    (dict(prediction_type="v_prediction", clip_sample=True), dict(num_inference_steps=6)),
    (dict(prediction_type="sample"), dict(num_inference_steps=4, strength=0.5)),
    ({}, dict(timesteps=[999, 759, 499, 259, 19], strength=0.5)),  # diffusers' noise at its last step, mirrored
])
def test_fused_lcm_step_matches_diffusers(monkeypatch, cfg, schedule):
    calls = count_op_calls(monkeypatch, "linear_step")
    assert _loop(fused("LCMScheduler", **cfg), diffusers.LCMScheduler(**cfg), schedule=schedule) <= 1
    ours = diffusers.LCMScheduler(**cfg)
    ours.set_timesteps(**schedule)
    assert len(calls) == len(ours.timesteps)


def test_fused_lcm_step_follows_a_new_schedule_and_leaves_odd_calls_to_diffusers(monkeypatch):
    ours, theirs = fused("LCMScheduler"), diffusers.LCMScheduler()
    assert _loop(ours, theirs, steps=4) <= 1
    assert _loop(ours, theirs, steps=2) <= 1  # the cached host schedule is made again
    calls = count_op_calls(monkeypatch, "linear_step")
    x = torch.randn(SHAPE)
    for sched in (ours, theirs):
        sched.set_timesteps(4)
        sched.set_begin_index(0)
    # a host timestep that is not the schedule's: diffusers' own step, which computes with the timestep given
    a = theirs.step(x, 500, x, generator=torch.Generator().manual_seed(2))
    b = ours.step(x, 500, x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=0, atol=0)
    assert calls == []


def test_a_latent_consistency_model_pipeline_under_accelerate(monkeypatch):
    """diffusers' LatentConsistencyModelPipeline (a UNet with LCM's guidance embedding, time_cond_proj_dim, and no
    CFG batch): accelerated, every step is the fused LCM step, the image stays within the fp32 tolerance, and restore
    gives it back exactly."""
    import numpy as np
    from transformers import CLIPTextConfig, CLIPTextModel

    import _tiny_diffusers
    import diffusion_fast
    from diffusion_fast import tiny
    from diffusion_fast.numerics import PIPELINE_FP32_MAX_ABS

    torch.manual_seed(0)
    pipe = diffusers.LatentConsistencyModelPipeline(
        vae=diffusers.AutoencoderKL(**tiny.vae_config()),
        text_encoder=CLIPTextModel(CLIPTextConfig(**tiny.text_encoder_config("sd1"))),
        tokenizer=_tiny_diffusers.tokenizer(),
        unet=diffusers.UNet2DConditionModel(**dict(tiny.unet_config("sd1"), time_cond_proj_dim=32)),
        scheduler=diffusers.LCMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe("a red cube", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    before = images()
    diffusion_fast.accelerate(pipe)
    calls = count_op_calls(monkeypatch, "linear_step")
    assert pipe._diffusion_fast_report["scheduler"] == 1
    assert np.abs(images() - before).max() <= PIPELINE_FP32_MAX_ABS and len(calls) == 4
    diffusion_fast.restore(pipe)
    assert np.array_equal(images(), before)
