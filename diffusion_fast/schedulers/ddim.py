"""DDIM (Song et al. 2020) with diffusers' exact semantics, its arithmetic in one fused op per step.

Reproduces diffusers' DDIMScheduler, quirks included: ``prev_t = t - N // n`` for every timestep spacing; at
``prev_t < 0`` the previous alpha is 1 (``set_alpha_to_one``) or ``alphas_cumprod[0]``; clipping clamps x0 only.
Unlike diffusers, the coefficient tables live on the sample's device and are indexed with the (device) timestep, so
``step`` never waits on the host and can be captured in a CUDA graph. ``step_cfg`` fuses the classifier-free guidance
combine into the same launch.
"""
from __future__ import annotations

import torch

from .. import ops
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
from ..reference import pred_original_and_epsilon


class DDIMScheduler(SchedulerBase):
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
        rescale_betas_zero_snr=False,
    )
    init_noise_sigma = 1.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        if c.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {c.prediction_type!r}")
        if c.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing must be leading, trailing or linspace, got {c.timestep_spacing!r}")
        self.betas = make_betas(c)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0].clone()
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps, device=None):
        self._check_steps(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.from_numpy(spaced_timesteps(self.config, self.num_inference_steps)).to(device)
        self._reset_tables(device, ("alphas_cumprod", "final_alpha_cumprod"))

    def scale_model_input(self, sample, timestep=None):
        return sample

    def alphas_at(self, timestep, device=None):
        """(alpha_prod_t, alpha_prod_t_prev) as 1-d tensors on ``device`` (default: the timestep's device, else the
        device given to set_timesteps), looked up without reading the timestep on the host."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step")
        if device is None:
            device = timestep.device if torch.is_tensor(timestep) else self.timesteps.device
        t = as_timestep_tensor(timestep, device)
        table = self._table("alphas_cumprod", device)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_t = table.index_select(0, t)
        alpha_prev = torch.where(
            prev_t >= 0, table.index_select(0, prev_t.clamp(min=0)), self._table("final_alpha_cumprod", device)
        )
        return alpha_t, alpha_prev

    def _noise(self, eta, model_output, generator, variance_noise):
        """The variance noise for eta > 0: given, or drawn as diffusers draws it (same generator, device, dtype)."""
        if eta <= 0:
            return None  # diffusers ignores generator and variance_noise at eta = 0, and so do we
        if generator is not None and variance_noise is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Use one of them.")
        if variance_noise is None:
            variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                          dtype=model_output.dtype)
        return variance_noise

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        check_step_inputs(model_output, sample)
        alpha_t, alpha_prev = self.alphas_at(timestep, sample.device)
        noise = self._noise(eta, model_output, generator, variance_noise)
        if self.config.thresholding:
            prev, x0 = self._thresholded_step(model_output, sample, alpha_t, alpha_prev, eta, noise,
                                              use_clipped_model_output)
        else:
            prev, x0 = ops.ddim_step(
                model_output, sample, alpha_t, alpha_prev, eta=eta, variance_noise=noise,
                prediction_type=self.config.prediction_type,
                clip_sample_range=self.config.clip_sample_range if self.config.clip_sample else None,
                use_clipped_model_output=use_clipped_model_output,
            )
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)

    def step_cfg(self, noise_pred_uncond, noise_pred_text, guidance_scale, timestep, sample, eta=0.0,
                 use_clipped_model_output=False, generator=None, variance_noise=None, return_dict=True):
        """CFG combine (uncond + s * (text - uncond)) and the DDIM step in one op: the same numbers as combining and
        then calling ``step``, in one pass over the latents."""
        if self.config.thresholding:
            combined = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            return self.step(combined, timestep, sample, eta, use_clipped_model_output, generator, variance_noise,
                             return_dict)
        alpha_t, alpha_prev = self.alphas_at(timestep, sample.device)
        noise = self._noise(eta, noise_pred_uncond, generator, variance_noise)
        prev, x0 = ops.cfg_ddim_step(
            noise_pred_uncond, noise_pred_text, guidance_scale, sample, alpha_t, alpha_prev, eta=eta,
            variance_noise=noise, prediction_type=self.config.prediction_type,
            clip_sample_range=self.config.clip_sample_range if self.config.clip_sample else None,
            use_clipped_model_output=use_clipped_model_output,
        )
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)

    def _thresholded_step(self, model_output, sample, alpha_t, alpha_prev, eta, noise, use_clipped):
        """Dynamic thresholding needs a per-sample quantile of x0 first: plain torch (device ops, no host sync)."""
        shape = (-1,) + (1,) * (sample.dim() - 1)
        a_t, a_prev = alpha_t.view(shape).to(sample.dtype), alpha_prev.view(shape).to(sample.dtype)
        x0, eps = pred_original_and_epsilon(model_output, sample, a_t, self.config.prediction_type)
        x0 = threshold_sample(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * variance**0.5
        if use_clipped:
            eps = (sample - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if noise is not None:
            prev = prev + std * noise
        return prev, x0
