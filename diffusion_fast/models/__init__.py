"""Our UNet, SD3's transformer, ControlNets (plain and union), T2I-Adapters and VAEs (the KL one and TAESD): diffusers' parameter names
(its checkpoints load unchanged), our ops inside."""
from .controlnet import ControlNetModel, MultiControlNetModel
from .controlnet_sd3 import SD3ControlNetModel, SD3MultiControlNetModel
from .controlnet_union import ControlNetUnionModel
from .sd3_transformer import SD3Transformer2DModel
from .t2i_adapter import MultiAdapter, T2IAdapter
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL, DiagonalGaussianDistribution
from .vae_tiny import AutoencoderTiny

__all__ = ["UNet2DConditionModel", "SD3Transformer2DModel", "ControlNetModel", "MultiControlNetModel", "ControlNetUnionModel",
           "SD3ControlNetModel", "SD3MultiControlNetModel",
           "T2IAdapter", "MultiAdapter", "AutoencoderKL", "AutoencoderTiny", "DiagonalGaussianDistribution"]
