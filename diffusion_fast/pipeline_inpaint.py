"""Inpainting with diffusers' StableDiffusionInpaintPipeline (and StableDiffusionXLInpaintPipeline) semantics: the
same image for the same seed, image, mask, strength and weights.

Both kinds of checkpoint diffusers runs: an inpainting UNet (9 input channels: the latents, the mask and the masked
image's latents, as SD's inpainting checkpoints are trained), and a plain 4-channel UNet, whose latents outside the
mask are replaced after every step by the image's own latents noised to the next timestep. The image and mask are
resized to the output size (Lanczos for PIL images, as diffusers' image processors), the mask made grayscale and
binarized at 0.5; the masked image is the image where the mask is below 0.5. The loop is the SD pipeline's: fused
scheduler steps and, on CUDA, the step (DDIM) or the UNet call replayed from a CUDA graph, with the mask and the masked
image's latents among the graph's inputs.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import mask_crop
from .ip_adapter import ip_adapter_call
from .lora import lora_call_scale
from .pipeline import StableDiffusionPipeline
from .pipeline_img2img import StableDiffusionXLImg2ImgPipeline, _ImageToImage, preprocess_image
from .pipeline_common import numpy_images
from .schedulers.common import randn_tensor


def _resized(images, height, width, what):
    """PIL masks (one or a list) resized to (width, height) with Lanczos, or a (B, C, H, W) tensor interpolated
    (nearest) to (height, width), as diffusers' VaeImageProcessor.resize; returns a list of PIL images or a tensor."""
    import PIL.Image

    images = images if isinstance(images, (list, tuple)) else [images]
    if images and all(isinstance(im, PIL.Image.Image) for im in images):
        return [im.resize((width, height), resample=PIL.Image.LANCZOS) for im in images]
    if len(images) == 1 and torch.is_tensor(images[0]):
        tensor = images[0]
        if tensor.dim() != 4 or not tensor.is_floating_point():
            raise ValueError(f"{what}: a tensor must be a float (B, C, H, W) batch, got {tensor.dtype} of shape "
                             f"{tuple(tensor.shape)}")
        return tensor if tensor.shape[2:] == (height, width) else F.interpolate(tensor, size=(height, width))
    raise TypeError(f"{what} must be a PIL image, a list of them or a (B, C, H, W) tensor, got "
                    f"{type(images[0]).__name__}")


def image_and_mask(image, mask_image, vae_config, scale, latent_size):
    """(the image at the output size, pixels or latents; the binarized mask) for latents of ``latent_size`` (h, w),
    VAE scale ``scale``: the image's channels (the VAE's pixels or its latents) and a latent image's size checked."""
    height, width = latent_size[0] * scale, latent_size[1] * scale
    latent_channels = vae_config.latent_channels
    init_image = preprocess_image(image, scale, latent_channels, size=(height, width)).float()
    mask_condition = preprocess_mask(mask_image, height, width)
    if init_image.shape[1] not in (latent_channels, vae_config.in_channels):
        raise ValueError(f"image has {init_image.shape[1]} channels: {vae_config.in_channels} (pixels) or "
                         f"{latent_channels} (latents)")
    if init_image.shape[1] == latent_channels and tuple(init_image.shape[2:]) != tuple(latent_size):
        raise ValueError(f"image: latents of size {tuple(init_image.shape[2:])} for a {height}x{width} output "
                         f"(latents {tuple(latent_size)})")
    return init_image, mask_condition


def preprocess_mask(mask, height, width) -> torch.Tensor:
    """diffusers' mask processor: resized, grayscale (PIL's "L"), in [0, 1], binarized at 0.5: (B, 1, H, W). Numpy
    masks take the tensor path, by diffusers' grayscale rules (``numpy_images``)."""
    mask = _resized(numpy_images(mask, "mask_image", grayscale=True), height, width, "mask_image")
    if isinstance(mask, list):
        arrays = [np.array(im.convert("L")).astype(np.float32) / 255.0 for im in mask]
        mask = torch.from_numpy(np.stack(arrays))[:, None]
    elif mask.shape[1] != 1:
        raise ValueError(f"mask_image: a tensor mask has one channel, got shape {tuple(mask.shape)}")
    return (mask >= 0.5).to(mask.dtype)


