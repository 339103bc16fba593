"""The DDPM ancestral update (diffusers' DDPMScheduler.step, fixed variances) in one launch.

Each program reads a block of one sample's latent elements (model output, sample[, noise]) and that sample's alphas
and noise scale as scalars (one per sample; device tensors, so nothing is read on the host; kernels/_per_sample.py),
computes in fp32 — x0 for the prediction type, the optional clamp, the posterior mean and the noise — and writes
prev_sample and pred_original_sample in the sample's dtype. Semantics are diffusion_fast.reference.ddpm_step's.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._per_sample import sample_block, sample_blocks

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 1024
PREDICTION = {"epsilon": 0, "v_prediction": 1, "sample": 2}


@triton.jit
def _ddpm_kernel(
    mo_ptr,  # model output, (B, *latent) contiguous
    x_ptr,  # x_t, like mo_ptr
    noise_ptr,  # variance noise (HAS_NOISE only), like mo_ptr
    prev_ptr, x0_ptr,  # outputs: x_{t-1} and predicted x_0, like x_ptr
    alpha_t_ptr, alpha_prev_ptr, std_ptr,  # fp32 (B,): alphas_cumprod at t and at the previous timestep; noise scale
    clip_range,  # float
    per_sample, blocks_per_sample,  # elements per sample, cdiv(per_sample, BLOCK)
    PRED: tl.constexpr,  # 0 epsilon, 1 v_prediction, 2 sample
    CLIP: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n, offs, mask = sample_block(per_sample, blocks_per_sample, BLOCK)  # no block spans two samples
    a_t = tl.load(alpha_t_ptr + n)
    a_prev = tl.load(alpha_prev_ptr + n)
    std = tl.load(std_ptr + n)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mo = tl.load(mo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sqrt_a = tl.sqrt_rn(a_t)
    sqrt_b = tl.sqrt_rn(1.0 - a_t)
    if PRED == 0:
        x0 = (x - sqrt_b * mo) * tl.div_rn(1.0, sqrt_a)  # a reciprocal once, a multiply per element
    elif PRED == 1:
        x0 = sqrt_a * x - sqrt_b * mo
    else:
        x0 = mo
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    current_alpha = tl.div_rn(a_t, a_prev)
    x0_coeff = tl.div_rn(tl.sqrt_rn(a_prev) * (1.0 - current_alpha), 1.0 - a_t)
    sample_coeff = tl.div_rn(tl.sqrt_rn(current_alpha) * (1.0 - a_prev), 1.0 - a_t)
    prev = x0_coeff * x0 + sample_coeff * x
    if HAS_NOISE:
        prev += std * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(prev_ptr + offs, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def ddpm_step(model_output, sample, alpha_t, alpha_prev, std=0.0, variance_noise=None, prediction_type="epsilon",
              clip_sample_range=None):
    """One DDPM update on this kernel: ``diffusion_fast.ops.ddpm_step`` with backend "triton", whose checks name the
    argument at fault (shapes, dtypes, the coefficients as floats, 0-d or (B,) tensors, std and its noise)."""
    from diffusion_fast import ops

    return ops.ddpm_step(model_output, sample, alpha_t, alpha_prev, std=std, variance_noise=variance_noise,
                         prediction_type=prediction_type, clip_sample_range=clip_sample_range, backend="triton")


def _ddpm_step_unchecked(model_output, sample, alpha_t, alpha_prev, std, variance_noise, prediction_type,
                         clip_sample_range):
    """The launch, for arguments ``diffusion_fast.ops`` has checked and prepared (alpha_t, alpha_prev, std:
    contiguous fp32 (B,) tensors on sample's device; variance_noise None: no noise term, the last step). It still
    refuses a device or dtype the kernel cannot run."""
    if sample.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("sample is on the CPU: the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1")
    if sample.dtype == torch.float64:
        raise TypeError("sample: the Triton DDPM kernel takes float16, bfloat16 or float32, got float64")
    mo, x = model_output.contiguous(), sample.contiguous()
    noise = variance_noise.contiguous() if variance_noise is not None else x
    prev, x0 = torch.empty_like(x), torch.empty_like(x)
    grid, per_sample, blocks_per_sample = sample_blocks(x.shape, BLOCK)
    _ddpm_kernel[grid](
        mo, x, noise, prev, x0, alpha_t, alpha_prev, std, float(clip_sample_range or 0.0), per_sample,
        blocks_per_sample,
        PRED=PREDICTION[prediction_type], CLIP=clip_sample_range is not None, HAS_NOISE=variance_noise is not None,
        BLOCK=BLOCK, num_warps=4,
    )
    return prev, x0
