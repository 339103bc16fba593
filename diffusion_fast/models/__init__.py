"""Our UNet, ControlNet and VAE: diffusers' parameter names (its checkpoints load unchanged), our ops inside."""
from .controlnet import ControlNetModel, MultiControlNetModel
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL, DiagonalGaussianDistribution

__all__ = ["UNet2DConditionModel", "ControlNetModel", "MultiControlNetModel", "AutoencoderKL",
           "DiagonalGaussianDistribution"]
