"""The DDIM update, optionally fused with the classifier-free guidance combine, in one launch.

Semantics are diffusers' DDIMScheduler.step (thresholding excluded), as written in
diffusion_fast.reference.ddim_step / cfg_ddim_step:

    eps_cfg = uncond + s * (text - uncond)                                  (CFG only)
    x0, eps = from (model_output, sample, alpha_t) for the prediction type  (epsilon / v_prediction / sample)
    x0      = clamp(x0, -clip, clip)                                        (clip only)
    std     = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    eps     = (sample - sqrt(a_t) * x0) / sqrt(1 - a_t)                     (use_clipped_model_output only)
    prev    = sqrt(a_prev) * x0 + sqrt(1 - a_prev - std^2) * eps [+ std * noise]

The grid is (blocks of one sample's elements, samples). Each program loads its sample's two alphas once (so every
sample may sit at its own timestep), derives the per-sample coefficients as scalars, then streams its block: read
uncond[, text], sample[, noise], compute in fp32, write prev_sample and pred_original_sample in the sample's dtype.
Nothing is read back on the host and the output shapes depend only on input shapes, so the launch can be captured in
a CUDA graph. Inputs that are not contiguous are copied once (the pipeline's latents and the noise_pred.chunk(2)
halves already are).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PREDICTION = {"epsilon": 0, "v_prediction": 1, "sample": 2}
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_BATCH = 65535  # the grid's second axis (one program row per sample) is limited to 65535 by CUDA


@triton.jit
def _cfg_ddim_kernel(
    first_ptr,  # (B, per_sample) contiguous: the model output, or the unconditional noise prediction when CFG
    text_ptr,  # (B, per_sample): the text-conditioned noise prediction (read only when CFG)
    sample_ptr,  # (B, per_sample): x_t
    noise_ptr,  # (B, per_sample): the variance noise (read only when HAS_NOISE)
    prev_ptr,  # (B, per_sample) output: x_{t-1}, in the sample's dtype
    x0_ptr,  # (B, per_sample) output: the predicted x_0, in the sample's dtype
    alpha_t_ptr,  # (B,) fp32: alphas_cumprod at this timestep, per sample
    alpha_prev_ptr,  # (B,) fp32: alphas_cumprod at the previous timestep (1 or alphas_cumprod[0] past the end)
    guidance_scale,  # fp32 scalar: s in uncond + s * (text - uncond)
    eta,  # fp32 scalar: DDIM's eta (0 = deterministic)
    clip_range,  # fp32 scalar: x0 is clamped to [-clip_range, clip_range] when CLIP
    per_sample,  # int: elements per sample (product of the non-batch dims)
    CFG: tl.constexpr,  # combine uncond and text first
    PRED: tl.constexpr,  # 0 epsilon, 1 v_prediction, 2 sample
    CLIP: tl.constexpr,
    USE_CLIPPED: tl.constexpr,  # re-derive eps from the clipped x0
    HAS_NOISE: tl.constexpr,  # add std * noise (eta > 0)
    BLOCK: tl.constexpr,  # elements per program
):
    block = tl.program_id(0)
    b = tl.program_id(1)
    # Per-sample coefficients, computed once per program. IEEE-rounded sqrt and division: the GPU's default
    # approximate ones make a_t / a_prev differ from 1 when a_t == a_prev (the final step without
    # set_alpha_to_one), which would leak a spurious noise term into a step that must be noise-free.
    a_t = tl.load(alpha_t_ptr + b)
    a_prev = tl.load(alpha_prev_ptr + b)
    sqrt_a = tl.sqrt_rn(a_t)
    sqrt_b = tl.sqrt_rn(1.0 - a_t)
    variance = tl.div_rn(1.0 - a_prev, 1.0 - a_t) * (1.0 - tl.div_rn(a_t, a_prev))
    std = eta * tl.sqrt_rn(variance)
    coef_x0 = tl.sqrt_rn(a_prev)
    coef_eps = tl.sqrt_rn(1.0 - a_prev - std * std)

    # int64 offsets: B * per_sample may exceed 2^31 elements.
    in_sample = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = in_sample < per_sample
    offs = b.to(tl.int64) * per_sample + in_sample
    x = tl.load(sample_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mo = tl.load(first_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        text = tl.load(text_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mo = mo + guidance_scale * (text - mo)
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
    if USE_CLIPPED:
        eps = tl.div_rn(x - sqrt_a * x0, sqrt_b)
    prev = coef_x0 * x0 + coef_eps * eps
    if HAS_NOISE:
        prev += std * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(prev_ptr + offs, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _launch(first, text, sample, alpha_t, alpha_prev, guidance_scale, eta, variance_noise, prediction_type,
            clip_sample_range, use_clipped_model_output):
    # Full argument checks live in diffusion_fast.ops; here only what would otherwise crash or silently mislead a
    # direct caller, kept to cheap Python comparisons (this runs every denoising step).
    if not sample.is_cuda and not INTERPRET:
        raise RuntimeError("sample is on the CPU: the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1")
    if sample.dtype not in KERNEL_DTYPES:
        raise TypeError(f"sample: the Triton DDIM kernel takes float16, bfloat16 or float32, got {sample.dtype}")
    pred = PREDICTION.get(prediction_type)
    if pred is None:
        raise ValueError(f"prediction_type must be one of {tuple(PREDICTION)}, got {prediction_type!r}")
    has_noise = eta > 0
    if has_noise and variance_noise is None:
        raise ValueError("variance_noise is required when eta > 0 (a tensor shaped like sample)")
    batch = sample.shape[0]
    if batch > MAX_BATCH:
        raise ValueError(f"sample has batch {batch}; the Triton DDIM kernel takes at most {MAX_BATCH}")
    sample, first = sample.contiguous(), first.contiguous()  # no-ops (no copy) for contiguous tensors
    cfg = text is not None
    text = text.contiguous() if cfg else first  # unread when CFG is off
    noise = variance_noise.contiguous() if has_noise else sample  # unread when HAS_NOISE is off
    prev = torch.empty_like(sample, memory_format=torch.contiguous_format)
    x0 = torch.empty_like(sample, memory_format=torch.contiguous_format)
    per_sample = sample.numel() // batch
    block = 512 if per_sample * batch <= (1 << 18) else 1024  # small latents: more programs to spread over SMs
    _cfg_ddim_kernel[(triton.cdiv(per_sample, block), batch)](
        first, text, sample, noise, prev, x0, alpha_t, alpha_prev,
        float(guidance_scale), float(eta), float(clip_sample_range or 0.0), per_sample,
        CFG=cfg, PRED=pred, CLIP=clip_sample_range is not None,
        USE_CLIPPED=bool(use_clipped_model_output), HAS_NOISE=has_noise, BLOCK=block, num_warps=4,
    )
    return prev, x0


def ddim_step(model_output, sample, alpha_t, alpha_prev, eta=0.0, variance_noise=None, prediction_type="epsilon",
              clip_sample_range=None, use_clipped_model_output=False):
    """One DDIM update in one launch. Returns (prev_sample, pred_original_sample), contiguous, in sample's dtype.

    alpha_t, alpha_prev: float32 (B,) contiguous tensors on sample's device (diffusion_fast.ops.ddim_step builds them
    from floats, 0-d or per-sample tensors). model_output and variance_noise: shaped and typed like sample.
    """
    return _launch(model_output, None, sample, alpha_t, alpha_prev, 1.0, eta, variance_noise, prediction_type,
                   clip_sample_range, use_clipped_model_output)


def cfg_ddim_step(noise_pred_uncond, noise_pred_text, guidance_scale, sample, alpha_t, alpha_prev, eta=0.0,
                  variance_noise=None, prediction_type="epsilon", clip_sample_range=None, use_clipped_model_output=False):
    """uncond + s * (text - uncond), then one DDIM update: one launch, one pass over the latents. Arguments as
    ``ddim_step``; returns (prev_sample, pred_original_sample)."""
    return _launch(noise_pred_uncond, noise_pred_text, sample, alpha_t, alpha_prev, guidance_scale, eta,
                   variance_noise, prediction_type, clip_sample_range, use_clipped_model_output)
