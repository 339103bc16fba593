"""EDM-preconditioned samplers (Karras et al. 2022) with diffusers' semantics: ``EDMDPMSolverMultistepScheduler``
(Playground v2.5's sampler) and ``EDMEulerScheduler`` (CosXL's).

The model sees ``c_in(sigma) * x`` and the timestep ``c_noise = log(sigma) / 4``; its output becomes x0 =
c_skip(sigma) * x + c_out(sigma) * output (``edm_x0_weights``). The sigmas are the process's own (x = x0 + sigma *
noise), from ``sigma_max`` down to ``sigma_min`` on a Karras (rho) or exponential ramp, computed in the dtype
diffusers computes each scheduler's in (float32 for the DPM-Solver, float64 rounded to float32 for Euler).

Each step is linear in the sample, the model output and kept tensors, so it is one ``linear_step`` pass with
weights folded on the host in float64: the DPM-Solver++ update is ``dpm_solver.solver_coefficients`` in its EDM
form (alpha 1), and Euler's is x + (x - x0) / sigma_hat * dt. ``accelerate``'s fused steps for diffusers' own use
the same functions.
"""
from __future__ import annotations

import math

import torch

from .. import ops
from .base import SigmaScheduleBase
from .common import SchedulerOutput, check_step_inputs, edm_x0_weights, randn_tensor
from .dpm_solver import (ALGORITHMS, advance_multistep, check_choices, nearest_settings, sde_noise, solver_coefficients,
                         solver_order_now, solver_step, thresholder)


def edm_euler_coefficients(sigma_hat, sigma_next, sigma_data, prediction):
    """linear_step's coefficients of diffusers' EDM Euler update from sigma_hat to sigma_next: prev = x + (x - x0) /
    sigma_hat * (sigma_next - sigma_hat), x0 EDM's (at sigma_hat)."""
    cx, cm = edm_x0_weights(sigma_hat, sigma_data, prediction)
    ratio = (sigma_next - sigma_hat) / sigma_hat
    return dict(cx=cx, cm=cm, p0=-ratio, px=1.0 + ratio)


