"""DDPM (Ho et al. 2020) ancestral sampling with diffusers' semantics, its arithmetic in one fused op per step.

The previous timestep is the next entry of ``timesteps`` (found on the device, without a host read), the noise scale
follows ``variance_type`` (fixed_small, fixed_small_log, fixed_large, fixed_large_log), and no noise is added at the
final step.

One deliberate difference: diffusers' ``fixed_large_log`` computes ``log(beta_t) ** 0.5``, the square root of a
negative number, so every noisy step is NaN there. We use what the name means (GLIDE's max_log: the log-variance
is log(beta_t), so the noise scale is exp(0.5 * log(beta_t)) = sqrt(beta_t)), i.e. the numbers of ``fixed_large``.

The learned variance types need a model that predicts its variance and are rejected with a ValueError.

No noise is added at t = 0. An int or CPU-tensor timestep is read on the host to skip drawing it, as diffusers does;
a CUDA timestep is never read (that would sync): the noise is drawn and scaled by zero on the device, so on the final
step the generator advances once more than diffusers' does (the images are the same).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..reference import pred_original_and_epsilon
from .base import SchedulerBase
from .common import (
    SchedulerOutput,
    as_timestep_tensor,
    check_step_inputs,
    make_betas,
    randn_tensor,
    spaced_timesteps,
    threshold_sample,
)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


class DDPMScheduler(SchedulerBase):
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        variance_type="fixed_small", clip_sample=True, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
        steps_offset=0, rescale_betas_zero_snr=False,
    )
    init_noise_sigma = 1.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.config.variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"variance_type={self.config.variance_type!r} is not supported (one of {VARIANCE_TYPES}; the learned "
                "variance types need a model that predicts its variance)")
        if self.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type must be epsilon, v_prediction or sample, got {self.config.prediction_type!r}")
        self.betas = make_betas(self.config)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._ext = torch.cat([self.timesteps, torch.tensor([-1])])

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """The inference schedule: ``num_inference_steps`` spaced per timestep_spacing, or custom descending
        integer ``timesteps`` (diffusers' custom_timesteps)."""
        if timesteps is not None:
            timesteps = self._custom_schedule("timesteps", timesteps, num_inference_steps,
                                              below=self.config.num_train_timesteps).astype(np.int64)
            self.num_inference_steps = len(timesteps)
        else:
            self._check_steps(num_inference_steps)
            self.num_inference_steps = int(num_inference_steps)
            timesteps = spaced_timesteps(self.config, self.num_inference_steps)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._ext = torch.cat([torch.from_numpy(timesteps), torch.tensor([-1])])
        self._reset_tables(device, ("alphas_cumprod", "_ext"))

    def scale_model_input(self, sample, timestep=None):
        return sample

    def previous_timestep(self, t):
        """The timestep after ``t`` in the schedule (-1 after the last), looked up on t's device."""
        if self.num_inference_steps is None:
            return t - 1
        if t.device.type == "cpu":  # a host timestep may be checked freely (diffusers fails with an IndexError)
            missing = [int(v) for v in t.reshape(-1) if not bool((self._ext[:-1] == v).any())]
            if missing:
                raise ValueError(f"timestep {missing} is not in this scheduler's timesteps {self._ext[:-1].tolist()}")
        ext = self._table("_ext", t.device)
        index = (ext[:-1].unsqueeze(0) == t.unsqueeze(1)).int().argmax(dim=1)
        return ext.index_select(0, index + 1)

    def _coefficients(self, timestep, device):
        t = as_timestep_tensor(timestep, device)
        prev_t = self.previous_timestep(t)
        table = self._table("alphas_cumprod", device)
        alpha_t = table.index_select(0, t)
        alpha_prev = torch.where(prev_t >= 0, table.index_select(0, prev_t.clamp(min=0)), torch.ones_like(alpha_t))
        current_beta = 1 - alpha_t / alpha_prev
        if self.config.variance_type in ("fixed_large", "fixed_large_log"):  # see the module docstring for _log
            std = current_beta**0.5
        else:  # fixed_small, and fixed_small_log (exp(0.5 * log var) is the same std)
            std = ((1 - alpha_prev) / (1 - alpha_t) * current_beta).clamp(min=1e-20) ** 0.5
        std = torch.where(t > 0, std, torch.zeros_like(std))
        return t, alpha_t, alpha_prev, std

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        check_step_inputs(model_output, sample)
        t, alpha_t, alpha_prev, std = self._coefficients(timestep, sample.device)
        # No noise at the last step. A CPU/int timestep is read freely; a CUDA one is not read (that would sync):
        # the noise is then drawn and scaled by 0, so the generator advances once more than diffusers' there.
        on_host = not torch.is_tensor(timestep) or timestep.device.type == "cpu"
        draw = bool((as_timestep_tensor(timestep, "cpu") > 0).any()) if on_host else True
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype) if draw else None
        clip = self.config.clip_sample_range if self.config.clip_sample else None
        if self.config.thresholding:
            prev, x0 = self._thresholded(model_output, sample, alpha_t, alpha_prev, std, noise)
        else:
            prev, x0 = ops.ddpm_step(model_output, sample, alpha_t, alpha_prev, std=std if draw else 0.0,
                                     variance_noise=noise, prediction_type=self.config.prediction_type,
                                     clip_sample_range=clip)
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)

    def _thresholded(self, model_output, sample, alpha_t, alpha_prev, std, noise):
        shape = (-1,) + (1,) * (sample.dim() - 1)
        a_t, a_prev = alpha_t.view(shape).to(sample.dtype), alpha_prev.view(shape).to(sample.dtype)
        x0, _ = pred_original_and_epsilon(model_output, sample, a_t, self.config.prediction_type)
        x0 = threshold_sample(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        current_alpha = a_t / a_prev
        x0_coeff = a_prev**0.5 * (1 - current_alpha) / (1 - a_t)
        sample_coeff = current_alpha**0.5 * (1 - a_prev) / (1 - a_t)
        prev = x0_coeff * x0 + sample_coeff * sample
        if noise is not None:
            prev = prev + std.view(shape).to(sample.dtype) * noise
        return prev, x0
