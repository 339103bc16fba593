"""LCM (Luo et al. 2023) with diffusers' LCMScheduler semantics: the sampler of latent consistency models and of
LCM-LoRA, 2 to 8 steps.

A step predicts x0 from the model output (epsilon, v or sample; clipped or thresholded if the config says so),
applies the consistency model's boundary condition ``denoised = c_out * x0 + c_skip * sample`` (c_skip and c_out
from the timestep times ``timestep_scaling``), and, except at the last step, noises ``denoised`` to the next
timestep: ``prev = sqrt(a_prev) * denoised + sqrt(1 - a_prev) * noise``, the noise drawn as diffusers draws it. That
is linear in the sample, the model output and the noise, so a step is one fused pass (``ops.linear_step``, whose x0
output is ``denoised``), its coefficients worked out on the host in float64. With clipping or thresholding, x0 is
made first (a few small ops) and the pass takes it in place of the model output.

``lcm_update`` is that step on the state diffusers keeps (``timesteps``, ``step_index``, ``alphas_cumprod``,
``final_alpha_cumprod``, ``num_inference_steps``): our scheduler runs it, and so does ``accelerate``'s fused step
for diffusers' own LCMScheduler. It takes this step's timestep from the schedule by the step index (a host copy),
so a device timestep is never read on the host.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .. import ops
from .base import SigmaScheduleBase
from .common import check_step_inputs, make_betas, randn_tensor, threshold_sample

SIGMA_DATA = 0.5  # the consistency models' data standard deviation (diffusers fixes it at 0.5)


@dataclass
class LCMSchedulerOutput:
    prev_sample: torch.Tensor
    denoised: torch.Tensor = None

    def __iter__(self):  # allows `prev, denoised = scheduler.step(...)` like a tuple
        return iter((self.prev_sample, self.denoised))


def boundary_scalings(timestep: float, timestep_scaling: float):
    """(c_skip, c_out) of the consistency boundary condition at ``timestep`` (diffusers'
    get_scalings_for_boundary_condition_discrete), in float64."""
    scaled = timestep * timestep_scaling
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5


def x0_weights(alpha_t: float, prediction_type: str):
    """(a, b) with x0 = a * sample + b * model_output for the prediction type, at alpha_prod_t."""
    if prediction_type == "epsilon":
        if alpha_t == 0:  # zero terminal SNR's last alpha: diffusers divides by 0 and its image is NaN
            raise ValueError("prediction_type 'epsilon' at a timestep with alpha_prod_t = 0 (rescale_betas_zero_snr): "
                             "x0 = (x - eps) / 0 is undefined; use v_prediction, as zero-SNR models do")
        return 1 / alpha_t**0.5, -((1 - alpha_t) / alpha_t) ** 0.5
    if prediction_type == "v_prediction":
        return alpha_t**0.5, -((1 - alpha_t) ** 0.5)
    if prediction_type == "sample":
        return 0.0, 1.0
    raise ValueError(f"prediction_type must be epsilon, v_prediction or sample (LCM, TCD), got {prediction_type!r}")


def lcm_update(self, model_output, sample, index: int, schedule, alphas, generator=None):
    """The ``index``-th LCM step of ``schedule`` (the timesteps as host ints) with ``alphas`` (alphas_cumprod as host
    floats), on ``self``, a scheduler with diffusers' LCM fields (``config``, ``num_inference_steps``,
    ``final_alpha_cumprod``). Returns (prev_sample, denoised), both in the promoted dtype of the sample and the
    model output, as diffusers computes them. The caller advances the step index."""
    check_step_inputs(model_output, sample)
    config = self.config
    timestep = schedule[index]
    prev_timestep = schedule[index + 1] if index + 1 < len(schedule) else timestep
    alpha_t = alphas[timestep]
    alpha_prev = alphas[prev_timestep] if prev_timestep >= 0 else float(self.final_alpha_cumprod)
    c_skip, c_out = boundary_scalings(timestep, config.timestep_scaling)
    a, b = x0_weights(alpha_t, config.prediction_type)
    dtype = torch.promote_types(model_output.dtype, sample.dtype)
    noise = None
    if index != self.num_inference_steps - 1:  # as diffusers: the last step returns denoised itself, no draw
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=dtype)
        p0, pe = alpha_prev**0.5, (1 - alpha_prev) ** 0.5
    else:
        p0, pe = 1.0, 0.0
    if config.thresholding or config.clip_sample:  # x0 is not linear any more: make it, then one pass
        x0 = a * sample.float() + b * model_output.float()
        x0 = (threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
              if config.thresholding else x0.clamp(-config.clip_sample_range, config.clip_sample_range))
        prev, denoised = ops.linear_step(x0.to(dtype), sample, noise, cx=c_skip, cm=c_out, p0=p0, px=0.0,
                                         pe=pe)
    else:
        prev, denoised = ops.linear_step(model_output.to(dtype), sample, noise, cx=c_out * a + c_skip,
                                         cm=c_out * b, p0=p0, px=0.0, pe=pe)
    return prev, denoised


def lcm_timesteps(config, num_inference_steps=None, original_inference_steps=None, timesteps=None, strength=1.0,
                  name="LCMScheduler", every_timestep=False):
    """diffusers' LCM schedule: ``num_inference_steps`` evenly spaced (by index) over the ``original_inference_steps``
    of the distillation schedule (``strength`` < 1 keeps its lower part, for img2img), or custom ``timesteps``.
    ``every_timestep``: spaced over every training timestep instead (diffusers' TCD, given original_inference_steps
    in its call). Returns (timesteps as int64 numpy, num_inference_steps as diffusers counts it)."""
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of num_inference_steps or timesteps")
    n_train = config.num_train_timesteps
    original = original_inference_steps if original_inference_steps is not None else config.original_inference_steps
    if isinstance(original, bool) or not isinstance(original, (int, np.integer)) or not 0 < original <= n_train:
        raise ValueError(f"original_inference_steps must be an int in [1, {n_train}] (num_train_timesteps), "
                         f"got {original!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    k = n_train // original
    origin = np.arange(1, int(original * strength) + 1) * k - 1  # the distillation schedule, ascending
    if every_timestep:
        origin = np.arange(0, int(n_train * strength))
    if timesteps is not None:
        values = np.asarray(timesteps.cpu() if torch.is_tensor(timesteps) else timesteps)
        if values.ndim != 1 or values.size < 1 or not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"timesteps must be a non-empty 1-d list of ints, got {timesteps!r}")
        values = values.astype(np.int64)
        if (np.diff(values) >= 0).any():
            raise ValueError(f"timesteps must be in descending order, got {values.tolist()}")
        if values[0] >= n_train or values[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, {n_train}) (num_train_timesteps), got {values.tolist()}")
        if strength == 1.0 and values[0] != n_train - 1:
            warnings.warn(f"{name}: the custom schedule starts at {values[0]}, not {n_train - 1}: you may get "
                          "unexpected results", UserWarning, stacklevel=3)
        off = sorted(set(values[1:].tolist()) - set(origin.tolist()))
        if off:
            warnings.warn(f"{name}: timesteps {off} are not on the distillation schedule: you may get "
                          "unexpected results", UserWarning, stacklevel=3)
        n = len(values)  # as diffusers: counted before strength cuts the schedule
        start = max(n - min(int(n * strength), n), 0)
        return values[start:].copy(), n
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
    if not 0 < num_inference_steps <= original:
        raise ValueError(f"num_inference_steps must be in [1, {original}] (original_inference_steps: LCM's steps "
                         f"are a subset of its distillation schedule), got {num_inference_steps}")
    if len(origin) < num_inference_steps:
        raise ValueError(f"original_inference_steps x strength = {original} x {strength} leaves {len(origin)} "
                         f"timesteps, fewer than num_inference_steps = {num_inference_steps}")
    origin = origin[::-1]
    picks = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return origin[picks].copy(), int(num_inference_steps)


class LCMScheduler(SigmaScheduleBase):
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        trained_betas=None, original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
        set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading", timestep_scaling=10.0,
        rescale_betas_zero_snr=False,
    )
    init_noise_sigma = 1.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        x0_weights(0.5, c.prediction_type)  # checks the prediction type
        if c.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(
                f"beta_schedule must be linear, scaled_linear or squaredcos_cap_v2 ({type(self).__name__}), got "
                f"{c.beta_schedule!r}")
        self.betas = make_betas(c)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0].clone()
        self._host_alphas = self.alphas_cumprod.double().tolist()
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.custom_timesteps = False

    def set_timesteps(self, num_inference_steps=None, device=None, original_inference_steps=None, timesteps=None,
                      strength=1.0):
        schedule, self.num_inference_steps = lcm_timesteps(self.config, num_inference_steps, original_inference_steps,
                                                           timesteps, strength)
        self.custom_timesteps = timesteps is not None
        self._host_timesteps = schedule.tolist()  # step reads these, never the device timesteps
        self.timesteps = torch.from_numpy(schedule).to(device=device, dtype=torch.long)
        self._step_index = self._begin_index = None

    def scale_model_input(self, sample, timestep=None):
        return sample

    def _this_step(self, timestep):
        """This call's index into the schedule, checked: a host ``timestep`` must be the schedule's at that index
        (a device one is not read: that would be a sync)."""
        i = self._checked_step_index(timestep)
        on_host = not torch.is_tensor(timestep) or timestep.device.type == "cpu"
        if on_host and int(timestep) != self._host_timesteps[i]:
            raise ValueError(f"timestep {int(timestep)} is not this step's timestep {self._host_timesteps[i]}: "
                             f"{type(self).__name__} steps through scheduler.timesteps in order")
        return i

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        i = self._this_step(timestep)
        prev, denoised = lcm_update(self, model_output, sample, i, self._host_timesteps, self._host_alphas,
                                    generator)
        self._step_index += 1
        return LCMSchedulerOutput(prev, denoised) if return_dict else (prev, denoised)
