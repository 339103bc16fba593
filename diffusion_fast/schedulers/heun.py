"""Heun's second-order sampler (Karras et al. 2022, Algorithm 1 without churn) with diffusers' HeunDiscreteScheduler
semantics.

The schedule is Euler's with every sigma but the first and the last repeated, so a step from sigma to sigma_next
takes two model calls: an Euler step (the first order: its derivative, dt and sample kept), then the correction at
sigma_next that averages the two derivatives and steps again from the kept sample. The last step, onto sigma = 0,
is the Euler step alone. Both calls are linear in the sample, the model output and (for the second) one combination
of the kept tensors, so each is one fused pass (``ops.linear_step``), coefficients worked out on the host in
float64 from the sigmas as host floats. With clipping, x0 is made first (a few small ops).

``heun_update`` is one call on the state diffusers keeps (``step_index``, ``prev_derivative``, ``dt``, ``sample``):
our scheduler runs it, and so does ``accelerate``'s fused step for diffusers' own HeunDiscreteScheduler. The
arithmetic's dtype is diffusers': the promoted dtype of the sample and the model output.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from .._config import FrozenConfig
from .common import SchedulerOutput, check_same_run, check_step_inputs
from .euler import EulerDiscreteScheduler

# Euler's schedule options, at the values diffusers' Heun implies (it has no such fields)
FIXED_SCHEDULE = dict(interpolation_type="linear", sigma_min=None, sigma_max=None, timestep_type="discrete",
                      final_sigmas_type="zero", rescale_betas_zero_snr=False)


def derivative_weights(sigma: float, prediction_type: str):
    """(a, b, dx, dm): x0 = a * sample + b * model_output at sigma (diffusers' Heun: the input is not scaled), and the
    derivative (sample - x0) / sigma = dx * sample + dm * model_output, folded in float64 so that no weight is large:
    for epsilon the derivative is the model output itself. (For "sample", and with clipping, the caller passes
    sample - x0 as the model output: weights (1, -1, 0, 1 / sigma), so that difference is taken before any scaling,
    as diffusers takes it.)"""
    if prediction_type == "epsilon":
        return 1.0, -sigma, 0.0, 1.0
    if prediction_type == "v_prediction":
        q = sigma * sigma + 1
        return 1 / q, -sigma / q**0.5, sigma / q, 1 / q**0.5
    return 1.0, -1.0, 0.0, 1 / sigma


def heun_update(self, model_output, sample, values):
    """One Heun call on ``self`` (a scheduler with diffusers' Heun state and ``config``) at its step index, with
    ``values`` the repeated sigmas as host floats. Updates the state as diffusers' ``step`` does and returns
    (prev_sample, pred_original_sample); the caller advances the step index."""
    check_step_inputs(model_output, sample)
    first = self.dt is None
    if not first:
        check_same_run(sample, [self.sample])
    i = self.step_index
    sigma, sigma_next = (values[i], values[i + 1]) if first else (values[i - 1], values[i])
    at = sigma if first else sigma_next  # where this call's x0 is predicted
    prediction = self.config.prediction_type
    dtype = torch.promote_types(model_output.dtype, sample.dtype)
    model_output = model_output.to(dtype)
    if self.config.clip_sample or prediction == "sample":  # x0 first, then the pass on sample - x0
        x0 = model_output
        if prediction != "sample":
            a, b, *_ = derivative_weights(at, prediction)
            x0 = a * sample.float() + b * model_output.float()
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        model_output, prediction = (sample - x0).to(dtype), "sample"
    a, b, dx, dm = derivative_weights(at, prediction)
    if first:  # Euler: prev = x + d * dt
        dt = sigma_next - sigma
        prev, x0 = ops.linear_step(model_output, sample, None, cx=a, cm=b, p0=0.0, px=1 + dt * dx, pm=dt * dm)
        self.prev_derivative = torch.add(model_output * dm, sample, alpha=dx) if dx else model_output * dm
        self.dt, self.sample = dt, sample
    else:  # prev = kept sample + (d1 + d2) / 2 * dt
        half = self.dt / 2
        kept = torch.add(self.sample, self.prev_derivative, alpha=half)
        prev, x0 = ops.linear_step(model_output, sample, kept, cx=a, cm=b, p0=0.0, px=half * dx, pm=half * dm,
                                   pe=1.0)
        self.prev_derivative = self.dt = self.sample = None
    return prev, x0


class HeunDiscreteScheduler(EulerDiscreteScheduler):
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", use_karras_sigmas=False, clip_sample=False, clip_sample_range=1.0,
        timestep_spacing="linspace", steps_offset=0,
    )
    order = 2

    def __init__(self, **kwargs):
        schedule = kwargs.get("beta_schedule", "linear")
        if schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(
                f"beta_schedule must be linear, scaled_linear or squaredcos_cap_v2 (Heun), got {schedule!r}")
        super().__init__(**kwargs)
        self._reset_state()

    def _schedule_config(self):
        return FrozenConfig(dict(self.config, **FIXED_SCHEDULE))

    def _reset_state(self):
        self.prev_derivative = self.dt = self.sample = None

    @property
    def state_in_first_order(self):
        return self.dt is None

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """Euler's schedule (``num_inference_steps`` per the config, or custom ``timesteps``), every sigma and
        timestep but the first (and the final sigma) repeated, as diffusers'."""
        super().set_timesteps(num_inference_steps, device, timesteps=timesteps)

    def _finish_schedule(self, sigmas, timesteps, n, device):
        sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        timesteps = np.asarray(timesteps)
        super()._finish_schedule(sigmas, np.concatenate([timesteps[:1], timesteps[1:].repeat(2)]), n, device)
        self._sigma_values = self.sigmas.double().tolist()  # step's coefficients: host floats, no device read
        self._reset_state()

    def step(self, model_output, timestep, sample, return_dict=True):
        self._checked_step_index(timestep)  # (not Euler's _next_index: diffusers' Heun takes integer timesteps too)
        prev, x0 = heun_update(self, model_output, sample, self._sigma_values)
        self._step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)
