"""FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net"), as diffusers' ``enable_freeu`` applies it: in the
first two up-block stages of the UNet, the first half of the backbone's channels is amplified (b1, b2) and the skip
connection's lowest spatial frequencies are scaled (s1, s2) before the two are concatenated.

Set on a UNet's up blocks by ``UNet2DConditionModel.enable_freeu`` under diffusers' attribute names (s1, s2, b1,
b2), so a graphed UNet sees the change (``cuda_graph.ModuleState`` reads block settings) and a diffusers-style
``pipe.enable_freeu`` works unchanged.
"""
from __future__ import annotations

import torch

FACTORS = ("s1", "s2", "b1", "b2")


def low_frequency_scaled(x: torch.Tensor, scale: float, threshold: int = 1) -> torch.Tensor:
    """``x`` (B, C, H, W) with the centred (2 threshold)^2 block of its 2-d spectrum multiplied by ``scale``; the FFT
    runs in float32 whatever x's dtype (half-precision FFTs are inexact and need power-of-two sizes), the result is
    in x's dtype."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = spectrum.shape[-2:]
    gain = torch.ones(spectrum.shape[-2:], device=x.device)
    gain[h // 2 - threshold:h // 2 + threshold, w // 2 - threshold:w // 2 + threshold] = scale
    spectrum = torch.fft.ifftshift(spectrum * gain, dim=(-2, -1))
    return torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(x.dtype)


def freeu_factors(block):
    """(s1, s2, b1, b2) set on an up block, or None: as in diffusers, FreeU acts only when all four are set and
    nonzero."""
    values = tuple(getattr(block, name, None) for name in FACTORS)
    return values if all(values) else None


def apply_freeu(stage: int, h: torch.Tensor, skip: torch.Tensor, factors):
    """(backbone, skip) of up-block ``stage`` with FreeU's factors applied: stages 0 and 1 only."""
    if stage not in (0, 1):
        return h, skip
    s1, s2, b1, b2 = factors
    half = h.shape[1] // 2
    h = torch.cat([h[:, :half] * (b1 if stage == 0 else b2), h[:, half:]], dim=1)
    return h, low_frequency_scaled(skip, s1 if stage == 0 else s2)
