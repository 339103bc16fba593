"""Euler (Karras et al. 2022, Algorithm 2) with diffusers' EulerDiscreteScheduler semantics.

Like diffusers, the sigma table is kept on the CPU and the step index is Python state, so the churn condition and the
table lookups never read the device; the arithmetic runs as one fused op (computed in fp32, as diffusers does).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from .common import SchedulerBase, SchedulerOutput, make_betas, randn_tensor, spaced_timesteps


class EulerDiscreteScheduler(SchedulerBase):
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False, sigma_min=None,
        sigma_max=None, timestep_spacing="linspace", timestep_type="discrete", steps_offset=0,
        rescale_betas_zero_snr=False, final_sigmas_type="zero",
    )
    unsupported = dict(use_exponential_sigmas=False, use_beta_sigmas=False)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        for field, allowed in (("interpolation_type", ("linear", "log_linear")), ("final_sigmas_type", ("zero", "sigma_min")),
                               ("timestep_type", ("discrete", "continuous")),
                               ("prediction_type", ("epsilon", "v_prediction", "sample"))):
            if c[field] not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {c[field]!r}")
        self.betas = make_betas(c)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        if c.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # so the last sigma is finite, as diffusers does
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)
        timesteps = torch.from_numpy(np.linspace(0, c.num_train_timesteps - 1, c.num_train_timesteps)[::-1].copy()).float()
        self.timesteps = torch.tensor([0.25 * s.log() for s in sigmas]) if self._continuous_v() else timesteps
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self._step_index = None

    def _continuous_v(self):
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    @property
    def init_noise_sigma(self):
        max_sigma = self.sigmas.max()
        return max_sigma if self.config.timestep_spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5

    @property
    def step_index(self):
        return self._step_index

    def set_timesteps(self, num_inference_steps, device=None):
        self._check_steps(num_inference_steps)
        c, n = self.config, int(num_inference_steps)
        self.num_inference_steps = n
        if c.timestep_spacing == "linspace":  # float spacing here (not rounded), as diffusers' Euler
            timesteps = np.linspace(0, c.num_train_timesteps - 1, n, dtype=np.float32)[::-1].copy()
        else:
            timesteps = spaced_timesteps(c, n, dtype=np.float32)
        base = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)
        log_sigmas = np.log(base)
        if c.interpolation_type == "linear":
            sigmas = np.interp(timesteps, np.arange(0, len(base)), base)
        else:
            sigmas = torch.linspace(np.log(base[-1]), np.log(base[0]), n + 1).exp().numpy()
        if c.use_karras_sigmas:
            sigma_min = c.sigma_min if c.sigma_min is not None else float(sigmas[-1])
            sigma_max = c.sigma_max if c.sigma_max is not None else float(sigmas[0])
            ramp = np.linspace(0, 1, n)
            rho = 7.0
            sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5 if c.final_sigmas_type == "sigma_min" else 0
        sigmas = torch.from_numpy(np.concatenate([sigmas, [float(last)]]).astype(np.float32))
        if self._continuous_v():
            self.timesteps = torch.tensor([0.25 * s.log() for s in sigmas[:-1]]).to(device)
        else:
            self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device)
        self.sigmas = sigmas  # CPU, like diffusers: looked up by a Python step index
        self._step_index = None

    def _init_step_index(self, timestep):
        """The index of ``timestep`` in the schedule (the second match if it appears twice, as diffusers)."""
        schedule = self.timesteps.cpu()
        t = timestep.cpu() if torch.is_tensor(timestep) else torch.tensor(timestep)
        matches = (schedule == t).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {float(t)} is not in this scheduler's timesteps (call set_timesteps first)")
        self._step_index = int(matches[1 if len(matches) > 1 else 0])

    def scale_model_input(self, sample, timestep):
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError("EulerDiscreteScheduler.step takes one of scheduler.timesteps (floats), not an index")
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = float(self.sigmas[self._step_index])
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        noise = None
        if gamma > 0:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
        prev, x0 = ops.euler_step(model_output, sample, self.sigmas[self._step_index],
                                  self.sigmas[self._step_index + 1], gamma=gamma, s_noise=s_noise, noise=noise,
                                  prediction_type=self.config.prediction_type)
        self._step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)

    def add_noise(self, original_samples, noise, timesteps):
        """x + sigma(t) * noise, sigma looked up per sample by the timestep's index in the schedule."""
        schedule = self.timesteps.cpu()
        ts = timesteps.reshape(-1).cpu() if torch.is_tensor(timesteps) else torch.tensor([timesteps]).reshape(-1)
        idx = []
        for t in ts:
            matches = (schedule == t).nonzero()
            if len(matches) == 0:
                raise ValueError(f"timesteps: {float(t)} is not in this scheduler's timesteps")
            idx.append(int(matches[1 if len(matches) > 1 else 0]))
        sigma = self.sigmas[idx].to(original_samples.device, original_samples.dtype)
        return original_samples + noise * sigma.view(-1, *([1] * (original_samples.dim() - 1)))

    def __len__(self):
        return self.config.num_train_timesteps


def _sigma_to_t(sigma, log_sigmas):
    """Interpolate a timestep for ``sigma`` in log-sigma space (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(np.shape(sigma))
