"""A linear step update in one launch: ``x0 = cx * sample + cm * model_output`` and
``prev = p0 * x0 + px * sample + pm * model_output + pe * extra``, computed in fp32, written in model_output's dtype.

The DPM-Solver++, PNDM and UniPC steps (our schedulers and ``accelerate``'s fused diffusers steps) are this update
with coefficients worked out on the host, so on CUDA they run here without the C++ extension's CUDA build. The
coefficients are kernel arguments, not tensors: nothing is read on the host or copied to the device.
Semantics are ``diffusion_fast.reference.linear_step``'s.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._host import cdiv

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 1024


@triton.jit
def _linear_step_kernel(
    mo_ptr,  # model output, (numel,) contiguous, fp16/bf16/fp32
    x_ptr,  # sample, like mo_ptr (its dtype may differ: the schedulers pass an fp32 sample with fp16 outputs)
    extra_ptr,  # the extra term (HAS_EXTRA only), like mo_ptr
    prev_ptr, x0_ptr,  # outputs, (numel,) contiguous, model output's dtype
    cx, cm, p0, px, pm, pe,  # floats: the update's coefficients
    numel,
    HAS_EXTRA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    mo = tl.load(mo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = cx * x + cm * mo
    prev = p0 * x0 + px * x + pm * mo
    if HAS_EXTRA:
        prev += pe * tl.load(extra_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(prev_ptr + offs, prev.to(prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def linear_step(model_output, sample, extra=None, *, cx, cm, p0, px, pm=0.0, pe=0.0):
    """(prev, x0) of the update above on this kernel: ``diffusion_fast.ops.linear_step`` with backend "triton", whose
    checks name the argument at fault (shapes, dtypes, non-finite coefficients)."""
    from diffusion_fast import ops

    return ops.linear_step(model_output, sample, extra, cx=cx, cm=cm, p0=p0, px=px, pm=pm, pe=pe, backend="triton")


def _linear_step_unchecked(model_output, sample, extra, *, cx, cm, p0, px, pm, pe):
    """(prev, x0), contiguous, in model_output's dtype, for inputs ``diffusion_fast.ops.linear_step`` has checked (the
    same shape on the same device); any layout is read through one contiguous copy. It still refuses a device or
    dtype the kernel cannot run."""
    if sample.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("sample is on the CPU: the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1")
    for name, t in (("model_output", model_output), ("sample", sample), ("extra", extra)):
        if t is not None and t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name}: the Triton linear_step kernel takes float16, bfloat16 or float32, got {t.dtype}")
    mo, x = model_output.contiguous(), sample.contiguous()
    e = extra.contiguous() if extra is not None else mo
    prev = torch.empty(sample.shape, dtype=model_output.dtype, device=sample.device)
    x0 = torch.empty(sample.shape, dtype=model_output.dtype, device=sample.device)
    numel = sample.numel()
    if numel:
        _linear_step_kernel[(cdiv(numel, BLOCK),)](
            mo, x, e, prev, x0, float(cx), float(cm), float(p0), float(px), float(pm), float(pe), numel,
            HAS_EXTRA=extra is not None, BLOCK=BLOCK, num_warps=4,
        )
    return prev, x0
