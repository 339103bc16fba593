"""The Triton kernels as opaque torch ops, for code torch.compile traces.

Eager calls launch the kernels directly (no dispatcher in the way). Inside compiled code dynamo would trace into the
launcher and Triton's runtime (under the interpreter it fails there), so ``ops`` routes the call through these ops
instead: dynamo records one node per call, and each fake gives the real output's shape and strides.
"""
from __future__ import annotations

from typing import Optional

import torch


@torch.library.custom_op("diffusion_fast_triton::group_norm_silu", mutates_args=())
def group_norm_silu(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    eps: float, silu: bool) -> torch.Tensor:
    from .kernels.group_norm_silu import group_norm_silu as kernel

    return kernel(x, num_groups, weight, bias, eps, silu=silu)


@group_norm_silu.register_fake
def _(x, num_groups, weight, bias, eps, silu):
    # the launcher keeps channels_last and reads any other layout as a contiguous copy (kernels/group_norm_silu.py)
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@torch.library.custom_op("diffusion_fast_triton::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    from .kernels import attention as kernel

    return kernel.attention(q, k, v, scale=scale)


@attention.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape)  # (B, H, Lq, D), contiguous, as the kernel returns it
