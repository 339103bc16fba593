"""The tolerances we state and how we measure them: shared by the tests, the benchmarks and ``diffusion-fast check``.

- An op's fast path passes when its error against a float64 reference is at most twice the error of plain PyTorch
  run in the same dtype, plus a small floor (flash-attention's rule).
- A whole pipeline's fast image passes against its reference image when, in fp32, the max abs pixel difference is
  at most ``PIPELINE_FP32_MAX_ABS`` (pixels in [0, 1]), and in fp16/bf16 when the PSNR is at least
  ``PIPELINE_LOWP_MIN_PSNR`` dB against the fp32 reference image. That fp32 reference runs inside ``strict_fp32()``:
  on CUDA, PyTorch lets cuDNN convolutions use TF32 (a 10-bit mantissa) for fp32 tensors by default, which would make
  the "fp32" reference itself a reduced-precision image. Both images start from the same noise, ``seed_latents()``:
  torch.randn gives different numbers for one seed in float16 than in float32 (on the CPU in torch 2.11; 2.13 and
  2.14 draw the same; CUDA's draws were not checked), so two runs with the same seed in two dtypes would otherwise
  compare two different images.
"""
from __future__ import annotations

import contextlib
import math

import torch

PIPELINE_FP32_MAX_ABS = 1e-3
PIPELINE_LOWP_MIN_PSNR = 35.0
# The floor added to the 2x rule, per dtype: a few ulps at the magnitudes our tests use (values of order 1).
TWO_X_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item()


def two_x_rule(out, ref64, torch_out, floor=None):
    """(passed, err, torch_err): |out - ref64| <= 2 * |torch_out - ref64| + floor, and out all finite."""
    floor = TWO_X_FLOOR.get(out.dtype, 1e-5) if floor is None else floor
    if not bool(torch.isfinite(out).all()):
        return False, float("nan"), max_abs_err(torch_out, ref64)
    err, base = max_abs_err(out, ref64), max_abs_err(torch_out, ref64)
    return err <= 2 * base + floor, err, base


def psnr(image, reference, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of two images with values in [0, peak] (inf when identical)."""
    image = torch.as_tensor(image, dtype=torch.float64)
    reference = torch.as_tensor(reference, dtype=torch.float64)
    mse = torch.mean((image - reference) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


@contextlib.contextmanager
def strict_fp32():
    """Inside the block, fp32 matmuls and convolutions on CUDA run in IEEE fp32, not TF32; the flags are restored."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def seed_latents(unet_config, seed: int, batch: int = 1, channels: int | None = None) -> torch.Tensor:
    """The initial latents for ``seed`` at the UNet's default size, drawn in float32 on the CPU.

    Pass them as ``latents=`` (cast to the pipeline's dtype and device) to every run that is compared across dtypes.
    A pipeline given only a generator draws its noise in its own dtype, as diffusers does, and in torch 2.11 a
    float16 draw is not the float32 draw rounded. With torch 2.11 on the CPU, a 1-step run of the tiny
    model then gave 13.1 dB between float16 and float32, for the fast path and plain PyTorch alike, and 70.0 dB from
    one noise.
    """
    channels = unet_config.in_channels if channels is None else channels  # (an inpainting UNet takes 9: pass 4)
    shape = (batch, channels, unet_config.sample_size, unet_config.sample_size)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
