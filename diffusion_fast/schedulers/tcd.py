"""TCD (Zheng et al. 2024, trajectory consistency distillation) with diffusers' TCDScheduler semantics: the sampler
of TCD-LoRA, a few steps with a stochasticity ``eta`` (the paper's gamma).

A step predicts x0 and the noise from the model output, re-noises them to the earlier timestep s = floor((1 - eta)
* t_prev) (``pred_noised_sample``) and, with eta > 0 and except at the last step, moves that forward to t_prev with
fresh noise: ``prev = sqrt(a_prev / a_s) * pred_noised + sqrt(1 - a_prev / a_s) * noise``. All of it is linear in
the sample, the model output and the noise, so a step is one fused pass (``ops.linear_step``, whose second output is
``pred_noised_sample``), coefficients in float64 on the host. As in diffusers' step, ``clip_sample``,
``thresholding`` and ``timestep_scaling`` do nothing. The schedule is LCM's (``lcm.lcm_timesteps``).

``tcd_update`` runs on the state diffusers keeps: our scheduler and ``accelerate``'s fused step for diffusers' own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from .common import check_step_inputs, randn_tensor
from .lcm import LCMScheduler, lcm_timesteps, x0_weights


@dataclass
class TCDSchedulerOutput:
    prev_sample: torch.Tensor
    pred_noised_sample: torch.Tensor = None

    def __iter__(self):  # allows `prev, pred_noised = scheduler.step(...)` like a tuple
        return iter((self.prev_sample, self.pred_noised_sample))


def check_eta(eta):
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (TCD's stochasticity, gamma in the paper), got {eta!r}")
    return float(eta)


def _noise_weights(alpha_t: float, prediction_type: str):
    """(c, d) with the predicted noise = c * sample + d * model_output, as diffusers' TCD computes it."""
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "v_prediction":
        return (1 - alpha_t) ** 0.5, alpha_t**0.5
    return 1 / (1 - alpha_t) ** 0.5, -(alpha_t / (1 - alpha_t)) ** 0.5  # sample


def tcd_update(self, model_output, sample, index: int, schedule, alphas, eta, generator=None):
    """The ``index``-th TCD step of ``schedule`` (timesteps as host ints) with ``alphas`` (alphas_cumprod as host
    floats) on ``self`` (diffusers' TCD fields: ``config``, ``num_inference_steps``). Returns (prev_sample,
    pred_noised_sample) in the promoted dtype of the sample and the model output; the caller advances the index."""
    check_step_inputs(model_output, sample)
    timestep = schedule[index]
    prev_timestep = schedule[index + 1] if index + 1 < len(schedule) else 0
    # s in fp32 arithmetic, as diffusers' torch.floor((1 - eta) * prev_timestep): 0.7 * 90 is 63 there, 62.99... in
    # float64
    s = int(torch.floor((1 - eta) * torch.tensor(prev_timestep)))
    alpha_t, alpha_prev, alpha_s = alphas[timestep], alphas[prev_timestep], alphas[s]
    a, b = x0_weights(alpha_t, self.config.prediction_type)
    c, d = _noise_weights(alpha_t, self.config.prediction_type)
    cx, cm = alpha_s**0.5 * a + (1 - alpha_s) ** 0.5 * c, alpha_s**0.5 * b + (1 - alpha_s) ** 0.5 * d
    dtype = torch.promote_types(model_output.dtype, sample.dtype)
    noise, p0, pe = None, 1.0, 0.0
    if eta > 0 and index != self.num_inference_steps - 1:  # as diffusers: no draw at the last step
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=dtype)
        p0, pe = (alpha_prev / alpha_s) ** 0.5, (1 - alpha_prev / alpha_s) ** 0.5
    return ops.linear_step(model_output.to(dtype), sample, noise, cx=cx, cm=cm, p0=p0, px=0.0, pe=pe)


class TCDScheduler(LCMScheduler):
    """LCM's fields and schedule; TCD's step."""

    def set_timesteps(self, num_inference_steps=None, device=None, original_inference_steps=None, timesteps=None,
                      strength=1.0):
        """LCM's schedule; given ``original_inference_steps`` here, diffusers' TCD spaces the steps over every
        training timestep instead of the distillation schedule (mirrored)."""
        schedule, self.num_inference_steps = lcm_timesteps(
            self.config, num_inference_steps, original_inference_steps, timesteps, strength, name="TCDScheduler",
            every_timestep=original_inference_steps is not None)
        self.custom_timesteps = timesteps is not None
        self._host_timesteps = schedule.tolist()
        self.timesteps = torch.from_numpy(schedule).to(device=device, dtype=torch.long)
        self._step_index = self._begin_index = None

    def step(self, model_output, timestep, sample, eta=0.3, generator=None, return_dict=True):
        eta = check_eta(eta)
        i = self._this_step(timestep)
        prev, noised = tcd_update(self, model_output, sample, i, self._host_timesteps, self._host_alphas, eta,
                                  generator)
        self._step_index += 1
        return TCDSchedulerOutput(prev, noised) if return_dict else (prev, noised)
