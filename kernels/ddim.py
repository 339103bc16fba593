"""The DDIM update, optionally fused with the classifier-free guidance combine, in one launch.

Each program reads a block of latent elements (uncond[, text], sample[, noise]), looks up its sample's alphas (one
per sample, so per-sample timesteps work), computes in fp32 — guidance, x0 for the prediction type, the optional
clamp, the direction and the eta noise — and writes prev_sample and pred_original_sample in the sample's dtype. The
alphas are device tensors: nothing is read on the host, so the launch can be captured in a CUDA graph.
Semantics are diffusers' DDIMScheduler.step (see diffusion_fast.reference.ddim_step).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._host import cdiv
from ._per_sample import per_sample_value

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 1024
PREDICTION = {"epsilon": 0, "v_prediction": 1, "sample": 2}


@triton.jit
def _cfg_ddim_kernel(
    out_ptr,  # model output, or the unconditional noise prediction when CFG; (B, *latent) contiguous
    text_ptr,  # the text-conditioned noise prediction (CFG only), like out_ptr
    sample_ptr,  # x_t, (B, *latent) contiguous
    noise_ptr,  # variance noise (HAS_NOISE only), like sample
    prev_ptr, x0_ptr,  # outputs: x_{t-1} and predicted x_0, like sample
    alpha_t_ptr, alpha_prev_ptr,  # fp32 (B,): alphas_cumprod at t and at the previous timestep
    guidance_scale, eta, clip_range,  # floats
    per_sample, numel,  # elements per sample, total elements
    CFG: tl.constexpr,
    PRED: tl.constexpr,  # 0 epsilon, 1 v_prediction, 2 sample
    CLIP: tl.constexpr,
    USE_CLIPPED: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    SAMPLE_PER_BLOCK: tl.constexpr,  # per_sample % BLOCK == 0: each block lies in one sample
    BLOCK: tl.constexpr,
):
    block_start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = block_start + tl.arange(0, BLOCK)
    mask = offs < numel
    a_t = per_sample_value(alpha_t_ptr, block_start, offs, mask, per_sample, 0.5, SAMPLE_PER_BLOCK)
    a_prev = per_sample_value(alpha_prev_ptr, block_start, offs, mask, per_sample, 0.5, SAMPLE_PER_BLOCK)
    x = tl.load(sample_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mo = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        text = tl.load(text_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mo = mo + guidance_scale * (text - mo)
    sqrt_a = tl.sqrt_rn(a_t)
    sqrt_b = tl.sqrt_rn(1.0 - a_t)
    if PRED == 0:
        x0 = tl.div_rn(x - sqrt_b * mo, sqrt_a)
        eps = mo
    elif PRED == 1:
        x0 = sqrt_a * x - sqrt_b * mo
        eps = sqrt_a * mo + sqrt_b * x
    else:
        x0 = mo
        eps = tl.div_rn(x - sqrt_a * x0, sqrt_b)
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    variance = tl.div_rn(1.0 - a_prev, 1.0 - a_t) * (1.0 - tl.div_rn(a_t, a_prev))
    std = eta * tl.sqrt_rn(variance)
    if USE_CLIPPED:
        eps = tl.div_rn(x - sqrt_a * x0, sqrt_b)
    prev = tl.sqrt_rn(a_prev) * x0 + tl.sqrt_rn(1.0 - a_prev - std * std) * eps
    if HAS_NOISE:
        prev += std * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(prev_ptr + offs, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _launch(first, text, sample, alpha_t, alpha_prev, guidance_scale, eta, variance_noise, prediction_type,
            clip_sample_range, use_clipped_model_output):
    if sample.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("sample is on the CPU: the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1")
    if sample.dtype == torch.float64:
        raise TypeError("sample: the Triton DDIM kernel takes float16, bfloat16 or float32, got float64")
    # Latents are contiguous in the pipeline (noise_pred.chunk(2) halves are too); anything else is copied once.
    first, sample = first.contiguous(), sample.contiguous()
    text = text.contiguous() if text is not None else first
    noise = variance_noise.contiguous() if variance_noise is not None else sample
    prev = torch.empty_like(sample)
    x0 = torch.empty_like(sample)
    numel = sample.numel()
    _cfg_ddim_kernel[(cdiv(numel, BLOCK),)](
        first, text, sample, noise, prev, x0, alpha_t, alpha_prev,
        float(guidance_scale), float(eta), float(clip_sample_range or 0.0), numel // sample.shape[0], numel,
        CFG=text is not first, PRED=PREDICTION[prediction_type], CLIP=clip_sample_range is not None,
        USE_CLIPPED=bool(use_clipped_model_output), HAS_NOISE=variance_noise is not None,
        SAMPLE_PER_BLOCK=(numel // sample.shape[0]) % BLOCK == 0, BLOCK=BLOCK, num_warps=4,
    )
    return prev, x0


def ddim_step(model_output, sample, alpha_t, alpha_prev, eta=0.0, variance_noise=None, prediction_type="epsilon",
              clip_sample_range=None, use_clipped_model_output=False):
    """One DDIM update. alpha_t/alpha_prev: fp32 (B,) tensors on sample's device (diffusion_fast.ops prepares them)."""
    return _launch(model_output, None, sample, alpha_t, alpha_prev, 1.0, eta, variance_noise, prediction_type,
                   clip_sample_range, use_clipped_model_output)


def cfg_ddim_step(noise_pred_uncond, noise_pred_text, guidance_scale, sample, alpha_t, alpha_prev, eta=0.0,
                  variance_noise=None, prediction_type="epsilon", clip_sample_range=None, use_clipped_model_output=False):
    """uncond + s * (text - uncond), then one DDIM update: one launch, one pass over the latents."""
    return _launch(noise_pred_uncond, noise_pred_text, sample, alpha_t, alpha_prev, guidance_scale, eta,
                   variance_noise, prediction_type, clip_sample_range, use_clipped_model_output)
