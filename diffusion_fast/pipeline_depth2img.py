"""Depth-guided image-to-image: diffusers' StableDiffusionDepth2ImgPipeline (stabilityai/stable-diffusion-2-depth),
the same image for the same seed, image, prompt and weights.

The UNet takes 5 channels: the latents beside a depth map of the image at the latents' size, scaled to [-1, 1] per
image. The depth map is the folder's depth estimator's (transformers' DPTForDepthEstimation on its
DPTImageProcessor's pixels), or one given as ``depth_map``. The rest is image-to-image: the image's noised latents
at ``strength``, two-way CFG, so DDIM runs the fused CFG step and on a GPU the whole step replays from one CUDA graph
with the depth map among its inputs.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .ip_adapter import adapter_count
from .lora import lora_call_scale
from .pipeline_folder import ComponentLoader, read_model_index
from .pipeline_img2img import StableDiffusionImg2ImgPipeline


class StableDiffusionDepth2ImgPipeline(StableDiffusionImg2ImgPipeline):
    """diffusers' StableDiffusionDepth2ImgPipeline: its defaults (strength 0.8, 50 steps, guidance 7.5)."""
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "depth_mask")  # diffusers'
    _cond_names = ("depth_mask",)  # the UNet's extra input: (rows, 1, h, w)
    _unet_takes_image = True

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, depth_estimator=None, feature_extractor=None, *,
                 cuda_graph="auto", channels_last="auto"):
        self.depth_estimator = depth_estimator
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, cuda_graph=cuda_graph,
                         channels_last=channels_last)
        self.feature_extractor = feature_extractor  # (the depth estimator's image processor; no safety checker)

    def _check_components(self):
        super()._check_components()
        latent, unet_in = self.vae.config.latent_channels, self.unet.config.in_channels
        if unet_in != latent + 1:
            raise ValueError(f"unet has {unet_in} input channels: a depth-to-image UNet takes {latent + 1} (the "
                             "latents and the depth map)")
        if self.depth_estimator is not None and not callable(self.depth_estimator):
            raise TypeError(f"depth_estimator must be a depth model (transformers' DPTForDepthEstimation), got "
                            f"{type(self.depth_estimator).__name__}")

    def _models(self):
        models = super()._models()
        extra = (self.depth_estimator,) if self.depth_estimator is not None else ()
        return dict(models, moved=(*models["moved"], *extra))

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None, *, variant=None, cuda_graph="auto",
                        channels_last="auto", **components):
        """Load a diffusers StableDiffusionDepth2ImgPipeline folder: the SD components, ``depth_estimator/`` and
        ``feature_extractor/`` (both optional: without them, each call gives ``depth_map``)."""
        from transformers import AutoImageProcessor, CLIPTextModel, DPTForDepthEstimation

        folder, index = read_model_index(folder)
        depth = ("depth_estimator", "feature_extractor")
        load = ComponentLoader(folder, index, ("unet", "vae", "text_encoder", "tokenizer", "scheduler", *depth), depth,
                               components, dtype, device, variant)
        return cls(load("unet"), load("vae"), load("text_encoder", CLIPTextModel), load("tokenizer"),
                   load("scheduler"), load("depth_estimator", DPTForDepthEstimation),
                   load("feature_extractor", AutoImageProcessor), cuda_graph=cuda_graph, channels_last=channels_last)

    def _unet_call(self, model_input, t, embeds, *cond, timestep_cond=None):
        """The UNet on the (scaled) latents beside the depth map."""
        (depth_mask,) = cond
        return self.unet(torch.cat([model_input, depth_mask], dim=1), t, embeds, timestep_cond=timestep_cond)

    def _depth_mask(self, image, depth_map, latent_size, batch, do_cfg, dtype):
        """diffusers' prepare_depth_map: the estimator's depth (or ``depth_map``), bicubic to the latents' size,
        scaled to [-1, 1] per image, repeated whole to the batch, doubled with guidance."""
        device = self.device
        if depth_map is None:
            if self.depth_estimator is None or self.feature_extractor is None:
                raise ValueError("depth_map: this pipeline has no depth estimator (or no feature extractor for it): "
                                 "give the depth map, a (B, H, W) tensor")
            images = list(image) if isinstance(image, (list, tuple)) or torch.is_tensor(image) else [image]
            pixels = self.feature_extractor(images=images, return_tensors="pt").pixel_values.to(device, dtype)
            # (as diffusers: under autocast to the pipeline's dtype; DPT-Hybrid's batch norms do not run in fp16)
            autocast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
            with autocast:
                depth_map = self.depth_estimator(pixels).predicted_depth
        elif not torch.is_tensor(depth_map) or depth_map.dim() != 3 or not depth_map.is_floating_point():
            got = (f"{depth_map.dtype} of shape {tuple(depth_map.shape)}" if torch.is_tensor(depth_map)
                   else type(depth_map).__name__)
            raise ValueError(f"depth_map must be a float (B, H, W) tensor, got {got}")
        depth_map = depth_map.to(device=device, dtype=dtype)
        if batch % depth_map.shape[0] != 0:
            raise ValueError(f"depth_map has {depth_map.shape[0]} maps, which does not divide the batch of {batch}")
        depth_map = torch.nn.functional.interpolate(depth_map.unsqueeze(1), size=latent_size, mode="bicubic",
                                                    align_corners=False)
        low = torch.amin(depth_map, dim=[1, 2, 3], keepdim=True)
        high = torch.amax(depth_map, dim=[1, 2, 3], keepdim=True)
        depth_map = (2.0 * (depth_map - low) / (high - low) - 1.0).to(dtype)
        depth_map = depth_map.repeat(batch // depth_map.shape[0], 1, 1, 1)
        return torch.cat([depth_map] * 2) if do_cfg else depth_map

    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, depth_map=None, strength=0.8, num_inference_steps=50,
                 guidance_scale=7.5, negative_prompt=None, num_images_per_prompt=1, eta=0.0, generator=None,
                 prompt_embeds=None, negative_prompt_embeds=None, output_type="pil", callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), clip_skip=None):
        """Remake ``image`` as ``prompt`` says, keeping its depth: the depth estimator's map of it, or ``depth_map``
        ((B, H, W), any range: it is scaled to [-1, 1] per map)."""
        if adapter_count(self.unet):
            raise ValueError("IP-Adapter: diffusers' depth-to-image pipeline takes none; unload_ip_adapter() first")
        if torch.is_tensor(image) and (image.dim() != 4 or image.shape[1] != 3):
            raise ValueError(f"image: a tensor must be a (B, 3, H, W) RGB batch (the depth estimator reads its "
                             f"pixels), got shape {tuple(image.shape)}")
        original = image
        image, _, height, width = self._prepare_image(image, strength)
        shape = self._check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, prompt_embeds, negative_prompt_embeds, None, output_type)
        clip_skip = self._check_clip_skip(clip_skip)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        do_cfg = self._guided(guidance_scale)
        depth_mask = self._depth_mask(_as_estimator_input(original), depth_map, tuple(shape[2:]), shape[0], do_cfg,
                                      self.dtype)
        num_inference_steps, timesteps, do_cfg, negative_prompt_embeds, embeds = self._sd_tail_and_embeds(
            prompt, num_inference_steps, strength, None, None, guidance_scale, num_images_per_prompt,
            negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)
        if callback is not None:
            callback.extra["negative_prompt_embeds"] = negative_prompt_embeds
        latents = self._image_latents(image, False, timesteps[:1].repeat(shape[0]), shape[0], embeds.dtype, generator)
        return self._denoise(latents, timesteps, embeds, (depth_mask,), num_inference_steps, guidance_scale, do_cfg,
                             eta, generator, output_type, callback)


def _as_estimator_input(image):
    """The image as diffusers hands it to the depth estimator's processor: PIL images and tensors as given, numpy
    images as a list of (H, W, 3) arrays."""
    if isinstance(image, np.ndarray):
        return list(image) if image.ndim == 4 else [image]
    return image
