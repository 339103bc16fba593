"""Our UNet and VAE: diffusers' parameter names (its checkpoints load unchanged), our ops inside."""
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL, DiagonalGaussianDistribution

__all__ = ["UNet2DConditionModel", "AutoencoderKL", "DiagonalGaussianDistribution"]
