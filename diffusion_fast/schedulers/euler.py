"""Euler (Karras et al. 2022, Algorithm 2) with diffusers' EulerDiscreteScheduler semantics.

Like diffusers, the step index is Python state. Unlike diffusers (whose churn test ``s_tmin <= sigma <= s_tmax``
reads a device sigma every step), the churn decision reads a CPU copy of the sigmas and the arithmetic takes its
sigmas from a device copy sliced by the step index: ``step`` never waits on the device. The one host read left is
diffusers' own: the first step finds its index by looking the timestep up in the schedule, unless the caller set
``set_begin_index`` (as diffusers' pipelines do). The arithmetic runs as one fused op, in fp32 as diffusers does.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from .base import SigmaScheduleBase
from .common import (
    SchedulerOutput,
    check_step_inputs,
    karras_sigmas,
    make_betas,
    randn_tensor,
    sigma_timesteps,
    timesteps_for_sigmas,
)


class EulerDiscreteScheduler(SigmaScheduleBase):
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False, sigma_min=None,
        sigma_max=None, timestep_spacing="linspace", timestep_type="discrete", steps_offset=0,
        rescale_betas_zero_snr=False, final_sigmas_type="zero",
    )
    unsupported = dict(use_exponential_sigmas=False, use_beta_sigmas=False)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self._schedule_config()
        for field, allowed in (("interpolation_type", ("linear", "log_linear")),
                               ("final_sigmas_type", ("zero", "sigma_min")),
                               ("timestep_type", ("discrete", "continuous")),
                               ("prediction_type", ("epsilon", "v_prediction", "sample"))):
            if c[field] not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {c[field]!r}")
        self.betas = make_betas(c)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        if c.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # so the last sigma is finite, as diffusers does
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)
        n = c.num_train_timesteps
        timesteps = torch.from_numpy(np.linspace(0, n - 1, n)[::-1].copy()).float()
        self.timesteps = torch.tensor([0.25 * s.log() for s in sigmas]) if self._continuous_v() else timesteps
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._step_index = None
        self._begin_index = None

    def _schedule_config(self):
        """The config the schedule is built from (the ancestral subclass adds the options it fixes)."""
        return self.config

    def _continuous_v(self):
        c = self._schedule_config()
        return c.timestep_type == "continuous" and c.prediction_type == "v_prediction"

    @property
    def init_noise_sigma(self):
        max_sigma = self.sigmas.max()
        return max_sigma if self.config.timestep_spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
        """The inference schedule: ``num_inference_steps`` per the config, or custom ``timesteps`` (then sigmas are
        interpolated) or custom ``sigmas`` (n + 1 values, the last the final sigma; timesteps are interpolated)."""
        c = self._schedule_config()
        base = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        log_sigmas = np.log(base)
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass timesteps or sigmas, not both")
        if timesteps is not None and (c.use_karras_sigmas or self._continuous_v()):
            raise ValueError("custom timesteps cannot be used with use_karras_sigmas or continuous v_prediction")
        if sigmas is not None:
            sigmas = self._custom_schedule("sigmas", sigmas, num_inference_steps, descending=False)
            if len(sigmas) < 2:
                raise ValueError("sigmas must have n + 1 values (the last is the final sigma), got 1")
            sigmas = sigmas.astype(np.float32)
            timesteps = timesteps_for_sigmas(sigmas[:-1], log_sigmas, rounded=False)
            self._finish_schedule(sigmas, timesteps, len(sigmas) - 1, device)
            return
        if timesteps is not None:
            timesteps = self._custom_schedule("timesteps", timesteps, num_inference_steps, descending=False,
                                              below=c.num_train_timesteps).astype(np.float32)
            n = len(timesteps)
        else:
            self._check_steps(num_inference_steps)
            n = int(num_inference_steps)
            timesteps = sigma_timesteps(c, n)
        if c.interpolation_type == "linear":
            sigmas = np.interp(timesteps, np.arange(0, len(base)), base)
        else:
            sigmas = torch.linspace(np.log(base[-1]), np.log(base[0]), n + 1).exp().numpy()
        if c.use_karras_sigmas:
            sigma_min = c.sigma_min if c.sigma_min is not None else float(sigmas[-1])
            sigma_max = c.sigma_max if c.sigma_max is not None else float(sigmas[0])
            sigmas = karras_sigmas(sigma_min, sigma_max, n)
            timesteps = timesteps_for_sigmas(sigmas, log_sigmas, rounded=False)
        a0 = self.alphas_cumprod[0]
        last = ((1 - a0) / a0) ** 0.5 if c.final_sigmas_type == "sigma_min" else 0
        self._finish_schedule(np.concatenate([sigmas, [float(last)]]).astype(np.float32), timesteps, n, device)

    def _finish_schedule(self, sigmas, timesteps, n, device):
        self.num_inference_steps = n
        sigmas = torch.from_numpy(sigmas)
        if self._continuous_v():
            self.timesteps = torch.tensor([0.25 * s.log() for s in sigmas[:-1]]).to(device)
        else:
            self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device)
        self.sigmas = sigmas  # CPU; a device copy is made per device (no host read when stepping)
        self._reset_tables(device, ("sigmas",))
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample, timestep):
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        check_step_inputs(model_output, sample)
        i = self._next_index(timestep)
        sigma = float(self.sigmas[i])
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        noise = None
        if gamma > 0:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
        sigmas = self._table("sigmas", sample.device)  # sliced, not read: no host sync
        # As diffusers: the sample is upcast to fp32, x0 stays fp32, prev_sample takes model_output's dtype.
        prev, x0 = ops.euler_step(model_output.float(), sample.float(), sigmas[i:i + 1], sigmas[i + 1:i + 2],
                                  gamma=gamma, s_noise=s_noise, noise=noise,
                                  prediction_type=self.config.prediction_type)
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)

    def _next_index(self, timestep):
        """This step's index into ``sigmas``, checked: a timestep from the schedule (a float, not an index, as
        diffusers requires) and a step left in the schedule."""
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError(f"{type(self).__name__}.step takes one of scheduler.timesteps (floats), not an index")
        return self._checked_step_index(timestep, need_schedule=False)

    def add_noise(self, original_samples, noise, timesteps):
        """x + sigma * noise, sigma per sample (see _step_indices)."""
        sigma = self.sigmas[self._step_indices(timesteps)].to(original_samples.device, original_samples.dtype)
        return original_samples + noise * sigma.view(-1, *([1] * (original_samples.dim() - 1)))

    def get_velocity(self, sample, noise, timesteps):
        """diffusers' Euler get_velocity: alphas_cumprod indexed by the timesteps' step indices (its quirk)."""
        if isinstance(timesteps, int) or (torch.is_tensor(timesteps) and not timesteps.is_floating_point()):
            raise ValueError("EulerDiscreteScheduler.get_velocity takes scheduler.timesteps (floats), not indices")
        ts = timesteps.reshape(-1) if torch.is_tensor(timesteps) else torch.tensor([timesteps], dtype=torch.float32)
        a = self.alphas_cumprod[[self.index_for_timestep(t) for t in ts]].to(sample.device, sample.dtype)
        a = a.view(-1, *([1] * (sample.dim() - 1)))
        return a**0.5 * noise - (1 - a) ** 0.5 * sample

