"""Image-to-image with diffusers' StableDiffusionImg2ImgPipeline (and StableDiffusionXLImg2ImgPipeline) semantics:
the same image for the same seed, image, strength and weights.

The initial image is prepared as diffusers' image processor prepares it (an RGB PIL image is cut down to a multiple of
the VAE's scale with Lanczos resampling; pixels to [-1, 1]), encoded by the VAE and sampled from its posterior with the
generator, scaled, and noised with the scheduler's ``add_noise`` to the first timestep of the schedule's last
``strength`` part. The loop then runs the SD pipeline's denoising over that part (fused steps, CUDA graphs) and
decodes. A scheduler that keeps a step index is told where the run begins (``set_begin_index``), as diffusers does.
"""
from __future__ import annotations

import numpy as np
import torch

from .ip_adapter import ip_adapter_call
from .lora import lora_call_scale
from .pipeline import StableDiffusionPipeline
from .pipeline_common import check_denoising_bounds, numpy_images
from .pipeline_xl import StableDiffusionXLPipeline, _size_pair
from .schedulers.common import randn_tensor


def preprocess_image(image, scale: int, latent_channels: int | None, size=None, resample="lanczos") -> torch.Tensor:
    """diffusers' VaeImageProcessor.preprocess for RGB PIL images (one or a list) and (B, C, H, W) tensors: PIL images
    are resized down to a multiple of ``scale`` (Lanczos; an image already there is copied unchanged), stacked, and
    mapped from [0, 1] to [-1, 1]; a tensor whose values are all >= 0 is taken as [0, 1] and mapped too, one with
    negative values as [-1, 1] already, and one of ``latent_channels`` channels as latents (left as they are).
    With ``size`` (height, width), as inpainting asks, PIL images are resized to it and a tensor of another size is
    interpolated (nearest) to it, unless it is latents; without it a pixel tensor is cut to a multiple of ``scale``
    the same way. Numpy arrays (``numpy_images``) take the tensor path, as pixels. ``resample``: the PIL filter,
    diffusers' image processor's setting ("bicubic" for the x4 upscaler); ``latent_channels`` None: pixels only."""
    import PIL.Image

    pixels = numpy_images(image, "image")  # (numpy arrays are pixels, never latents, as in diffusers)
    if pixels is not image and pixels.shape[1] != 3:
        raise ValueError(f"image: numpy images are RGB (H, W, 3) arrays, got {pixels.shape[1]} channels")
    image = pixels
    images = image if isinstance(image, (list, tuple)) else [image]
    if images and all(isinstance(im, PIL.Image.Image) for im in images):
        modes = sorted({im.mode for im in images} - {"RGB"})
        if modes:
            raise ValueError(f"image: RGB images only (got mode {modes[0]}); convert them with image.convert('RGB')")
        if size is not None:
            height, width = size
        elif len({im.size for im in images}) > 1:
            raise ValueError(f"image: the images differ in size ({sorted({im.size for im in images})})")
        else:
            width, height = (x - x % scale for x in images[0].size)
        if width == 0 or height == 0:
            raise ValueError(f"image is {images[0].size[0]}x{images[0].size[1]}: smaller than the VAE's scale {scale}")
        filters = {"lanczos": PIL.Image.LANCZOS, "bicubic": PIL.Image.BICUBIC}
        arrays = [np.array(im.resize((width, height), resample=filters[resample])).astype(np.float32) / 255.0
                  for im in images]
        return 2.0 * torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2)) - 1.0
    if torch.is_tensor(image):
        if image.dim() != 4 or not image.is_floating_point():
            raise ValueError(f"image: a tensor must be a float (B, C, H, W) batch, got {image.dtype} of shape "
                             f"{tuple(image.shape)}")
        # pixels resized (nearest) to the size asked, else cut to a multiple of the scale, as diffusers does; latents
        # are left as they are
        size = size if size is not None else tuple(x - x % scale for x in image.shape[2:])
        if image.shape[1] != latent_channels and tuple(image.shape[2:]) != tuple(size):
            if 0 in size:
                raise ValueError(f"image is {tuple(image.shape[2:])}: smaller than the VAE's scale {scale}")
            image = torch.nn.functional.interpolate(image, size=tuple(size))
        return image if image.shape[1] == latent_channels or image.min() < 0 else 2.0 * image - 1.0
    raise TypeError(f"image must be an RGB PIL image, a list of them, a (B, C, H, W) tensor or numpy RGB images, got "
                    f"{type(image).__name__}")


