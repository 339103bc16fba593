"""SD3 / SD3.5 image-to-image with diffusers' StableDiffusion3Img2ImgPipeline semantics: the same image for the same
seed, image, strength and weights.

The image is resized to the output size (the transformer's default unless ``height``/``width`` say otherwise, as
diffusers' image processor does), encoded by the VAE and sampled from its posterior with the generator, shifted and
scaled, then carried along the flow to the first sigma of the schedule's last ``strength`` part (``scale_noise``:
``sigma * noise + (1 - sigma) * latents``). The tail is diffusers' SD3 get_timesteps: ``int(n - n * strength)``
steps skipped, without rounding ``n * strength`` down first as the SD pipelines do. The loop and decode are the
text-to-image pipeline's.
"""
from __future__ import annotations

import torch

from .lora import lora_call_scale
from .pipeline_img2img import _ImageToImage, preprocess_image
from .pipeline_sd3 import StableDiffusion3Pipeline, text_arguments
from .schedulers.common import randn_tensor


class StableDiffusion3Img2ImgPipeline(_ImageToImage, StableDiffusion3Pipeline):
    @lora_call_scale(name="joint_attention_kwargs")
    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, prompt_3=None, height=None, width=None, image=None, strength=0.6,
                 num_inference_steps=50, sigmas=None, guidance_scale=7.0, negative_prompt=None,
                 negative_prompt_2=None, negative_prompt_3=None, num_images_per_prompt=1, generator=None,
                 latents=None, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True, clip_skip=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=256,
                 skip_guidance_layers=None, skip_layer_guidance_scale=2.8, skip_layer_guidance_stop=0.2,
                 skip_layer_guidance_start=0.01, mu=None, ip_adapter_image=None, ip_adapter_image_embeds=None):
        """diffusers' call, plus its text-to-image pipeline's skip-layer guidance (over the steps that run)."""
        height = height if height is not None else self.default_sample_size * self.vae_scale_factor
        width = width if width is not None else self.default_sample_size * self.vae_scale_factor
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        if image is None:
            raise ValueError("image: give the initial image (an RGB PIL image, a list of them or a tensor)")
        text_args = text_arguments(locals())
        latent_channels = self.transformer.config.in_channels
        image = preprocess_image(image, self.vae_scale_factor, latent_channels, (height, width))
        latent_input = image.shape[1] == latent_channels  # latents given instead of pixels, as diffusers takes them
        if not latent_input and image.shape[1] != self.vae.config.in_channels:
            raise ValueError(f"image has {image.shape[1]} channels: {self.vae.config.in_channels} (pixels) or "
                             f"{latent_channels} (latents)")
        batch, text, cond, callback_inputs = self._prepare_text(
            *text_args, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type,
            clip_skip, max_sequence_length, skip_guidance_layers, callback_on_step_end,
            callback_on_step_end_tensor_inputs)
        text, cond = self._with_ip_adapter(text, cond, ip_adapter_image, ip_adapter_image_embeds,
                                           batch * num_images_per_prompt)
        shape = (batch * num_images_per_prompt, latent_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        steps = self._set_timesteps(num_inference_steps, self.device, sigmas, mu, shape)
        timesteps = self._strength_tail(steps, strength)
        if latents is None:
            latents = self._image_latents(image, latent_input, None, shape[0], text[0].dtype, generator,
                                          add_noise=False)
            noise = randn_tensor(latents.shape, generator=generator, device=self.device, dtype=text[0].dtype)
            latents = self.scheduler.scale_noise(latents, timesteps[:1].repeat(shape[0]), noise)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}")
        latents = latents.to(device=self.device, dtype=text[0].dtype)
        slg = (tuple(skip_guidance_layers or ()), skip_layer_guidance_scale, skip_layer_guidance_start,
               skip_layer_guidance_stop)
        return self._denoise(latents, timesteps, text, cond, slg, callback_on_step_end, callback_inputs,
                             output_type, return_dict)

    def _strength_tail(self, num_inference_steps, strength):
        """diffusers' SD3 get_timesteps: the schedule after its first ``int(n - n * strength)`` steps, the start told
        to the scheduler."""
        begin = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
        if begin >= num_inference_steps:
            raise ValueError(f"strength {strength} x num_inference_steps {num_inference_steps} leaves no denoising "
                             "step: raise either")
        self.scheduler.set_begin_index(begin)
        return self.scheduler.timesteps[begin:]

    def _encode_image(self, pixels, generator):
        """The image's latents, sampled from the VAE posterior with ``generator``, shifted and scaled as SD3's."""
        c = self.vae.config
        posterior = self._vae(pixels.device).encode(pixels).latent_dist
        return (posterior.sample(generator) - (c.shift_factor or 0.0)) * c.scaling_factor
