"""Text-guided 4x super-resolution: diffusers' StableDiffusionUpscalePipeline (stabilityai/stable-diffusion-x4-upscaler),
the same image for the same seed, image, prompt and weights.

The low-resolution image is the UNet's condition at the latents' own size (the UNet takes the latents beside the
image's 3 channels, 7 in all), noised first to ``noise_level`` by the low-resolution scheduler (a DDPM schedule), and
the noise level is the UNet's class label (a table of embeddings added to its time embedding). The VAE decodes the
latents at 4x. Guidance is the usual two-way CFG, so the loop is the SD pipeline's at full speed: DDIM's fused CFG
step, and on a GPU the whole step replayed from one CUDA graph, with the image and the noise level among its inputs.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .ip_adapter import adapter_count
from .lora import lora_call_scale
from .pipeline import StableDiffusionPipeline
from .pipeline_folder import ComponentLoader, read_model_index
from .pipeline_img2img import preprocess_image
from .schedulers.common import randn_tensor

SCALING_FACTOR = 0.08333  # the x4 upscaler's VAE latents scale, which diffusers' pipeline imposes on any VAE


class StableDiffusionUpscalePipeline(StableDiffusionPipeline):
    """diffusers' StableDiffusionUpscalePipeline: its defaults (75 steps, guidance 9, noise level 20), the output 4x
    the image (the image first cut to a multiple of the VAE's scale, bicubic, as diffusers' image processor does)."""
    _cond_names = ("image", "noise_level")  # the UNet's extra inputs: (rows, 3, h, w) and (rows,)
    _unet_takes_image = True

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, low_res_scheduler, max_noise_level=350, *,
                 cuda_graph="auto", channels_last="auto"):
        if not callable(getattr(low_res_scheduler, "add_noise", None)):
            raise TypeError(f"low_res_scheduler must be a scheduler with add_noise (the x4 upscaler's is a "
                            f"DDPMScheduler), got {type(low_res_scheduler).__name__}")
        if isinstance(max_noise_level, bool) or not isinstance(max_noise_level, int) or max_noise_level < 0:
            raise ValueError(f"max_noise_level must be an int >= 0, got {max_noise_level!r}")
        self.low_res_scheduler, self.max_noise_level = low_res_scheduler, max_noise_level
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, cuda_graph=cuda_graph,
                         channels_last=channels_last)
        if vae.config.scaling_factor != SCALING_FACTOR:
            warnings.warn(f"vae: its scaling_factor is {vae.config.scaling_factor}; the x4 upscaler's latents use "
                          f"{SCALING_FACTOR}, which this pipeline uses, as diffusers' does", stacklevel=2)

    def _check_components(self):
        super()._check_components()
        latent, unet_in, pixels = self.vae.config.latent_channels, self.unet.config.in_channels, 3
        if unet_in != latent + pixels:
            raise ValueError(f"unet has {unet_in} input channels: an x4 upscaler UNet takes {latent + pixels} (the "
                             "latents and the low-resolution RGB image)")
        if self.unet.config.num_class_embeds is None:
            raise ValueError("unet has no class embedding (num_class_embeds): an x4 upscaler UNet takes the noise "
                             "level as its class label")

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None, *, variant=None, cuda_graph="auto",
                        channels_last="auto", **components):
        """Load a diffusers StableDiffusionUpscalePipeline folder: the SD components, ``low_res_scheduler/`` and
        model_index.json's ``max_noise_level``; a component passed by name is used as it is."""
        from transformers import CLIPTextModel

        folder, index = read_model_index(folder)
        checker = ("safety_checker", "feature_extractor")
        names = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "low_res_scheduler", *checker)
        load = ComponentLoader(folder, index, names, checker, components, dtype, device, variant)
        pipe = cls(load("unet"), load("vae"), load("text_encoder", CLIPTextModel), load("tokenizer"),
                   load("scheduler"), load("low_res_scheduler"), index.get("max_noise_level", 350),
                   cuda_graph=cuda_graph, channels_last=channels_last)
        pipe.safety_checker, pipe.feature_extractor = load("safety_checker"), load("feature_extractor")
        return pipe

    def _unet_call(self, model_input, t, embeds, *cond, timestep_cond=None):
        """The UNet on the (scaled) latents beside the noised image, the noise level as its class label."""
        image, noise_level = cond
        return self.unet(torch.cat([model_input, image], dim=1), t, embeds, class_labels=noise_level)

    def _decode(self, latents):
        """diffusers' upscale decode: an fp16 VAE with force_upcast decodes in fp32 (and goes back to fp16)."""
        vae = self.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            return vae.decode(latents.to(vae.dtype) / SCALING_FACTOR)
        finally:
            if upcast:
                vae.to(dtype=torch.float16)

    def _check_image(self, image, batch, noise_level):
        """The image (as diffusers takes it: PIL, numpy, a tensor or a list, one per prompt where it is a batch)
        and the noise level, checked."""
        if image is None:
            raise ValueError("image: give the low-resolution image to upscale (an RGB PIL image, a list of them, "
                             "numpy images or a (B, 3, H, W) tensor)")
        if isinstance(image, (list, np.ndarray, torch.Tensor)):
            count = len(image) if isinstance(image, list) else image.shape[0] if image.ndim == 4 else 1
            if count != batch:
                raise ValueError(f"image has {count} images for {batch} prompts: give one image per prompt (or one "
                                 "PIL image for all)")
        if isinstance(noise_level, bool) or not isinstance(noise_level, (int, np.integer)):
            raise TypeError(f"noise_level must be an int (0 to max_noise_level), got {noise_level!r}")
        top = min(self.max_noise_level, self.unet.config.num_class_embeds - 1)
        if not 0 <= noise_level <= top:
            raise ValueError(f"noise_level must be in [0, {top}] (max_noise_level {self.max_noise_level}, the "
                             f"UNet's {self.unet.config.num_class_embeds} class embeddings), got {noise_level}")
        return int(noise_level)

    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, num_inference_steps=75, guidance_scale=9.0, noise_level=20,
                 negative_prompt=None, num_images_per_prompt=1, eta=0.0, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, output_type="pil", callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), clip_skip=None):
        """Upscale ``image`` 4x guided by ``prompt``. ``noise_level``: how much noise the low-resolution image gets
        before it conditions the UNet (more: more freedom from the image, fewer of its artifacts)."""
        if adapter_count(self.unet):
            raise ValueError("IP-Adapter: diffusers' upscale pipeline takes none; unload_ip_adapter() first")
        batch = (1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, (list, tuple)) else
                 prompt_embeds.shape[0] if torch.is_tensor(prompt_embeds) else 0)
        noise_level = self._check_image(image, batch, noise_level) if batch else noise_level
        pixels = preprocess_image(image, self.vae_scale_factor, None, resample="bicubic")
        if pixels.shape[1] != 3:
            raise ValueError(f"image has {pixels.shape[1]} channels: an RGB image (3) is upscaled")
        height, width = (s * self.vae_scale_factor for s in pixels.shape[2:])
        shape = self._check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, prompt_embeds, negative_prompt_embeds, None, output_type)
        shape = (shape[0], self.vae.config.latent_channels, *shape[2:])
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this batch and image, got {tuple(latents.shape)}")
        self._set_guidance_rescale(0.0)  # (diffusers' upscale has none)
        clip_skip = self._check_clip_skip(clip_skip)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        do_cfg = self._guided(guidance_scale)
        embeds = self._text_embeds(prompt, negative_prompt, num_images_per_prompt, do_cfg, prompt_embeds,
                                   negative_prompt_embeds, clip_skip, callback)
        if pixels.shape[0] == 1 and batch > 1:  # one PIL image for several prompts (which diffusers fails on)
            pixels = pixels.expand(batch, -1, -1, -1)
        # diffusers' order of draws: the image's noise, then the latents (in _sample)
        pixels = pixels.to(device=self.device, dtype=embeds.dtype)
        level = torch.tensor([noise_level], dtype=torch.long, device=self.device)
        noise = randn_tensor(pixels.shape, generator=generator, device=self.device, dtype=embeds.dtype)
        pixels = self.low_res_scheduler.add_noise(pixels, noise, level)
        # as diffusers repeats them: the whole batch of images once per UNet row group (with several images and
        # several images per prompt, the images cycle through the rows)
        pixels = torch.cat([pixels] * (2 if do_cfg else 1) * num_images_per_prompt)
        levels = level.repeat(pixels.shape[0])
        return self._sample(shape, embeds, (pixels, levels), num_inference_steps, guidance_scale, do_cfg, eta,
                            generator, latents, output_type, callback=callback)
