"""TCDScheduler (TCD-LoRA's sampler): ours and accelerate's fused step for diffusers' own, against diffusers step by
step, over eta, prediction types and LCM's schedules (strength, original_inference_steps, custom timesteps); its
errors."""
import itertools

import pytest
import torch

import diffusers
import diffusion_fast.schedulers as S
from _scheduler_parity import SHAPE, _loop, count_op_calls, fused


# Every prediction type; eta 0 (deterministic: the re-noised prediction is the sample), 0.3 (TCD's default) and 1
# (s = 0: fully stochastic); 1 step (the only step is the last: no noise), 4 and 8. The noise from equal generators.
@pytest.mark.parametrize("prediction_type, eta, steps", list(itertools.product(
    ["epsilon", "v_prediction", "sample"], [0.0, 0.3, 1.0], [1, 4, 8])))
def test_tcd_matches_diffusers(prediction_type, eta, steps):
    cfg = dict(prediction_type=prediction_type)
    assert _loop(S.TCDScheduler(**cfg), diffusers.TCDScheduler(**cfg), steps=steps, eta=eta) <= 1


@pytest.mark.parametrize("cfg, schedule", [
    ({}, dict(num_inference_steps=4, strength=0.6)),  # img2img: the lower part of the distillation schedule
    # given here, original_inference_steps makes diffusers' TCD space the steps over every training timestep
    ({}, dict(num_inference_steps=3, original_inference_steps=20)),
    # custom timesteps; with strength < 1 diffusers counts the steps before the cut, so its last step adds noise
    ({}, dict(timesteps=[999, 759, 499, 259, 19], strength=0.5)),
    (dict(beta_schedule="linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
          set_alpha_to_one=False), dict(num_inference_steps=6)),  # zero SNR: alpha_prod_t at t=999 is 0
])
def test_tcd_schedules_match_diffusers(cfg, schedule):
    assert _loop(S.TCDScheduler(**cfg), diffusers.TCDScheduler(**cfg), schedule=schedule, eta=0.3) <= 1


def test_tcd_in_half_precision_and_the_floor_of_s():
    assert _loop(S.TCDScheduler(), diffusers.TCDScheduler(), steps=4, dtype=torch.float16, eta=0.3) <= 2e-2
    # s = floor((1 - eta) * t_prev) in fp32 arithmetic, as diffusers: with eta = 0.3 and t_prev = 90 the product
    # rounds to 63.0 there (s = 63), where float64 gives 62.99999999999999 (s = 62); 16 such t_prev below 1000
    schedule = dict(timesteps=[999, 499, 90, 9])
    assert _loop(S.TCDScheduler(), diffusers.TCDScheduler(), schedule=schedule, eta=0.3) <= 1
    # the last step draws no noise (as diffusers): the generator is left as it was
    sched, generator = S.TCDScheduler(), torch.Generator().manual_seed(5)
    sched.set_timesteps(1)
    sched.step(torch.randn(SHAPE), sched.timesteps[0], torch.randn(SHAPE), eta=0.3, generator=generator)
    assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=torch.Generator().manual_seed(5)))


def test_tcd_config_and_errors(tmp_path):
    diffusers.TCDScheduler(beta_schedule="linear").save_config(tmp_path)
    sched = S.load_scheduler(tmp_path)  # by _class_name, no warning
    assert type(sched) is S.TCDScheduler and sched.config.beta_schedule == "linear"
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="call set_timesteps first"):
        sched.step(x, 999, x)
    sched.set_timesteps(2)
    for eta in (-0.1, 1.5, True, "0.3"):
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):  # diffusers asserts
            sched.step(x, sched.timesteps[0], x, eta=eta)
    out = sched.step(x, sched.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert out.pred_noised_sample.shape == x.shape and out.prev_sample.shape == x.shape
    with pytest.raises(ValueError, match="timestep 500 is not this step's timestep 499"):
        sched.step(x, 500, x)
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 50\]"):
        sched.set_timesteps(60)


# accelerate's fused step for diffusers' own: one linear_step pass a step
@pytest.mark.parametrize("cfg, eta", [({}, 0.3), (dict(prediction_type="v_prediction"), 1.0),
                                      (dict(prediction_type="sample"), 0.0)])
def test_fused_tcd_step_matches_diffusers(monkeypatch, cfg, eta):
    calls = count_op_calls(monkeypatch, "linear_step")
    assert _loop(fused("TCDScheduler", **cfg), diffusers.TCDScheduler(**cfg), steps=4, eta=eta) <= 1
    assert len(calls) == 4


def test_fused_tcd_leaves_what_diffusers_rejects_to_diffusers():
    sched = fused("TCDScheduler")
    sched.set_timesteps(2)
    x = torch.randn(SHAPE)
    with pytest.raises(AssertionError, match="gamma must be less than or equal to 1.0"):  # diffusers' own assert
        sched.step(x, sched.timesteps[0], x, eta=1.5)
