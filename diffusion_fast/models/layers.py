"""The convolutional building blocks: fused GroupNorm(+SiLU), resnet blocks, up/downsampling, timestep embedding.

Parameter names are diffusers' (``norm1.weight``, ``time_emb_proj``, ``conv_shortcut``, ``downsamplers.0.conv``...) so
its checkpoints load unchanged. Every GroupNorm followed by SiLU is one ``ops.group_norm_silu`` call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class GroupNorm(nn.Module):
    """GroupNorm with an optional fused SiLU, through ``diffusion_fast.ops`` (Triton on CUDA, C++ on CPU)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, silu: bool = False):
        super().__init__()
        self.num_groups, self.num_channels, self.eps, self.silu = num_groups, num_channels, eps, silu
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return ops._group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, silu={self.silu}"


class ResnetBlock2D(nn.Module):
    """GN+SiLU -> conv -> (+ time embedding) -> GN+SiLU -> conv, plus a (1x1 conv) shortcut."""

    def __init__(self, in_channels, out_channels, temb_channels, groups, eps, output_scale_factor=1.0):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps, silu=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps, silu=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, temb=None):
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.norm2(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; with padding 0 (the VAE encoder) the input is first padded on the right and bottom only."""

    def __init__(self, channels, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest 2x (or to an explicit size, for odd latent sizes) then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, output_size=None):
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling has no bf16 kernel in older torch builds
            x = x.float()
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if output_size is None else \
            F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x.to(dtype))


def timestep_embedding(timesteps, dim, flip_sin_to_cos=True, downscale_freq_shift=0.0, max_period=10000):
    """Sinusoidal embedding of (B,) timesteps, in fp32 (diffusers' get_timestep_embedding)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def guidance_scale_embedding(w, dim):
    """An LCM-distilled UNet's guidance-scale condition (diffusers' get_guidance_scale_embedding): the sinusoidal
    embedding of 1000 * ``w`` ((B,) guidance scales minus one, the pipelines' Imagen form), [sin, cos] with the
    frequencies computed in the order diffusers computes them (one ulp of f moves sin(7500 * f) by up to 5e-4), fp32."""
    if not torch.is_tensor(w) or w.dim() != 1 or not (w.is_floating_point() or w.dtype == torch.int64):
        got = f"{w.dtype} of shape {tuple(w.shape)}" if torch.is_tensor(w) else type(w).__name__
        raise TypeError(f"w must be a (B,) tensor of guidance scales (minus one), got {got}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 4:
        raise ValueError(f"dim must be an int >= 4 (the UNet's time_cond_proj_dim), got {dim!r}")
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    args = (w * 1000.0).float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 == 1 else emb


class TimestepEmbedding(nn.Module):
    """[+ cond_proj(condition)] -> linear_1 -> SiLU -> linear_2; ``cond_proj`` (no bias) is an LCM-distilled UNet's
    projection of its guidance-scale embedding (``time_cond_proj_dim``)."""

    def __init__(self, in_channels, time_embed_dim, cond_proj_dim=None):
        super().__init__()
        if cond_proj_dim is not None:
            self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False)
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x, condition=None):
        if condition is not None:
            x = x + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(x)))
