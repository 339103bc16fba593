"""Instruction-based image editing: diffusers' StableDiffusionInstructPix2PixPipeline (e.g. timbrooks/instruct-pix2pix)
and StableDiffusionXLInstructPix2PixPipeline (e.g. diffusers/sdxl-instructpix2pix-768, CosXL Edit), the same image
for the same seed, image, instruction and weights.

The UNet takes 8 channels: the latents beside the image's latents, which are the VAE posterior's mode, unscaled (as
InstructPix2Pix was trained; diffusers' "argmax"), so the image draws nothing from the generator. Guidance is
three-way: the UNet runs the instruction with the image, the negative prompt with the image, and the negative prompt
with zeros in place of the image, combined as
``uncond + guidance_scale * (text - image) + image_guidance_scale * (image - uncond)``. The loop is the SD pipeline's
(its scheduler steps, the UNet call replayed from a CUDA graph on a GPU, with the image's latents among the graph's
inputs); the three-way combine is not the fused two-way CFG step, so a DDIM step is not graphed whole. SDXL's adds
its pooled embeddings and time ids to the three rows, as diffusers does: (instruction, negative, negative) and the
same time ids thrice.
"""
from __future__ import annotations

import numpy as np
import torch

from .ip_adapter import adapter_count
from .pipeline import StableDiffusionPipeline
from .pipeline_common import rescale_noise_cfg
from .pipeline_img2img import preprocess_image
from .pipeline_xl import StableDiffusionXLPipeline, _size_pair


