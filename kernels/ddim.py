"""The DDIM update, optionally fused with the classifier-free guidance combine, in one launch.

Each program reads a block of one sample's latent elements (uncond[, text], sample[, noise]), loads that sample's
two alphas as scalars (one pair per sample, so per-sample timesteps work; kernels/_per_sample.py) and derives every
coefficient from them once, computes in fp32 — guidance, x0 for the prediction type, the optional clamp, the
direction and the eta noise — and writes prev_sample and pred_original_sample in the sample's dtype. The alphas are
device tensors: nothing is read on the host, so the launch can be captured in a CUDA graph.

The coefficients use IEEE square roots and divides (``sqrt_rn``, ``div_rn``: with the GPU's approximate division
a_t / a_prev is not exactly 1 when the two are equal, and a spurious noise term leaks into the last step); they are
scalars, so their cost is once per program. Per element the kernel multiplies by 1/sqrt(a_t) (or 1/sqrt(1 - a_t))
rather than dividing: one more rounding in fp32, within the 2x rule. Before, a block could span two samples, so
each program first divided its int64 offset by the sample size (a call to a 64-bit division routine, ahead of every
load) and then divided each element by sqrt(a_t) (an IEEE division with its slow-path check, per element): 600
static sm_90 instructions against the linear step's 136, for a kernel whose time in a CUDA graph is a few
microseconds of latency (72-75% of a same-size copy on the H200, where the linear step reached 92-95%). Now 400,
not yet timed on a GPU.
Semantics are diffusers' DDIMScheduler.step (see diffusion_fast.reference.ddim_step).
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
def _cfg_ddim_kernel(
    out_ptr,  # model output, or the unconditional noise prediction when CFG; (B, *latent) contiguous
    text_ptr,  # the text-conditioned noise prediction (CFG only), like out_ptr
    sample_ptr,  # x_t, (B, *latent) contiguous
    noise_ptr,  # variance noise (HAS_NOISE only), like sample
    prev_ptr, x0_ptr,  # outputs: x_{t-1} and predicted x_0, like sample
    alpha_t_ptr, alpha_prev_ptr,  # fp32 (B,): alphas_cumprod at t and at the previous timestep
    guidance_scale, eta, clip_range,  # floats
    per_sample, blocks_per_sample,  # elements per sample, cdiv(per_sample, BLOCK)
    CFG: tl.constexpr,
    PRED: tl.constexpr,  # 0 epsilon, 1 v_prediction, 2 sample
    CLIP: tl.constexpr,
    USE_CLIPPED: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n, offs, mask = sample_block(per_sample, blocks_per_sample, BLOCK)  # no block spans two samples
    a_t = tl.load(alpha_t_ptr + n)
    a_prev = tl.load(alpha_prev_ptr + n)
    x = tl.load(sample_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mo = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        text = tl.load(text_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mo = mo + guidance_scale * (text - mo)
    sqrt_a = tl.sqrt_rn(a_t)
    sqrt_b = tl.sqrt_rn(1.0 - a_t)
    if PRED == 0:
        x0 = (x - sqrt_b * mo) * tl.div_rn(1.0, sqrt_a)
        eps = mo
    elif PRED == 1:
        x0 = sqrt_a * x - sqrt_b * mo
        eps = sqrt_a * mo + sqrt_b * x
    else:
        x0 = mo
        eps = (x - sqrt_a * x0) * tl.div_rn(1.0, sqrt_b)
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    variance = tl.div_rn(1.0 - a_prev, 1.0 - a_t) * (1.0 - tl.div_rn(a_t, a_prev))
    std = eta * tl.sqrt_rn(variance)
    if USE_CLIPPED:
        eps = (x - sqrt_a * x0) * tl.div_rn(1.0, sqrt_b)
    prev = tl.sqrt_rn(a_prev) * x0 + tl.sqrt_rn(1.0 - a_prev - std * std) * eps
    if HAS_NOISE:
        prev += std * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(prev_ptr + offs, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _cfg_ddim_step_unchecked(first, text, sample, alpha_t, alpha_prev, guidance_scale, eta, variance_noise,
                             prediction_type, clip_sample_range, use_clipped_model_output):
    """The launch, for arguments ``diffusion_fast.ops`` has checked and prepared (alphas as fp32 (B,) tensors on
    sample's device; text None: no guidance). It still refuses a device or dtype the kernel cannot run."""
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
    grid, per_sample, blocks_per_sample = sample_blocks(sample.shape, BLOCK)
    _cfg_ddim_kernel[grid](
        first, text, sample, noise, prev, x0, alpha_t, alpha_prev,
        float(guidance_scale), float(eta), float(clip_sample_range or 0.0), per_sample, blocks_per_sample,
        CFG=text is not first, PRED=PREDICTION[prediction_type], CLIP=clip_sample_range is not None,
        USE_CLIPPED=bool(use_clipped_model_output), HAS_NOISE=variance_noise is not None, BLOCK=BLOCK, num_warps=4,
    )
    return prev, x0


def ddim_step(model_output, sample, alpha_t, alpha_prev, eta=0.0, variance_noise=None, prediction_type="epsilon",
              clip_sample_range=None, use_clipped_model_output=False):
    """One DDIM update on this kernel: ``diffusion_fast.ops.ddim_step`` with backend "triton", whose checks name the
    argument at fault (shapes, dtypes, alphas as floats, 0-d or (B,) tensors, eta and its noise)."""
    from diffusion_fast import ops

    return ops.ddim_step(model_output, sample, alpha_t, alpha_prev, eta=eta, variance_noise=variance_noise,
                         prediction_type=prediction_type, clip_sample_range=clip_sample_range,
                         use_clipped_model_output=use_clipped_model_output, backend="triton")


def cfg_ddim_step(noise_pred_uncond, noise_pred_text, guidance_scale, sample, alpha_t, alpha_prev, eta=0.0,
                  variance_noise=None, prediction_type="epsilon", clip_sample_range=None, use_clipped_model_output=False):
    """uncond + s * (text - uncond), then one DDIM update: one launch, one pass over the latents.
    ``diffusion_fast.ops.cfg_ddim_step`` with backend "triton", whose checks name the argument at fault."""
    from diffusion_fast import ops

    return ops.cfg_ddim_step(noise_pred_uncond, noise_pred_text, guidance_scale, sample, alpha_t, alpha_prev,
                             eta=eta, variance_noise=variance_noise, prediction_type=prediction_type,
                             clip_sample_range=clip_sample_range, use_clipped_model_output=use_clipped_model_output,
                             backend="triton")
