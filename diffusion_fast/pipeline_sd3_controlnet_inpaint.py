"""SD3 inpainting by an inpainting ControlNet (alimama's SD3 ControlNet-Inpainting: one extra conditioning channel),
with diffusers' StableDiffusion3ControlNetInpaintingPipeline semantics: the same image for the same seed, image,
mask and weights.

The transformer is SD3's own and samples from noise (no strength, no blending): the net sees the image with the
masked pixels set to -1, encoded by the VAE (sampled from its posterior with the global generator, once for both
guidance halves as diffusers does it), shifted and scaled, beside the inverted mask at the latents' size
(``1 - mask``: 17 channels). The nets see the pooled text as zeros unless ``controlnet_pooled_projections`` are given.
The rest (the nets' scales and schedule, the loop, the CUDA graph) is the ControlNet pipeline's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .pipeline_img2img import preprocess_image
from .pipeline_inpaint import preprocess_mask
from .pipeline_sd3_controlnet import StableDiffusion3ControlNetPipeline


class StableDiffusion3ControlNetInpaintingPipeline(StableDiffusion3ControlNetPipeline):
    _inpainting = True

    def _net_pooled(self, pooled, given):
        """Zeros unless projections are given (diffusers' inpainting pipeline, whatever the net's config)."""
        return given if given is not None else torch.zeros_like(pooled)

    def _control_latents(self, image, mask, height, width, batch, num_images_per_prompt, do_cfg, i):
        """diffusers' prepare_image_with_mask for net ``i``'s image (a tensor as it is, else resized and mapped to
        [-1, 1]) and the mask (a tensor as it is, else resized, grayscale, binarized): both repeated to the batch,
        the masked pixels set to -1, encoded, sampled with the global generator, shifted and scaled, then the
        inverted mask at the latents' size beside them; doubled under guidance."""
        name = "control_image" if len(self._nets) == 1 else f"control_image {i}"
        pixels = image if torch.is_tensor(image) else preprocess_image(image, self.vae_scale_factor, None,
                                                                        (height, width))
        mask = mask if torch.is_tensor(mask) else preprocess_mask(mask, height, width)
        if pixels.dim() != 4 or pixels.shape[1] != self.vae.config.in_channels:
            raise ValueError(f"{name} must be images with {self.vae.config.in_channels} channels (B, C, H, W), got "
                             f"shape {tuple(pixels.shape)}")
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != pixels.shape[2:]:
            raise ValueError(f"control_mask must be (B, 1, H, W) masks the size of {name} "
                             f"{tuple(pixels.shape[2:])}, got shape {tuple(mask.shape)}")
        for what, value in ((name, pixels), ("control_mask", mask)):
            if value.shape[0] not in (1, batch):
                raise ValueError(f"{what} has {value.shape[0]} images for {batch} prompts: give one, or one per "
                                 "prompt")
        total = batch * num_images_per_prompt
        pixels, mask = ((x.repeat_interleave(total if x.shape[0] == 1 else num_images_per_prompt, dim=0)
                         .to(device=self.device, dtype=self.transformer.dtype)) for x in (pixels, mask))
        masked = torch.where(mask > 0.5, -1.0, pixels)
        c = self.vae.config
        latents = (self._vae(masked.device).encode(masked).latent_dist.sample() - (c.shift_factor or 0.0)) \
            * c.scaling_factor
        mask = 1 - F.interpolate(mask, size=latents.shape[2:])  # (nearest, to the latents' size)
        control = torch.cat([latents.to(self.transformer.dtype), mask], dim=1)
        return torch.cat([control] * 2) if do_cfg else control