class _Inpainting(_ImageToImage):
    """What both inpainting pipelines share: the UNet check, the image and mask, the latents and mask latents (as
    diffusers' prepare_latents and prepare_mask_latents make them) and a plain UNet's blend after each step."""
    _blend = None  # a 4-channel UNet's (image latents, noise, mask) during a call
    _unet_takes_mask = True

    def _check_components(self):
        super()._check_components()
        latent, unet_in = self.vae.config.latent_channels, self.unet.config.in_channels
        if unet_in not in (latent, 2 * latent + 1):
            raise ValueError(f"unet has {unet_in} input channels: an inpainting UNet takes {2 * latent + 1} (latents, "
                             f"mask, masked image latents) and a plain one {latent}")

    def _after_step(self, i, timesteps, latents):
        """A 4-channel UNet: outside the mask, the image's latents noised to the next timestep (none after the last)."""
        if self._blend is None:
            return latents
        image_latents, noise, mask = self._blend
        if i < len(timesteps) - 1:
            image_latents = self.scheduler.add_noise(image_latents, noise, timesteps[i + 1:i + 2])
        return (1 - mask) * image_latents + mask * latents

    def _encode_images(self, images, generator):
        """diffusers' _encode_vae_image: one generator per image of ``images`` when given a list."""
        if isinstance(generator, (list, tuple)):
            if len(generator) < images.shape[0]:
                raise ValueError(f"generator is a list of {len(generator)} for {images.shape[0]} images")
            return torch.cat([self._encode_image(images[i:i + 1], generator[i]) for i in range(images.shape[0])])
        return self._encode_image(images, generator)

    def _latent_shape(self, strength, image, mask_image, height, width, prompt, negative_prompt, num_inference_steps,
                      guidance_scale, num_images_per_prompt, prompt_embeds, negative_prompt_embeds, output_type):
        """The call's checks shared by SD and SDXL; the latents' shape (height and width default to the UNet's)."""
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        if image is None or mask_image is None:
            raise ValueError("image and mask_image: give both (PIL images, lists of them or tensors)")
        height = height if height is not None else self.unet.config.sample_size * self.vae_scale_factor
        width = width if width is not None else self.unet.config.sample_size * self.vae_scale_factor
        shape = self._check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, prompt_embeds, negative_prompt_embeds, None, output_type)
        return (shape[0], self.vae.config.latent_channels, *shape[2:])

    def _crop_to_mask(self, image, mask_image, padding_mask_crop, output_type, shape):
        """``padding_mask_crop`` ("inpaint only masked", as diffusers): (image, mask, box) with the box around the
        mask cut from both and resized to the output size (``mask_crop``); the box is None without the option. As in
        diffusers, it takes one PIL image and mask and PIL output."""
        import PIL.Image

        if padding_mask_crop is None:
            return image, mask_image, None
        if isinstance(padding_mask_crop, bool) or not isinstance(padding_mask_crop, int) or padding_mask_crop < 0:
            raise ValueError(f"padding_mask_crop must be a number of pixels (an int >= 0), got {padding_mask_crop!r}")
        for name, value in (("image", image), ("mask_image", mask_image)):
            if not isinstance(value, PIL.Image.Image):
                raise ValueError(f"{name} must be a PIL image with padding_mask_crop, got {type(value).__name__}")
        if output_type != "pil":
            raise ValueError(f"output_type must be 'pil' with padding_mask_crop (the result is pasted into the "
                             f"image), got {output_type!r}")
        height, width = shape[2] * self.vae_scale_factor, shape[3] * self.vae_scale_factor
        return mask_crop.cropped_inputs(image, mask_image, width, height, padding_mask_crop)

    def _paste_back(self, output, image, mask_image, box):
        """The crop's images pasted into the original image (a call with padding_mask_crop)."""
        if box is not None:
            output.images = [mask_crop.paste_back(mask_image, image, im, box) for im in output.images]
        return output

    def _image_and_mask(self, image, mask_image, masked_image_latents, shape, latents):
        """(the image at the output size, pixels or latents; the binarized mask), checked against the batch."""
        batch, latent_channels = shape[0], self.vae.config.latent_channels
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}")
        init_image, mask_condition = image_and_mask(image, mask_image, self.vae.config, self.vae_scale_factor,
                                                    shape[2:])
        if (init_image.shape[1] == latent_channels and masked_image_latents is None
                and self.unet.config.in_channels != latent_channels):
            raise ValueError("image: given as latents, it cannot be masked (as in diffusers); an inpainting UNet "
                             "then needs masked_image_latents too")
        for name, value in (("image", init_image), ("mask_image", mask_condition),
                            ("masked_image_latents", masked_image_latents)):
            if value is not None and batch % value.shape[0] != 0:  # (each is repeated to the batch)
                raise ValueError(f"{name} has {value.shape[0]} images, which does not divide the batch of {batch} "
                                 "(prompts x images per prompt)")
        return init_image, mask_condition

    def _inpaint_latents(self, init_image, mask_condition, masked_image_latents, latents, shape, timesteps, dtype,
                         generator, strength, do_cfg, add_noise=True):
        """diffusers' prepare_latents and prepare_mask_latents, drawing from the generator in their order (the
        image's latents where needed, the noise, the masked image's latents). Returns (latents, mask, masked image
        latents), and sets a plain UNet's blend for the call. ``add_noise=False`` (SDXL's denoising_start): the
        image's latents, un-noised, start the loop."""
        device, batch, latent_channels = self.device, shape[0], self.vae.config.latent_channels
        plain_unet = self.unet.config.in_channels == latent_channels
        strength_max, image_latents = strength == 1.0, None
        if plain_unet or init_image.shape[1] == latent_channels or not add_noise or (
                latents is None and not strength_max):
            pixels = init_image.to(device=device, dtype=dtype)
            image_latents = pixels if pixels.shape[1] == latent_channels else self._encode_images(pixels, generator)
            image_latents = image_latents.repeat(batch // image_latents.shape[0], 1, 1, 1)
        if latents is None or not add_noise:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            if not add_noise:
                latents = image_latents
            else:
                latents = (noise * self.scheduler.init_noise_sigma if strength_max else
                           self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch)))
        else:
            noise = latents.to(device=device, dtype=dtype)
            latents = noise * self.scheduler.init_noise_sigma

        mask = F.interpolate(mask_condition, size=shape[2:]).to(device=device, dtype=dtype)
        mask = mask.repeat(batch // mask.shape[0], 1, 1, 1) if mask.shape[0] < batch else mask
        mask = torch.cat([mask] * 2) if do_cfg else mask
        self._blend = (image_latents, noise, mask.chunk(2)[0] if do_cfg else mask) if plain_unet else None
        if masked_image_latents is not None:
            masked = masked_image_latents
        elif init_image.shape[1] != latent_channels:
            masked = init_image * (mask_condition < 0.5)
        else:  # latents given as the image cannot be masked: a plain UNet needs no masked image (checked before)
            return latents, mask, None
        masked = masked.to(device=device, dtype=dtype)
        masked = masked if masked.shape[1] == latent_channels else self._encode_images(masked, generator)
        masked = masked.repeat(batch // masked.shape[0], 1, 1, 1) if masked.shape[0] < batch else masked
        masked = torch.cat([masked] * 2) if do_cfg else masked
        return latents, mask, masked

    def _denoise_and_unblend(self, *args, **kwargs):
        try:
            return self._denoise(*args, **kwargs)
        finally:
            self._blend = None


class StableDiffusionInpaintPipeline(_Inpainting, StableDiffusionPipeline):
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents")
    _cond_names = ("mask", "masked_image_latents")  # a 9-channel UNet's extra inputs, as diffusers names them

    def _unet_call(self, model_input, t, embeds, *cond, timestep_cond=None):
        """The UNet call; a 9-channel UNet gets the mask and the masked image's latents beside the latents."""
        return self.unet(torch.cat([model_input, *cond], dim=1) if cond else model_input, t, embeds,
                         timestep_cond=timestep_cond)

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, mask_image=None, height=None, width=None, strength=1.0,
                 num_inference_steps=50, guidance_scale=7.5, negative_prompt=None, num_images_per_prompt=1, eta=0.0,
                 generator=None, latents=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
                 timesteps=None, sigmas=None, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 masked_image_latents=None, clip_skip=None, padding_mask_crop=None):
        shape = self._latent_shape(strength, image, mask_image, height, width, prompt, negative_prompt,
                                   num_inference_steps, guidance_scale, num_images_per_prompt, prompt_embeds,
                                   negative_prompt_embeds, output_type)
        clip_skip = self._check_clip_skip(clip_skip)  # (before the schedule is set: a refused call changes nothing)
        crop_image, crop_mask, box = self._crop_to_mask(image, mask_image, padding_mask_crop, output_type, shape)
        init_image, mask_condition = self._image_and_mask(crop_image, crop_mask, masked_image_latents, shape, latents)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        num_inference_steps, timesteps, do_cfg, negative_prompt_embeds, embeds = self._sd_tail_and_embeds(
            prompt, num_inference_steps, strength, timesteps, sigmas, guidance_scale, num_images_per_prompt,
            negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)
        latents, mask, masked = self._inpaint_latents(init_image, mask_condition, masked_image_latents, latents,
                                                      shape, timesteps, embeds.dtype, generator, strength, do_cfg)
        if callback is not None:
            callback.extra.update(negative_prompt_embeds=negative_prompt_embeds, mask=mask, masked_image_latents=masked)
        output = self._denoise_and_unblend(latents, timesteps, embeds,
                                           () if self._blend is not None else (mask, masked), num_inference_steps,
                                           guidance_scale, do_cfg, eta, generator, output_type, callback)
        return self._paste_back(output, image, mask_image, box)


class StableDiffusionXLInpaintPipeline(_Inpainting, StableDiffusionXLImg2ImgPipeline):
    """diffusers' StableDiffusionXLInpaintPipeline: SDXL's text and size conditioning (an aesthetic score in place of
    the target size for a refiner-style UNet, ``requires_aesthetics_score``), inpainting's image, mask and latents,
    and ``denoising_start`` / ``denoising_end`` for a base + refiner split. Both kinds of UNet: SDXL's inpainting
    UNet (9 input channels) and a plain one, blended after each step."""
    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "mask",
                               "masked_image_latents")
    _cond_names = ("add_text_embeds", "add_time_ids", "mask", "masked_image_latents")  # diffusers' names

    def _unet_call(self, model_input, t, embeds, *cond, timestep_cond=None):
        """The UNet call with SDXL's added conditioning; a 9-channel UNet also gets the mask and the masked image's
        latents beside the latents."""
        text_embeds, time_ids, *mask_inputs = cond
        if mask_inputs:
            model_input = torch.cat([model_input, *mask_inputs], dim=1)
        return self.unet(model_input, t, embeds, {"text_embeds": text_embeds, "time_ids": time_ids},
                         timestep_cond=timestep_cond)

    def _encode_image(self, pixels, generator):
        """diffusers' SDXL inpainting encode: an fp16 VAE with force_upcast encodes in fp32, then the scaling factor
        alone (image-to-image's latents_mean / latents_std are not applied here, as in diffusers)."""
        vae, dtype = self.vae, pixels.dtype
        upcast = vae.config.force_upcast and vae.dtype != torch.float32
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            latents = vae.encode(pixels.float() if vae.config.force_upcast else pixels).latent_dist.sample(generator)
        finally:
            if upcast:
                vae.to(dtype=dtype)
        return vae.config.scaling_factor * latents.to(dtype)

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, image=None, mask_image=None, masked_image_latents=None,
                 height=None, width=None, strength=0.9999, num_inference_steps=50, timesteps=None, sigmas=None,
                 denoising_start=None, denoising_end=None, guidance_scale=7.5, negative_prompt=None,
                 negative_prompt_2=None, num_images_per_prompt=1, eta=0.0, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", guidance_rescale=0.0, original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score=6.0,
                 negative_aesthetic_score=2.5, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), clip_skip=None, padding_mask_crop=None):
        """As diffusers', with its defaults: strength 0.9999 (the first step of the schedule skipped, the image's
        latents noised), guidance 7.5."""
        shape = self._latent_shape(strength, image, mask_image, height, width, prompt, negative_prompt,
                                   num_inference_steps, guidance_scale, num_images_per_prompt, prompt_embeds,
                                   negative_prompt_embeds, output_type)
        clip_skip = self._check_clip_skip(clip_skip)  # (before the schedule is set: a refused call changes nothing)
        height, width = shape[2] * self.vae_scale_factor, shape[3] * self.vae_scale_factor
        sizes = self._check_image_call(
            denoising_start, denoising_end, aesthetic_score, negative_aesthetic_score, guidance_rescale, prompt,
            prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
            negative_pooled_prompt_embeds, height, width, original_size, crops_coords_top_left, target_size,
            negative_original_size, negative_crops_coords_top_left, negative_target_size)
        crop_image, crop_mask, box = self._crop_to_mask(image, mask_image, padding_mask_crop, output_type, shape)
        init_image, mask_condition = self._image_and_mask(crop_image, crop_mask, masked_image_latents, shape, latents)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        num_inference_steps = self._set_timesteps(num_inference_steps, self.device, timesteps, sigmas)
        timesteps = self._tail(num_inference_steps, strength, denoising_start)
        do_cfg = self._guided(guidance_scale)
        embeds, cond = self._image_conditioning(
            prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, do_cfg, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, sizes, aesthetic_score,
            negative_aesthetic_score, shape[0], clip_skip)
        latents, mask, masked = self._inpaint_latents(init_image, mask_condition, masked_image_latents, latents,
                                                      shape, timesteps, embeds.dtype, generator, strength, do_cfg,
                                                      add_noise=denoising_start is None)
        timesteps = self._end_at(timesteps, denoising_end)
        if callback is not None:
            callback.extra.update(mask=mask, masked_image_latents=masked)
        cond = cond if self._blend is not None else (*cond, mask, masked)
        output = self._denoise_and_unblend(latents, timesteps, embeds, cond, num_inference_steps, guidance_scale,
                                           do_cfg, eta, generator, output_type, callback)
        return self._paste_back(output, image, mask_image, box)
