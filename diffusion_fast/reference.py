"""Plain PyTorch references for every fast op.

Each function here is written to be obviously correct, not fast: it is what the Triton kernels, the C++ ops, the
tests, the benchmarks and the ``check`` command are judged against. ``upcast=True`` computes in float32 and casts the
result back to the input dtype (what the fast kernels do); ``upcast=False`` computes in the input dtype (what plain
PyTorch does, the baseline of the "2x the error of PyTorch" rule). For a float64 reference pass float64 tensors.

Alphas and sigmas may be Python floats or tensors broadcastable over the batch: a 0-d tensor, or a 1-d tensor of
length B (one value per sample, for per-sample timesteps), or any shape that broadcasts against the sample.
"""
from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _compute_dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    if upcast and x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def per_sample(value, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float or tensor coefficient shaped to broadcast over ``like`` (batch first)."""
    if not torch.is_tensor(value):
        return torch.tensor(float(value), dtype=dtype, device=like.device)
    value = value.to(device=like.device, dtype=dtype)
    if value.dim() == 1 and like.dim() > 1 and value.shape[0] == like.shape[0]:
        value = value.view(-1, *([1] * (like.dim() - 1)))
    return value


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=True, upcast=False):
    """GroupNorm over (C/G, *spatial) per (sample, group), optional affine, then optional SiLU."""
    dtype = _compute_dtype(x, upcast)
    n, c = x.shape[:2]
    xg = x.to(dtype).reshape(n, num_groups, -1)
    mean = xg.mean(dim=-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    affine_shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(dtype).reshape(affine_shape)
    if bias is not None:
        y = y + bias.to(dtype).reshape(affine_shape)
    if silu:
        y = y * torch.sigmoid(y)
    return y.to(x.dtype)


def attention(q, k, v, *, scale=None, upcast=False):
    """softmax(q k^T * scale) v with q (B, H, Lq, D) and k, v (B, H, Lk, D); scale defaults to 1/sqrt(D)."""
    dtype = _compute_dtype(q, upcast)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.to(dtype)).to(q.dtype)


def pred_original_and_epsilon(model_output, sample, alpha_prod_t, prediction_type):
    """DDIM/DDPM's x0 and epsilon from the model output, per prediction type (diffusers' formulas)."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        x0 = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        eps = model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha_prod_t**0.5 * x0) / beta_prod_t**0.5
    elif prediction_type == "v_prediction":
        x0 = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        eps = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return x0, eps


def ddim_step(
    model_output,
    sample,
    alpha_prod_t,
    alpha_prod_t_prev,
    *,
    eta=0.0,
    variance_noise=None,
    prediction_type="epsilon",
    clip_sample_range=None,
    use_clipped_model_output=False,
    upcast=False,
):
    """One DDIM update (diffusers' DDIMScheduler.step, thresholding excluded). Returns (prev_sample, pred_x0)."""
    dtype = _compute_dtype(sample, upcast)
    mo, x = model_output.to(dtype), sample.to(dtype)
    a_t = per_sample(alpha_prod_t, x, dtype)
    a_prev = per_sample(alpha_prod_t_prev, x, dtype)
    x0, eps = pred_original_and_epsilon(mo, x, a_t, prediction_type)
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance**0.5
    if use_clipped_model_output:
        eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
    prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    if eta > 0:
        if variance_noise is None:
            raise ValueError("ddim_step: eta > 0 needs variance_noise (a tensor shaped like sample)")
        prev = prev + std * variance_noise.to(dtype)
    return prev.to(sample.dtype), x0.to(sample.dtype)


def cfg_combine(noise_pred_uncond, noise_pred_text, guidance_scale):
    """Classifier-free guidance: uncond + s * (text - uncond)."""
    return noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)


def cfg_ddim_step(
    noise_pred_uncond, noise_pred_text, guidance_scale, sample, alpha_prod_t, alpha_prod_t_prev, **kwargs
):
    """Classifier-free guidance combine followed by one DDIM update; keywords as ``ddim_step``."""
    upcast = kwargs.get("upcast", False)
    dtype = _compute_dtype(sample, upcast)
    model_output = cfg_combine(noise_pred_uncond.to(dtype), noise_pred_text.to(dtype), guidance_scale)
    return ddim_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, **kwargs)  # outputs in sample's dtype


def ddpm_step(
    model_output,
    sample,
    alpha_prod_t,
    alpha_prod_t_prev,
    *,
    std=0.0,
    variance_noise=None,
    prediction_type="epsilon",
    clip_sample_range=None,
    upcast=False,
):
    """One DDPM ancestral update (diffusers' DDPMScheduler.step, thresholding excluded).

    ``std`` is the noise scale the scheduler derives from its variance_type (0 at the last step); the noise term is
    ``std * variance_noise``. Returns (prev_sample, pred_x0).
    """
    dtype = _compute_dtype(sample, upcast)
    mo, x = model_output.to(dtype), sample.to(dtype)
    a_t = per_sample(alpha_prod_t, x, dtype)
    a_prev = per_sample(alpha_prod_t_prev, x, dtype)
    beta_prod_t, beta_prod_t_prev = 1 - a_t, 1 - a_prev
    current_alpha_t = a_t / a_prev
    current_beta_t = 1 - current_alpha_t
    x0, _ = pred_original_and_epsilon(mo, x, a_t, prediction_type)
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    x0_coeff = a_prev**0.5 * current_beta_t / beta_prod_t
    sample_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
    prev = x0_coeff * x0 + sample_coeff * x
    std = per_sample(std, x, dtype)
    if variance_noise is not None:
        prev = prev + std * variance_noise.to(dtype)
    elif bool(torch.any(std != 0)):
        raise ValueError("ddpm_step: a non-zero std needs variance_noise (a tensor shaped like sample)")
    return prev.to(sample.dtype), x0.to(sample.dtype)


