"""The Euler and ancestral Euler updates (diffusers' EulerDiscreteScheduler and EulerAncestralDiscreteScheduler
steps: SDXL's default sampler and "Euler a") in one launch each.

Each program reads a block of one sample's latent elements (model output, sample[, noise]) and that sample's sigmas
as scalars (one per sample; device tensors, so nothing is read on the host; kernels/_per_sample.py), computes in
fp32 — the churned sample (Euler with gamma > 0), x0 for the prediction type, the step — and writes prev_sample and
pred_original_sample in the model output's dtype. The arithmetic is the C++ ops' (csrc/step_math.h):
x0 = cx * x + cm * m, prev = (1 + k) x - k x0 with k = (sigma_next - sigma_hat) / sigma_hat; the ancestral step goes
down to sigma_down = sigma_next^2 / sigma (exact, where diffusers' sqrt(sigma_next^2 - sigma_up^2) cancels) and adds
sigma_up * noise.
Semantics are diffusion_fast.reference.euler_step's and euler_ancestral_step's.
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
def _euler_kernel(
    mo_ptr,  # model output, (B, *latent) contiguous
    x_ptr,  # sample, like mo_ptr (its dtype may differ)
    noise_ptr,  # the churn's or the ancestral step's noise (HAS_NOISE only), like mo_ptr
    prev_ptr, x0_ptr,  # outputs, like mo_ptr, in the model output's dtype
    sigma_ptr, sigma_next_ptr,  # fp32 (B,): this step's sigma and the next one
    gamma, s_noise,  # floats: Euler's churn (0 for none) and its noise scale
    per_sample, blocks_per_sample,  # elements per sample, cdiv(per_sample, BLOCK)
    PRED: tl.constexpr,  # 0 epsilon, 1 v_prediction, 2 sample
    ANCESTRAL: tl.constexpr,  # the ancestral step (noise always), else Euler (noise only with churn)
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n, offs, mask = sample_block(per_sample, blocks_per_sample, BLOCK)  # no block spans two samples
    sigma = tl.load(sigma_ptr + n)
    sigma_next = tl.load(sigma_next_ptr + n)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mo = tl.load(mo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        noise = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ANCESTRAL:
        sigma_up = tl.sqrt_rn(tl.div_rn(sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next),
                                        sigma * sigma))
        target = tl.div_rn(sigma_next * sigma_next, sigma)  # sigma_down
        sigma_hat = sigma
    else:
        target = sigma_next
        sigma_hat = sigma * (gamma + 1.0)
        if HAS_NOISE:  # the churn: x + s_noise * sqrt(sigma_hat^2 - sigma^2) * noise
            x = x + s_noise * tl.sqrt_rn(sigma_hat * sigma_hat - sigma * sigma) * noise
    if PRED == 0:
        x0 = x - sigma_hat * mo  # diffusers uses sigma_hat here...
    elif PRED == 1:
        c_skip = tl.div_rn(1.0, sigma * sigma + 1.0)  # ...sigma; scalars, so no divide per element
        x0 = c_skip * x - tl.div_rn(sigma, tl.sqrt_rn(sigma * sigma + 1.0)) * mo
    else:
        x0 = mo
    k = tl.div_rn(target - sigma_hat, sigma_hat)
    prev = (1.0 + k) * x - k * x0
    if ANCESTRAL:
        prev += sigma_up * noise
    tl.store(prev_ptr + offs, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _euler_step_unchecked(model_output, sample, sigma, sigma_next, noise, gamma, s_noise, prediction_type, ancestral):
    """The launch, for arguments ``diffusion_fast.ops`` has checked and prepared (sigmas as contiguous fp32 (B,)
    tensors on sample's device; noise only with churn or the ancestral step). It still refuses a device or dtype the
    kernel cannot run."""
    if sample.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("sample is on the CPU: the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1")
    for name, t in (("model_output", model_output), ("sample", sample), ("noise", noise)):
        if t is not None and t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name}: the Triton Euler kernels take float16, bfloat16 or float32, got {t.dtype}")
    mo, x = model_output.contiguous(), sample.contiguous()
    n = noise.contiguous() if noise is not None else mo
    prev = torch.empty(sample.shape, dtype=model_output.dtype, device=sample.device)
    x0 = torch.empty(sample.shape, dtype=model_output.dtype, device=sample.device)
    grid, per_sample, blocks_per_sample = sample_blocks(sample.shape, BLOCK)
    _euler_kernel[grid](
        mo, x, n, prev, x0, sigma, sigma_next, float(gamma), float(s_noise), per_sample, blocks_per_sample,
        PRED=PREDICTION[prediction_type], ANCESTRAL=ancestral, HAS_NOISE=noise is not None, BLOCK=BLOCK, num_warps=4,
    )
    return prev, x0


def euler_step(model_output, sample, sigma, sigma_next, gamma=0.0, s_noise=1.0, noise=None, prediction_type="epsilon"):
    """One Euler update on this kernel (``noise`` only with ``gamma > 0``, the churn): ``diffusion_fast.ops.euler_step``
    with backend "triton", whose checks name the argument at fault."""
    from diffusion_fast import ops

    return ops.euler_step(model_output, sample, sigma, sigma_next, gamma=gamma, s_noise=s_noise, noise=noise,
                          prediction_type=prediction_type, backend="triton")


def euler_ancestral_step(model_output, sample, sigma, sigma_next, noise, prediction_type="epsilon"):
    """One ancestral Euler update (the step down to sigma_down plus sigma_up * noise) on this kernel:
    ``diffusion_fast.ops.euler_ancestral_step`` with backend "triton", whose checks name the argument at fault."""
    from diffusion_fast import ops

    return ops.euler_ancestral_step(model_output, sample, sigma, sigma_next, noise, prediction_type=prediction_type,
                                    backend="triton")