class _ImageToImage:
    """What both image-to-image pipelines share: the initial image, the strength's tail of the schedule, and the
    noised latents of the image (diffusers' preprocess, get_timesteps and prepare_latents)."""

    def _prepare_image(self, image, strength, size=None):
        """(image tensor, whether it is latents, the output height and width), checked; PIL images resized to
        ``size`` (height, width) when given, as diffusers' preprocess does with a height and width."""
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        if image is None:
            raise ValueError("image: give the initial image (an RGB PIL image, a list of them or a tensor)")
        image = preprocess_image(image, self.vae_scale_factor, self.unet.config.in_channels, size)
        latent_input = image.shape[1] == self.unet.config.in_channels  # latents given instead of pixels
        if not latent_input and image.shape[1] != self.vae.config.in_channels:
            raise ValueError(f"image has {image.shape[1]} channels: {self.vae.config.in_channels} (pixels) or "
                             f"{self.unet.config.in_channels} (latents)")
        scale = self.vae_scale_factor if latent_input else 1  # the output image's size
        return image, latent_input, image.shape[2] * scale, image.shape[3] * scale

    def _tail(self, num_inference_steps, strength, denoising_start=None):
        """diffusers' get_timesteps: the set schedule's last ``strength`` part, or with ``denoising_start`` its steps
        below that fraction's cutoff (strength is then ignored, as in diffusers), its start told to the
        scheduler."""
        if denoising_start is not None:
            timesteps = self.scheduler.timesteps
            steps = int((timesteps < self._cutoff(denoising_start)).sum())
            if getattr(self.scheduler, "order", 1) == 2 and steps % 2 == 0:
                steps += 1  # (diffusers: a second-order scheduler's cut must not split a step's two calls)
            if steps == 0:
                raise ValueError(f"denoising_start={denoising_start} leaves no denoising step of this schedule: "
                                 "lower it")
            begin = len(timesteps) - steps
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(begin)
            return timesteps[begin:]
        steps = min(int(num_inference_steps * strength), num_inference_steps)
        if steps == 0:
            raise ValueError(f"strength {strength} x num_inference_steps {num_inference_steps} leaves no denoising "
                             "step: raise either")
        begin = (num_inference_steps - steps) * getattr(self.scheduler, "order", 1)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(begin)
        return self.scheduler.timesteps[begin:]

    def _sd_tail_and_embeds(self, prompt, num_inference_steps, strength, timesteps, sigmas, guidance_scale,
                            num_images_per_prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                            clip_skip=None):
        """SD's (not SDXL's) start of an image-to-image or inpainting call: the schedule's ``strength`` tail and the
        text embeddings (``clip_skip`` checked by the caller). Returns (num_inference_steps, timesteps, do_cfg,
        negative_prompt_embeds, embeds)."""
        num_inference_steps = self._set_timesteps(num_inference_steps, self.device, timesteps, sigmas)
        timesteps = self._tail(num_inference_steps, strength)
        do_cfg = self._guided(guidance_scale)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            [prompt] if isinstance(prompt, str) else prompt, self.device, num_images_per_prompt, do_cfg,
            negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)
        embeds = (torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds).to(self.dtype)
        return num_inference_steps, timesteps, do_cfg, negative_prompt_embeds, embeds

    def _encode_image(self, pixels, generator):
        """The scaled latents of ``pixels``, sampled from the VAE posterior with ``generator``."""
        return self.vae.config.scaling_factor * self.vae.encode(pixels).latent_dist.sample(generator)

    def _image_latents(self, image, latent_input, timestep, batch, dtype, generator, add_noise=True):
        """diffusers' prepare_latents: the image's latents (encoded, or given), repeated to the batch, noised to
        ``timestep`` with noise drawn as diffusers draws it (not with ``add_noise=False``: a refiner taking over
        partly denoised latents at ``denoising_start``)."""
        device = self.device
        image = image.to(device=device, dtype=dtype)
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise ValueError(f"generator is a list of {len(generator)} but the batch is {batch} (prompts x images "
                             "per prompt)")
        if batch % image.shape[0] != 0:
            raise ValueError(f"image has {image.shape[0]} images, which does not divide the batch of {batch} "
                             "(prompts x images per prompt)")
        if latent_input:
            latents = image
        elif isinstance(generator, (list, tuple)):  # one generator per image: encoded one by one
            image = torch.cat([image] * (batch // image.shape[0]))
            latents = torch.cat([self._encode_image(image[i:i + 1], generator[i]) for i in range(batch)])
        else:
            latents = self._encode_image(image, generator)
        # contiguous, as every later step's latents are: a channels_last VAE's layout would give the loop's first
        # step its own graph signature (a second CUDA-graph capture)
        latents = torch.cat([latents] * (batch // latents.shape[0])).contiguous()
        if not add_noise:
            return latents
        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(latents, noise, timestep)


class StableDiffusionImg2ImgPipeline(_ImageToImage, StableDiffusionPipeline):
    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, strength=0.8, num_inference_steps=50, guidance_scale=7.5,
                 negative_prompt=None, num_images_per_prompt=1, eta=0.0, generator=None, prompt_embeds=None,
                 negative_prompt_embeds=None, output_type="pil", timesteps=None, sigmas=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), clip_skip=None):
        image, latent_input, height, width = self._prepare_image(image, strength)
        shape = self._check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, prompt_embeds, negative_prompt_embeds, None, output_type)
        clip_skip = self._check_clip_skip(clip_skip)  # (before the schedule is set: a refused call changes nothing)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        num_inference_steps, timesteps, do_cfg, negative_prompt_embeds, embeds = self._sd_tail_and_embeds(
            prompt, num_inference_steps, strength, timesteps, sigmas, guidance_scale, num_images_per_prompt,
            negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)
        if callback is not None:
            callback.extra["negative_prompt_embeds"] = negative_prompt_embeds
        latents = self._image_latents(image, latent_input, timesteps[:1].repeat(shape[0]), shape[0], embeds.dtype,
                                      generator)
        return self._denoise(latents, timesteps, embeds, (), num_inference_steps, guidance_scale, do_cfg, eta,
                             generator, output_type, callback)


