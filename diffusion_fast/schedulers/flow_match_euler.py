"""Euler on a rectified-flow schedule with diffusers' FlowMatchEulerDiscreteScheduler semantics: the sampler of
Stable Diffusion 3 (and 3.5).

The model predicts the velocity v = noise - x0 along x_sigma = (1 - sigma) * x0 + sigma * noise, so a step is
``prev = sample + (sigma_next - sigma) * v``; with ``stochastic_sampling`` it is ``(1 - sigma_next) * x0 +
sigma_next * noise`` with x0 = sample - sigma * v. Both are linear in the sample, the model output and the noise:
one fused pass (``ops.linear_step``, in fp32 as diffusers computes it), coefficients from a CPU copy of the sigmas
(no host read of the device). The schedule: ``num_inference_steps`` timesteps evenly spaced from the training
schedule's first to its last, shifted by ``shift`` (SD3: 3.0) or, with ``use_dynamic_shifting``, by the exponent
``mu`` the pipeline passes; then optionally stretched to ``shift_terminal`` and re-spaced as Karras or exponential
sigmas; sigma 0 (or 1 with ``invert_sigmas``) appended.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import ops
from .base import SigmaScheduleBase
from .common import SchedulerOutput, check_step_inputs, karras_sigmas, randn_tensor


class FlowMatchEulerDiscreteScheduler(SigmaScheduleBase):
    defaults = dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
        use_karras_sigmas=False, use_exponential_sigmas=False, time_shift_type="exponential",
        stochastic_sampling=False,
    )
    unsupported = dict(use_beta_sigmas=False)  # (diffusers needs scipy for it)
    init_noise_sigma = 1.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        if c.use_karras_sigmas and c.use_exponential_sigmas:
            raise ValueError("use_karras_sigmas and use_exponential_sigmas: choose one")
        if c.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {c.time_shift_type!r}")
        if isinstance(c.shift, bool) or not isinstance(c.shift, (int, float)) or not c.shift > 0:
            raise ValueError(f"shift must be a positive number, got {c.shift!r}")
        n = c.num_train_timesteps
        sigmas = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
        if not c.use_dynamic_shifting:
            sigmas = c.shift * sigmas / (1 + (c.shift - 1) * sigmas)
        self.timesteps = sigmas * n
        self.sigmas = sigmas
        self.sigma_min, self.sigma_max = float(sigmas[-1]), float(sigmas[0])
        self._shift = c.shift
        self._step_index = None
        self._begin_index = None

    @property
    def shift(self):
        return self._shift

    def set_shift(self, shift: float):
        """Change the static shift for the next ``set_timesteps`` (diffusers' set_shift)."""
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ValueError(f"shift must be a positive number, got {shift!r}")
        self._shift = shift

    def time_shift(self, mu: float, sigma: float, t):
        """The dynamic shift of the sigmas ``t`` by exponent ``mu`` (``time_shift_type``), as diffusers."""
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        """The inference schedule from ``num_inference_steps``, or custom ``sigmas`` (shifted as the config says)
        and/or ``timesteps`` (used as given); ``mu``: the dynamic shift's exponent, required with
        ``use_dynamic_shifting``."""
        c = self.config
        if c.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting is set (the pipeline computes it from the "
                             "image's token count)")
        if mu is not None and (isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu)):
            raise ValueError(f"mu must be a finite number, got {mu!r}")
        custom = {}
        for name, values in (("sigmas", sigmas), ("timesteps", timesteps)):
            if values is not None:
                custom[name] = self._custom_schedule(name, values, None, descending=False).astype(np.float32)
        if len({len(v) for v in custom.values()}) > 1:
            raise ValueError("sigmas and timesteps must have the same length")
        if custom:
            length = len(next(iter(custom.values())))
            if num_inference_steps is not None and num_inference_steps != length:
                raise ValueError(f"num_inference_steps ({num_inference_steps}) must equal the length of the custom "
                                 f"schedule ({length}) when both are given")
            num_inference_steps = length
        else:
            self._check_steps(num_inference_steps)
        n = int(num_inference_steps)
        given_timesteps = custom.get("timesteps")
        if "sigmas" in custom:
            schedule = custom["sigmas"]
        else:
            schedule = (given_timesteps if given_timesteps is not None else np.linspace(
                self.sigma_max * c.num_train_timesteps, self.sigma_min * c.num_train_timesteps, n)) / \
                c.num_train_timesteps
        if c.use_dynamic_shifting:
            schedule = self.time_shift(mu, 1.0, schedule)
        else:
            schedule = self._shift * schedule / (1 + (self._shift - 1) * schedule)
        if c.shift_terminal:
            one_minus = 1 - schedule
            schedule = 1 - one_minus / (one_minus[-1] / (1 - c.shift_terminal))
        if c.use_karras_sigmas:
            schedule = karras_sigmas(float(schedule[-1]), float(schedule[0]), n)
        elif c.use_exponential_sigmas:
            schedule = np.exp(np.linspace(math.log(float(schedule[0])), math.log(float(schedule[-1])), n))
        sigmas = torch.from_numpy(np.asarray(schedule)).to(torch.float32)
        if given_timesteps is not None:
            steps = torch.from_numpy(given_timesteps)
        else:
            steps = sigmas * c.num_train_timesteps
        if c.invert_sigmas:
            sigmas = 1.0 - sigmas
            steps = sigmas * c.num_train_timesteps
            sigmas = torch.cat([sigmas, torch.ones(1)])
        else:
            sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.num_inference_steps = n
        self.timesteps = steps.to(device)
        self.sigmas = sigmas  # CPU: a step's coefficients are host floats
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample, timestep=None):
        return sample

    def scale_noise(self, sample, timestep, noise):
        """Forward flow to ``timestep``'s sigma (per sample): ``sigma * noise + (1 - sigma) * sample`` (image-to-image
        starts from it; the indices as diffusers finds them, see _step_indices)."""
        check_step_inputs(noise, sample, names=("noise", "sample"))
        if noise.shape != sample.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, sample {tuple(sample.shape)}: they must match")
        ts = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], dtype=torch.float32)
        sigma = self.sigmas[self._step_indices(ts)].to(sample.device, sample.dtype)
        sigma = sigma.view(-1, *([1] * (sample.dim() - 1)))
        return sigma * noise + (1.0 - sigma) * sample

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, per_token_timesteps=None, return_dict=True):
        """One Euler step along the predicted velocity; returns (prev_sample, pred_original_sample) with prev in
        model_output's dtype, as diffusers (which returns prev only). ``s_churn``.. are accepted and unused, as in
        diffusers."""
        check_step_inputs(model_output, sample)
        if per_token_timesteps is not None:
            raise NotImplementedError("per_token_timesteps (a timestep per token) is not implemented")
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError(f"{type(self).__name__}.step takes one of scheduler.timesteps (floats), not an index")
        i = self._checked_step_index(timestep)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        if self.config.stochastic_sampling:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            prev, x0 = ops.linear_step(model_output, sample.float(), noise, cx=1.0, cm=-float(sigma),
                                       p0=float(1.0 - sigma_next), px=0.0, pe=float(sigma_next))
        else:
            # (sigma_next - sigma in float32, as diffusers subtracts its float32 sigmas)
            # (the op computes in fp32 whatever the storage, as diffusers' upcast sample: no copy to fp32 first)
            prev, x0 = ops.linear_step(model_output, sample, cx=1.0, cm=-float(sigma), p0=0.0, px=1.0,
                                       pm=float(sigma_next - sigma))
        self._step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)