def euler_step(
    model_output,
    sample,
    sigma,
    sigma_next,
    *,
    gamma=0.0,
    s_noise=1.0,
    noise=None,
    prediction_type="epsilon",
    upcast=True,
):
    """One Euler (Karras et al. Algorithm 2) update, as diffusers' EulerDiscreteScheduler.step.

    diffusers computes this step in float32 whatever the sample dtype (hence ``upcast=True`` by default) and casts
    the result to ``model_output``'s dtype. With ``gamma > 0`` the sample is first churned:
    ``sample += noise * s_noise * sqrt(sigma_hat^2 - sigma^2)``. Returns (prev_sample, pred_x0).
    """
    dtype, mo, x, sigma_t, sigma_next_t = _euler_inputs(model_output, sample, sigma, sigma_next, upcast)
    sigma_hat = sigma_t * (gamma + 1)
    if gamma > 0:
        if noise is None:
            raise ValueError("euler_step: gamma > 0 needs noise (a tensor shaped like sample)")
        x = x + noise.to(dtype) * s_noise * (sigma_hat**2 - sigma_t**2) ** 0.5
    x0 = _euler_x0(mo, x, sigma_t, sigma_hat, prediction_type)
    derivative = (x - x0) / sigma_hat
    prev = x + derivative * (sigma_next_t - sigma_hat)
    return prev.to(model_output.dtype), x0.to(model_output.dtype)


def _euler_inputs(model_output, sample, sigma, sigma_next, upcast):
    """The Euler steps' operands: diffusers computes them in float32 for fp16/bf16 storage (``upcast``)."""
    dtype = torch.float32 if upcast and sample.dtype in (torch.float16, torch.bfloat16) else sample.dtype
    x = sample.to(dtype)
    return dtype, model_output.to(dtype), x, per_sample(sigma, x, dtype), per_sample(sigma_next, x, dtype)


def _euler_x0(mo, x, sigma, sigma_hat, prediction_type):
    """pred_x0 of the Euler steps. The diffusers quirk kept here: epsilon uses sigma_hat, v_prediction uses sigma."""
    if prediction_type == "epsilon":
        return x - sigma_hat * mo
    if prediction_type == "v_prediction":
        return mo * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    if prediction_type == "sample":
        return mo
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def euler_ancestral_step(model_output, sample, sigma, sigma_next, noise, *, prediction_type="epsilon", upcast=True):
    """One ancestral Euler update, as diffusers' EulerAncestralDiscreteScheduler.step: an Euler step from sigma down to
    sigma_down, then ``noise * sigma_up``, where sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 and
    sigma_down^2 = sigma_next^2 - sigma_up^2, computed as diffusers computes it (the C++ op takes the exact
    sigma_next^2 / sigma, which does not cancel). In float32 for fp16/bf16 storage (``upcast``), as diffusers; the
    result takes ``model_output``'s dtype. Returns (prev_sample, pred_x0).
    """
    dtype, mo, x, sigma_t, sigma_next_t = _euler_inputs(model_output, sample, sigma, sigma_next, upcast)
    x0 = _euler_x0(mo, x, sigma_t, sigma_t, prediction_type)
    sigma_up = (sigma_next_t**2 * (sigma_t**2 - sigma_next_t**2) / sigma_t**2) ** 0.5
    sigma_down = (sigma_next_t**2 - sigma_up**2) ** 0.5
    prev = x + (x - x0) / sigma_t * (sigma_down - sigma_t) + noise.to(dtype) * sigma_up
    return prev.to(model_output.dtype), x0.to(model_output.dtype)


def linear_step(model_output, sample, extra=None, *, cx, cm, p0, px, pm=0.0, pe=0.0, upcast=True):
    """A step whose update is linear with the caller's coefficients: ``x0 = cx * sample + cm * model_output`` and
    ``prev = p0 * x0 + px * sample + pm * model_output + pe * extra`` (DPM-Solver++ multistep: ``extra`` is the
    previous step's x0). In float32 for fp16/bf16 storage (``upcast``); results in ``model_output``'s dtype.
    Returns (prev_sample, pred_x0)."""
    dtype = torch.float32 if upcast and sample.dtype in (torch.float16, torch.bfloat16) else sample.dtype
    mo, x = model_output.to(dtype), sample.to(dtype)
    x0 = cx * x + cm * mo
    prev = p0 * x0 + px * x + pm * mo
    if extra is not None:
        prev = prev + pe * extra.to(dtype)
    return prev.to(model_output.dtype), x0.to(model_output.dtype)