class _EDMScheduler(SigmaScheduleBase):
    """What the two EDM schedulers share: config, sigma ramp, c_in scaling, c_noise timesteps, add_noise."""

    defaults = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras", num_train_timesteps=1000,
                    prediction_type="epsilon", rho=7.0, final_sigmas_type="zero")
    ramp_dtype = torch.float32  # the dtype diffusers computes the Karras ramp in

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        for field, allowed in (("sigma_schedule", ("karras", "exponential")),
                               ("prediction_type", ("epsilon", "v_prediction")),
                               ("final_sigmas_type", ("zero", "sigma_min"))):
            if c[field] not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {c[field]!r}")
        for field in ("sigma_min", "sigma_max", "sigma_data", "rho"):
            value = c[field]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{field} must be a positive finite number, got {value!r}")
        if c.sigma_min >= c.sigma_max:
            raise ValueError(f"sigma_min must be below sigma_max, got {c.sigma_min} and {c.sigma_max}")
        self._step_index = self._begin_index = None

    @property
    def init_noise_sigma(self):
        return (self.config.sigma_max**2 + 1) ** 0.5  # (diffusers' choice for both, kept for the same latents)

    def _ramp_sigmas(self, n):
        """n sigmas from sigma_max down to sigma_min, as float32, computed as diffusers computes them."""
        c = self.config
        if c.sigma_schedule == "exponential":
            return torch.linspace(math.log(c.sigma_min), math.log(c.sigma_max), n).exp().flip(0)
        ramp = torch.linspace(0, 1, n, dtype=self.ramp_dtype)
        lo, hi = c.sigma_min ** (1 / c.rho), c.sigma_max ** (1 / c.rho)
        return ((hi + ramp * (lo - hi)) ** c.rho).to(torch.float32)

    def _finish_schedule(self, sigmas, last_sigma, device):
        self.num_inference_steps = len(sigmas)
        self.timesteps = (0.25 * torch.log(sigmas)).to(device)  # c_noise
        self.sigmas = torch.cat([sigmas, torch.tensor([last_sigma], dtype=torch.float32)])
        self._sigma_values = self.sigmas.tolist()
        self._reset_state()

    def _reset_state(self):
        self._step_index = self._begin_index = None

    def scale_model_input(self, sample, timestep):
        """c_in(sigma) * sample, as diffusers computes it (a float32 scalar times the sample)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample * (1 / ((sigma**2 + self.config.sigma_data**2) ** 0.5))

    def add_noise(self, original_samples, noise, timesteps):
        """x + sigma * noise, sigma per sample (see _step_indices), as diffusers."""
        sigma = self.sigmas[self._step_indices(timesteps)].to(original_samples.device, original_samples.dtype)
        return original_samples + noise * sigma.view(-1, *([1] * (original_samples.dim() - 1)))


class EDMDPMSolverMultistepScheduler(_EDMScheduler):
    defaults = dict(_EDMScheduler.defaults, solver_order=2, thresholding=False, dynamic_thresholding_ratio=0.995,
                    sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint",
                    lower_order_final=True, euler_at_final=False)

    def __init__(self, **kwargs):
        super().__init__(**nearest_settings(kwargs))
        c = self.config
        check_choices(c, (("algorithm_type", ALGORITHMS), ("solver_type", ("midpoint", "heun")),
                          ("solver_order", (1, 2, 3))))
        if c.algorithm_type == "sde-dpmsolver++" and c.solver_order == 3:
            raise ValueError("algorithm_type 'sde-dpmsolver++' with solver_order 3: diffusers' EDM third-order "
                             "update has no SDE form (it fails there); use solver_order 2 or 'dpmsolver++'")
        self._reset_state()

    def set_timesteps(self, num_inference_steps=None, device=None):
        self._check_steps(num_inference_steps)
        sigmas = self._ramp_sigmas(int(num_inference_steps))
        last = self.config.sigma_min if self.config.final_sigmas_type == "sigma_min" else 0.0
        self._finish_schedule(sigmas, last, device)

    def _reset_state(self):
        super()._reset_state()
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        c = self.config
        i, n = self._checked_step_index(timestep), len(self.timesteps)
        order = solver_order_now(c, i, n, self.lower_order_nums)
        coefficients = edm_solver_coefficients(self._sigma_values, i, order, c)
        if coefficients is None:
            raise ValueError(f"the order-{order} DPM-Solver update at step {i} is not finite for this schedule "
                             f"(sigmas {self._sigma_values[max(i - order + 1, 0):i + 2]}); diffusers returns NaN there")
        earlier = [self.model_outputs[-j] for j in range(1, order)]
        prev, x0 = solver_step(model_output, sample, earlier, coefficients, sde_noise(c, model_output, generator),
                               thresholder(c))
        advance_multistep(self, x0)
        return SchedulerOutput(prev, x0) if return_dict else (prev,)


def edm_solver_coefficients(sigmas, i, order, config):
    """``solver_coefficients`` in EDM form for a scheduler's config (ours or diffusers')."""
    return solver_coefficients(sigmas, i, order, config.prediction_type, config.algorithm_type, config.solver_type,
                               sigma_data=config.sigma_data)


class EDMEulerScheduler(_EDMScheduler):
    ramp_dtype = torch.float64  # diffusers' EDM Euler ramps in float64, then rounds the sigmas to float32

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.is_scale_input_called = False

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None):
        """diffusers' schedule: ``num_inference_steps`` sigmas on the config's ramp, or a custom ``sigmas`` ramp
        (values in [0, 1], 0 being sigma_max) mapped through it."""
        if sigmas is not None:
            ramp = self._custom_schedule("sigmas", sigmas, num_inference_steps, descending=False)
            if ramp.min() < 0 or ramp.max() > 1:
                raise ValueError(f"sigmas is a ramp in [0, 1] (0: sigma_max), got {ramp.tolist()}")
            table = self._ramp_from(torch.from_numpy(ramp))
        else:
            self._check_steps(num_inference_steps)
            table = self._ramp_sigmas(int(num_inference_steps))
        last = float(table[-1]) if self.config.final_sigmas_type == "sigma_min" else 0.0
        self._finish_schedule(table, last, device)

    def _ramp_from(self, ramp):
        c = self.config
        if c.sigma_schedule == "exponential":  # (diffusers takes only the ramp's length here)
            return self._ramp_sigmas(len(ramp))
        lo, hi = c.sigma_min ** (1 / c.rho), c.sigma_max ** (1 / c.rho)
        return ((hi + ramp.double() * (lo - hi)) ** c.rho).to(torch.float32)

    def scale_model_input(self, sample, timestep):
        self.is_scale_input_called = True
        return super().scale_model_input(sample, timestep)

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True, pred_original_sample=None):
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError("EDMEulerScheduler.step takes one of scheduler.timesteps (floats), not an index")
        i = self._checked_step_index(timestep)
        prev, x0 = edm_euler_update(self, model_output, sample, self._sigma_values, i, s_churn, s_tmin, s_tmax,
                                    s_noise, generator, pred_original_sample)
        self._step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


def edm_euler_update(sched, model_output, sample, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, generator,
                     pred_original_sample=None):
    """(prev, x0) of diffusers' EDM Euler step at index ``i`` of ``sigmas`` (host floats), on ``sched``'s config:
    churn noise drawn as diffusers draws it and added to the fp32 sample first, then one ``linear_step`` pass; prev
    in the model output's dtype, x0 in fp32 (or ``pred_original_sample`` itself where given, as diffusers)."""
    check_step_inputs(model_output, sample)
    c = sched.config
    sigma = sigmas[i]
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    x = sample.float()
    if gamma > 0:
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
        x = x + (noise * s_noise) * math.sqrt(sigma_hat**2 - sigma**2)
    weights = edm_euler_coefficients(sigma_hat, sigmas[i + 1], c.sigma_data, c.prediction_type)
    given = pred_original_sample is not None
    if given:  # diffusers' caller-given x0: the derivative is taken from it
        weights.update(cx=0.0, cm=1.0)
    prev, x0 = ops.linear_step((pred_original_sample if given else model_output).float(), x, **weights)
    return prev.to(model_output.dtype), (pred_original_sample if given else x0)
