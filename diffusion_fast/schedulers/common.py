"""What the schedulers share: beta schedules, spacings and sigma tables, noise drawn the way diffusers draws it, the
output type, config files. (The scheduler base classes are in ``base``.)"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from .. import _validate


@dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor = None

    def __iter__(self):  # allows `prev, x0 = scheduler.step(...)` like a tuple
        return iter((self.prev_sample, self.pred_original_sample))


_FLOAT32_DRAWS = [False]  # set inside float32_draws()


@contextlib.contextmanager
def float32_draws():
    """Within it, every ``randn_tensor`` draw in fp16/bf16 is a float32 draw rounded to that dtype: runs in two
    dtypes then start from one noise. (In torch 2.11 a float16 randn from a seed is not the float32 one rounded;
    ``diffusion-fast check`` compares an fp16 image with the fp32 reference, image-to-image and inpainting included,
    where the pipelines draw their noise themselves.)"""
    _FLOAT32_DRAWS[0] = True
    try:
        yield
    finally:
        _FLOAT32_DRAWS[0] = False


def randn_tensor(shape, generator=None, device=None, dtype=None):
    """Gaussian noise drawn exactly as diffusers' randn_tensor draws it (so images match diffusers').

    The noise is drawn on the generator's device (CPU generators on CUDA targets draw on the CPU, then move); a list
    of generators draws one sample each. Inside ``float32_draws()`` a half-precision draw is float32 rounded.
    """
    if _FLOAT32_DRAWS[0] and dtype in (torch.float16, torch.bfloat16):
        return randn_tensor(shape, generator, device, torch.float32).to(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    if generator is not None and (not generators or not all(isinstance(g, torch.Generator) for g in generators)):
        raise TypeError(f"generator must be a torch.Generator, a list of them or None, got {generator!r}")
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, (list, tuple)) else generator).device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type:
            raise ValueError(
                f"generator is on {gen_type} but the noise is for {device.type}: use a CPU or {device.type} generator")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator is a list of {len(generator)} but the batch size is {shape[0]}")
        one = (1,) + tuple(shape[1:])
        noise = torch.cat([torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator])
        return noise.to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def betas_for_alpha_bar(num_steps, max_beta=0.999):
    """The squaredcos_cap_v2 (cosine) schedule: betas from alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas):
    """Rescale betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), as diffusers does."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))  # diffusers' rounding order
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(config) -> torch.Tensor:
    if config.trained_betas is not None:
        return torch.tensor(config.trained_betas, dtype=torch.float32)
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    elif config.beta_schedule == "sigmoid":  # GeoDiff's schedule (diffusers' DDPM has it)
        betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (config.beta_end - config.beta_start) + config.beta_start
    else:
        raise ValueError(
            f"beta_schedule must be linear, scaled_linear, squaredcos_cap_v2 or sigmoid, got {config.beta_schedule!r}")
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def spaced_timesteps(config, num_inference_steps, dtype=np.int64):
    """Inference timesteps per timestep_spacing (leading, trailing, linspace), highest first, as diffusers."""
    n_train = config.num_train_timesteps
    spacing = config.timestep_spacing
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, num_inference_steps).round()[::-1].copy().astype(dtype)
    if spacing == "leading":
        ratio = n_train // num_inference_steps
        return (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(dtype) + config.steps_offset
    if spacing == "trailing":
        return np.round(np.arange(n_train, 0, -n_train / num_inference_steps)).astype(dtype) - 1
    raise ValueError(f"timestep_spacing must be leading, trailing or linspace, got {spacing!r}")


def sigma_timesteps(config, num_inference_steps):
    """The float32 timesteps diffusers' sigma schedulers (Euler, Heun, LMS, DPM2) space: linspace not rounded, the
    others as ``spaced_timesteps``."""
    if config.timestep_spacing == "linspace":
        return np.linspace(0, config.num_train_timesteps - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
    return spaced_timesteps(config, num_inference_steps, dtype=np.float32)


def karras_sigmas(sigma_min, sigma_max, n, rho=7.0):
    """Karras et al. (2022)'s n sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def edm_x0_weights(sigma, sigma_data, prediction):
    """(c_skip, c_out): EDM's x0 = c_skip * x + c_out * model_output at noise level ``sigma`` (host floats)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / math.sqrt(sigma**2 + sigma_data**2)
    return c_skip, (c_out if prediction == "epsilon" else -c_out)


def vp_alpha_sigma(sigma):
    """(alpha_t, sigma_t) of the VP process at the noise level sigma (sigma = sigma_t / alpha_t)."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def half_log_snr(sigma):
    """lambda = log(alpha_t) - log(sigma_t), infinite at sigma = 0 (DPM-Solver's and UniPC's time variable)."""
    alpha, s = vp_alpha_sigma(sigma)
    return math.log(alpha) - math.log(s) if s > 0 else math.inf


def sigma_to_t(sigma, log_sigmas):
    """Interpolate a timestep for ``sigma`` in log-sigma space (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(np.shape(sigma))


def linear_terms(terms):
    """``(extra, pe)`` for ``ops.linear_step``'s ``pe * extra`` from [(weight, tensor), ...]: one term passed as it
    is (no extra pass), several added up first (in fp32: a few small ops), none as (None, 0.0)."""
    if not terms:
        return None, 0.0
    if len(terms) == 1:
        return terms[0][1], terms[0][0]
    extra = terms[0][1].float() * terms[0][0]
    for weight, tensor in terms[1:]:
        extra = extra.add(tensor, alpha=weight)
    return extra, 1.0



def timesteps_for_sigmas(sigmas, log_sigmas, rounded):
    """The (fractional, or ``rounded``) training timestep of each sigma, interpolated as diffusers does."""
    timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
    return timesteps.round() if rounded else timesteps

def check_step_inputs(model_output, sample, names=("model_output", "sample")):
    """A step's two tensors checked by name before the step reads them: a None, a list or an integer tensor is a
    TypeError naming it, not an AttributeError from inside the update."""
    for name, value in zip(names, (model_output, sample)):
        _validate.tensor(name, value, min_dim=1)


def check_same_run(sample, kept):
    """A multistep step combines this sample with tensors ``kept`` from the earlier steps of the run: a sample of
    another shape (a new batch or size without set_timesteps) is refused by name, not left to fail deep in the op."""
    for t in kept:
        if torch.is_tensor(t) and t.shape != sample.shape:
            raise ValueError(f"sample has shape {tuple(sample.shape)}, but the earlier steps of this run had "
                             f"{tuple(t.shape)}: call set_timesteps to start a new run")

def threshold_sample(sample, ratio, max_value):
    """Dynamic thresholding (Imagen): clamp each sample to its ratio-quantile of |x| (at least 1), rescale."""
    dtype = sample.dtype
    batch = sample.shape[0]
    upcast = dtype not in (torch.float32, torch.float64)  # quantile needs fp32/fp64
    flat = (sample.float() if upcast else sample).reshape(batch, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(sample.shape).to(dtype)


def as_timestep_tensor(timestep, device) -> torch.Tensor:
    """A timestep (int, float, 0-d or (B,) tensor) as a 1-d tensor on ``device``; never reads a device value."""
    t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
    return t.to(device=device, dtype=torch.long).reshape(-1)


def read_config(folder, subfolder=None) -> dict:
    path = os.fspath(folder)
    if subfolder:
        path = os.path.join(path, subfolder)
    if os.path.isdir(path):
        path = os.path.join(path, "scheduler_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no scheduler config at {path!r}")
    with open(path) as f:
        return json.load(f)