class StableDiffusionXLImg2ImgPipeline(_ImageToImage, StableDiffusionXLPipeline):
    """diffusers' StableDiffusionXLImg2ImgPipeline, on an SDXL base folder or a refiner's (the second text encoder
    alone, and time ids with an aesthetic score: ``requires_aesthetics_score``): SDXL's text conditioning,
    image-to-image's start. ``denoising_start`` takes over a base pipeline's ``denoising_end`` latents (diffusers'
    ensemble of expert denoisers)."""
    _takes_aesthetic_score = True

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, image=None, strength=0.3, num_inference_steps=50,
                 guidance_scale=5.0, negative_prompt=None, negative_prompt_2=None, num_images_per_prompt=1, eta=0.0,
                 generator=None, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score=6.0,
                 negative_aesthetic_score=2.5, timesteps=None, sigmas=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), guidance_rescale=0.0, denoising_start=None,
                 denoising_end=None, clip_skip=None):
        """As diffusers': ``denoising_start`` / ``denoising_end`` (fractions in (0, 1)) run only that part of the
        schedule, the image's latents taken as they are (not noised) with a start; ``aesthetic_score`` and
        ``negative_aesthetic_score`` condition a refiner (``requires_aesthetics_score``) and nothing else."""
        image, latent_input, height, width = self._prepare_image(image, strength)
        shape = self._check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, prompt_embeds, negative_prompt_embeds, None, output_type)
        clip_skip = self._check_clip_skip(clip_skip)  # (before the schedule is set: a refused call changes nothing)
        sizes = self._check_image_call(
            denoising_start, denoising_end, aesthetic_score, negative_aesthetic_score, guidance_rescale, prompt,
            prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
            negative_pooled_prompt_embeds, height, width, original_size, crops_coords_top_left, target_size,
            negative_original_size, negative_crops_coords_top_left, negative_target_size)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        num_inference_steps = self._set_timesteps(num_inference_steps, self.device, timesteps, sigmas)
        timesteps = self._tail(num_inference_steps, strength, denoising_start)
        do_cfg = self._guided(guidance_scale)
        embeds, cond = self._image_conditioning(
            prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, do_cfg, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, sizes, aesthetic_score,
            negative_aesthetic_score, shape[0], clip_skip)
        latents = self._image_latents(image, latent_input, timesteps[:1].repeat(shape[0]), shape[0], embeds.dtype,
                                      generator, add_noise=denoising_start is None)
        timesteps = self._end_at(timesteps, denoising_end)
        return self._denoise(latents, timesteps, embeds, cond, num_inference_steps, guidance_scale, do_cfg, eta,
                             generator, output_type, callback)

    def _check_image_call(self, denoising_start, denoising_end, aesthetic_score, negative_aesthetic_score,
                          guidance_rescale, prompt, prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                          pooled_prompt_embeds, negative_pooled_prompt_embeds, height, width, original_size,
                          crops_coords_top_left, target_size, negative_original_size, negative_crops_coords_top_left,
                          negative_target_size):
        """The SDXL image call's own checks (after ``_check_inputs``); returns its size conditioning, defaulted as
        diffusers defaults it (to the output size, the negative sizes to the positive ones)."""
        check_denoising_bounds(denoising_start, denoising_end)
        for name, value in (("aesthetic_score", aesthetic_score), ("negative_aesthetic_score",
                                                                   negative_aesthetic_score)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r}")
        self._set_guidance_rescale(guidance_rescale)
        self._check_xl_inputs(prompt, prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                              pooled_prompt_embeds, negative_pooled_prompt_embeds)
        sizes = {name: _size_pair(name, value) for name, value in (
            ("original_size", original_size or (height, width)), ("crops_coords_top_left", crops_coords_top_left),
            ("target_size", target_size or (height, width)),
            ("negative_crops_coords_top_left", negative_crops_coords_top_left))}
        sizes["negative_original_size"] = _size_pair("negative_original_size",
                                                     negative_original_size or sizes["original_size"])
        sizes["negative_target_size"] = _size_pair("negative_target_size", negative_target_size or sizes["target_size"])
        return sizes

    def _image_conditioning(self, prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, do_cfg,
                            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                            sizes, aesthetic_score, negative_aesthetic_score, batch, clip_skip=None):
        """(the text embeddings, (pooled embeddings, time ids)) for the loop, negative first with guidance
        (``clip_skip`` checked by the caller)."""
        device = self.device
        prompt, prompt_2 = ([p] if isinstance(p, str) else p for p in (prompt, prompt_2))
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt, prompt_2, device, num_images_per_prompt, do_cfg, negative_prompt, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            clip_skip)
        # diffusers' image ids, each repeated to the batch: a refiner's end with the aesthetic scores; a base UNet's
        # with the target sizes, and then the negative ones take the positive crop corner
        if self.requires_aesthetics_score:
            last, negative_last = (aesthetic_score,), (negative_aesthetic_score,)
            negative_crop = sizes["negative_crops_coords_top_left"]
        else:
            last, negative_last = sizes["target_size"], sizes["negative_target_size"]
            negative_crop = sizes["crops_coords_top_left"]
        time_ids = self._time_ids(sizes["original_size"], sizes["crops_coords_top_left"], last,
                                  embeds.dtype).repeat(batch, 1)
        if do_cfg:
            negative_ids = self._time_ids(sizes["negative_original_size"], negative_crop, negative_last,
                                          embeds.dtype).repeat(batch, 1)
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([negative_ids, time_ids])
        return embeds.to(self.dtype), (pooled.to(device), time_ids.to(device))

    def _encode_image(self, pixels, generator):
        """SDXL's encode: an fp16 VAE with force_upcast encodes in fp32; latents_mean / latents_std where the VAE
        config has them, as diffusers' SDXL image-to-image applies them."""
        vae, c, dtype = self.vae, self.vae.config, pixels.dtype
        upcast = c.force_upcast and vae.dtype != torch.float32
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            latents = vae.encode(pixels.float() if c.force_upcast else pixels).latent_dist.sample(generator)
        finally:
            if upcast:
                vae.to(dtype=dtype)
        latents = latents.to(dtype)
        if c.latents_mean is not None and c.latents_std is not None:
            mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1).to(latents.device, dtype)
            std = torch.tensor(c.latents_std).view(1, -1, 1, 1).to(latents.device, dtype)
            return (latents - mean) * c.scaling_factor / std
        return c.scaling_factor * latents