class _InstructPix2Pix:
    """What the SD and SDXL InstructPix2Pix pipelines share: the 8-channel UNet, three-way guidance and the image's
    latents."""
    _unet_takes_image = True
    _image_guidance_scale = 1.5  # the running call's
    is_cosxl_edit = False  # (SDXL's CosXL Edit: the image's latents scaled by the VAE's factor)

    def _check_components(self):
        super()._check_components()
        latent, unet_in = self.vae.config.latent_channels, self.unet.config.in_channels
        if unet_in != 2 * latent:
            raise ValueError(f"unet has {unet_in} input channels: an InstructPix2Pix UNet takes {2 * latent} (the "
                             "latents and the image's latents)")
        if self.unet.config.time_cond_proj_dim is not None:
            raise ValueError("unet has a time_cond_proj_dim (an LCM-distilled UNet): InstructPix2Pix guides with two "
                             "scales, not a guidance embedding")

    def _guided(self, guidance_scale):
        """diffusers' pix2pix guides when ``guidance_scale > 1`` and ``image_guidance_scale >= 1``, else runs the
        instruction with the image alone."""
        return guidance_scale > 1.0 and self._image_guidance_scale >= 1.0

    def _graph_mode(self, device, eta):
        """The UNet call at most: the three-way combine is not the whole-step graph's fused CFG step."""
        mode = super()._graph_mode(device, eta)
        return "unet" if mode == "step" else mode

    def _denoise_step(self, latents, t, embeds, cond, guidance_scale, do_cfg, eta, generator, unet=None):
        """One step: the UNet on three copies of the latents with guidance (instruction + image, negative + image,
        negative + no image), the three-way combine (then SDXL's guidance rescale), the scheduler's step."""
        model_input = torch.cat([latents] * 3) if do_cfg else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        noise_pred = (self._model_call if unet is None else unet)(model_input, t, embeds, *cond)
        if do_cfg:
            text, image, uncond = noise_pred.chunk(3)
            noise_pred = uncond + guidance_scale * (text - image) + self._image_guidance_scale * (image - uncond)
            if self._guidance_rescale > 0:
                noise_pred = rescale_noise_cfg(noise_pred, text, self._guidance_rescale)
        return self._scheduler_step(noise_pred, t, latents, eta, generator)

    def _unet_call(self, model_input, t, embeds, *cond, timestep_cond=None):
        """The UNet on the (scaled) latents beside the image's latents (after SDXL's added conditioning in
        ``cond``)."""
        *added, image_latents = cond
        return super()._unet_call(torch.cat([model_input, image_latents], dim=1), t, embeds, *added)

    def _encode_mode(self, pixels):
        """The VAE posterior's mode of ``pixels`` (an fp16 VAE with force_upcast encodes in fp32 where SDXL's
        pipeline says so)."""
        return self.vae.encode(pixels).latent_dist.mode()

    def _check_image_guidance_scale(self, image_guidance_scale):
        if (isinstance(image_guidance_scale, bool) or not isinstance(image_guidance_scale, (int, float))
                or not np.isfinite(image_guidance_scale)):
            raise TypeError(f"image_guidance_scale must be a finite float, got {image_guidance_scale!r}")
        if image_guidance_scale < 0:
            raise ValueError(f"image_guidance_scale must be >= 0, got {image_guidance_scale}")
        return float(image_guidance_scale)

    def _image_latents_for(self, image, batch, do_cfg):
        """diffusers' prepare_image_latents: the image's latents (its VAE posterior's mode, unscaled but for CosXL
        Edit; a 4-channel tensor is taken as latents), repeated whole to the batch (with several images and several
        images per prompt the images cycle, as in diffusers), then with guidance (image, image, zeros) for the three
        UNet rows."""
        image = image.to(device=self.device, dtype=self.dtype)
        if image.shape[1] != self.vae.config.latent_channels:
            image = self._encode_mode(image).to(self.vae.dtype)
            if self.is_cosxl_edit:
                image = image * self.vae.config.scaling_factor
        if batch % image.shape[0] != 0:
            raise ValueError(f"image has {image.shape[0]} images, which does not divide the batch of {batch} "
                             "(prompts x images per prompt)")
        image = torch.cat([image] * (batch // image.shape[0]))
        return torch.cat([image, image, torch.zeros_like(image)]) if do_cfg else image


class StableDiffusionInstructPix2PixPipeline(_InstructPix2Pix, StableDiffusionPipeline):
    """diffusers' StableDiffusionInstructPix2PixPipeline: its defaults (100 steps, guidance 7.5, image guidance 1.5),
    guidance only when ``guidance_scale > 1`` and ``image_guidance_scale >= 1``, the output the input image's size
    (cut to a multiple of the VAE's scale)."""
    _callback_tensor_inputs = ("latents", "prompt_embeds", "image_latents")  # diffusers' names
    _cond_names = ("image_latents",)  # the UNet's extra input: (3 with guidance x batch, 4, h, w)

    def _three_way_embeds(self, prompt, negative_prompt, num_images_per_prompt, do_cfg, prompt_embeds,
                          negative_prompt_embeds):
        """The text embeddings for the three UNet rows: (instruction, negative, negative) with guidance."""
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            [prompt] if isinstance(prompt, str) else prompt, self.device, num_images_per_prompt, do_cfg,
            negative_prompt, prompt_embeds, negative_prompt_embeds)
        embeds = (torch.cat([prompt_embeds, negative_prompt_embeds, negative_prompt_embeds]) if do_cfg
                  else prompt_embeds)
        return embeds.to(self.dtype)

    @torch.no_grad()
    def __call__(self, prompt=None, image=None, num_inference_steps=100, guidance_scale=7.5, image_guidance_scale=1.5,
                 negative_prompt=None, num_images_per_prompt=1, eta=0.0, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, output_type="pil", callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """Edit ``image`` (an RGB PIL image, a list of them, a (B, 3, H, W) tensor in [0, 1] or [-1, 1], numpy
        images, or (B, 4, h, w) latents) as ``prompt`` instructs. ``image_guidance_scale``: how closely the output
        keeps to the image (1 and above; below 1 turns guidance off, as in diffusers)."""
        if adapter_count(self.unet):
            raise ValueError("IP-Adapter: this pipeline does not run one (diffusers' pix2pix repeats its image "
                             "embeddings three ways); unload_ip_adapter() first")
        if image is None:
            raise ValueError("image: give the image to edit (an RGB PIL image, a list of them or a tensor)")
        image_guidance_scale = self._check_image_guidance_scale(image_guidance_scale)
        latent_channels = self.vae.config.latent_channels
        image = preprocess_image(image, self.vae_scale_factor, latent_channels)
        if image.shape[1] not in (3, latent_channels):
            raise ValueError(f"image has {image.shape[1]} channels: 3 (pixels) or {latent_channels} (latents)")
        scale = self.vae_scale_factor if image.shape[1] == latent_channels else 1
        height, width = image.shape[2] * scale, image.shape[3] * scale
        shape = self._check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, prompt_embeds, negative_prompt_embeds, None, output_type)
        shape = (shape[0], latent_channels, *shape[2:])
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this batch and image, got {tuple(latents.shape)}")
        self._set_guidance_rescale(0.0)  # (diffusers' pix2pix has none)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._image_guidance_scale = float(image_guidance_scale)
        do_cfg = self._guided(guidance_scale)
        embeds = self._three_way_embeds(prompt, negative_prompt, num_images_per_prompt, do_cfg, prompt_embeds,
                                        negative_prompt_embeds)
        image_latents = self._image_latents_for(image, shape[0], do_cfg)
        return self._sample(shape, embeds, (image_latents,), num_inference_steps, guidance_scale, do_cfg, eta,
                            generator, latents, output_type, callback=callback)


class StableDiffusionXLInstructPix2PixPipeline(_InstructPix2Pix, StableDiffusionXLPipeline):
    """diffusers' StableDiffusionXLInstructPix2PixPipeline: its defaults (100 steps, guidance 5, image guidance
    1.5), the output the UNet's default size unless ``height`` / ``width`` say otherwise (the image resized to it, as
    diffusers does), ``is_cosxl_edit`` (CosXL Edit's latents scaled by the VAE's factor)."""
    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "image_latents")
    _cond_names = ("add_text_embeds", "add_time_ids", "image_latents")
    _begins_at_zero = False  # (diffusers' SDXL pix2pix sets no begin index)

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, *,
                 force_zeros_for_empty_prompt=True, is_cosxl_edit=False, cuda_graph="auto", channels_last="auto"):
        self.is_cosxl_edit = bool(is_cosxl_edit)
        super().__init__(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, cuda_graph=cuda_graph,
                         channels_last=channels_last)

    @classmethod
    def from_pretrained(cls, folder, *args, is_cosxl_edit=False, **kwargs):
        """Load a diffusers StableDiffusionXLInstructPix2PixPipeline folder; ``is_cosxl_edit=True`` for CosXL Edit
        (given here as to diffusers' from_pretrained: its folder does not record it)."""
        pipe = super().from_pretrained(folder, *args, **kwargs)
        pipe.is_cosxl_edit = bool(is_cosxl_edit)
        return pipe

    def _encode_mode(self, pixels):
        """SDXL's encode: an fp16 VAE with force_upcast encodes in fp32 (and goes back to fp16)."""
        vae = self.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if not upcast:
            return super()._encode_mode(pixels)
        vae.to(dtype=torch.float32)
        try:
            return vae.encode(pixels.float()).latent_dist.mode()
        finally:
            vae.to(dtype=torch.float16)

    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, image=None, height=None, width=None, num_inference_steps=100,
                 denoising_end=None, guidance_scale=5.0, image_guidance_scale=1.5, negative_prompt=None,
                 negative_prompt_2=None, num_images_per_prompt=1, eta=0.0, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", guidance_rescale=0.0, original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """Edit ``image`` as ``prompt`` instructs, at ``height`` x ``width`` (the UNet's default size unless given:
        the image is resized to it, as diffusers does)."""
        if adapter_count(self.unet):
            raise ValueError("IP-Adapter: this pipeline does not run one (diffusers' SDXL pix2pix takes none); "
                             "unload_ip_adapter() first")
        if image is None:
            raise ValueError("image: give the image to edit (an RGB PIL image, a list of them or a tensor)")
        image_guidance_scale = self._check_image_guidance_scale(image_guidance_scale)
        default = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default, width or default
        latent_channels = self.vae.config.latent_channels
        shape = self._check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, prompt_embeds, negative_prompt_embeds, None, output_type)
        shape = (shape[0], latent_channels, *shape[2:])
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}")
        self._check_xl_inputs(prompt, prompt_2, None, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                              negative_pooled_prompt_embeds)
        pixels = preprocess_image(image, self.vae_scale_factor, latent_channels, (height, width))
        if pixels.shape[1] not in (3, latent_channels):
            raise ValueError(f"image has {pixels.shape[1]} channels: 3 (pixels) or {latent_channels} (latents)")
        self._set_guidance_rescale(guidance_rescale)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._image_guidance_scale = image_guidance_scale
        do_cfg = self._guided(guidance_scale)
        device = self.device
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            [prompt] if isinstance(prompt, str) else prompt, [prompt_2] if isinstance(prompt_2, str) else prompt_2,
            device, num_images_per_prompt, do_cfg, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
        size = (height, width)
        time_ids = self._time_ids(_size_pair("original_size", original_size or size),
                                  _size_pair("crops_coords_top_left", crops_coords_top_left),
                                  _size_pair("target_size", target_size or size), embeds.dtype)
        if do_cfg:  # as diffusers: (instruction, negative, negative), the same time ids thrice
            embeds, pooled = torch.cat([embeds, negative, negative]), torch.cat([pooled, negative_pooled,
                                                                                negative_pooled])
            time_ids = torch.cat([time_ids] * 3)
        time_ids = time_ids.to(device).repeat(shape[0], 1)
        image_latents = self._image_latents_for(pixels, shape[0], do_cfg)
        return self._sample(shape, embeds.to(self.dtype), (pooled.to(device), time_ids, image_latents),
                            num_inference_steps, guidance_scale, do_cfg, eta, generator, latents, output_type,
                            callback=callback, denoising_end=denoising_end)
