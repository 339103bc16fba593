"""Latent consistency models: diffusers' LatentConsistencyModelPipeline and LatentConsistencyModelImg2ImgPipeline,
for an LCM-distilled SD UNet (``time_cond_proj_dim``, e.g. LCM_Dreamshaper_v7): a few steps (4 by default), one UNet
pass per step (no classifier-free guidance batch), the guidance scale given to the UNet as an embedding.

Every one of our pipelines runs such a UNet as diffusers' pipelines do (``StableDiffusionPipeline._guided`` and
``_guidance_cond``: no CFG batch, the embedding of ``guidance_scale - 1`` as ``timestep_cond``); these two add what
diffusers' LCM pipelines change: their defaults (4 steps, guidance 8.5), ``original_inference_steps`` for the
scheduler, no negative prompt (an LCM is distilled with the empty one), and for image-to-image the LCM scheduler's
own ``strength`` cut of the distillation schedule (not SD image-to-image's tail of the inference schedule).
"""
from __future__ import annotations

import torch

from .ip_adapter import ip_adapter_call
from .lora import lora_call_scale
from .pipeline import StableDiffusionPipeline
from .pipeline_common import StepCallback, takes
from .pipeline_img2img import _ImageToImage


class LatentConsistencyModelPipeline(StableDiffusionPipeline):
    """diffusers' LatentConsistencyModelPipeline: text-to-image with an LCM-distilled UNet and (normally) its
    LCMScheduler. The image is the last step's output, which LCM's last step makes its denoised x0 (diffusers decodes
    that x0: the same tensor)."""
    _callback_tensor_inputs = ("latents", "denoised", "prompt_embeds", "w_embedding")  # diffusers' names
    _step_callback = None  # the running call's StepCallback, which reads the step's x0 and the guidance embedding
    _schedule_kwargs = None  # the running call's arguments for the scheduler's set_timesteps (``_schedule``)

    def _check_components(self):
        super()._check_components()
        if self.unet.config.time_cond_proj_dim is None:
            raise ValueError(f"unet has no time_cond_proj_dim: not an LCM-distilled UNet, for which "
                             f"{type(self).__name__} is made (an SD model with an LCM-LoRA fused in runs in "
                             "StableDiffusionPipeline with LCMScheduler and a guidance_scale of 1 to 2)")

    def _callback(self, fn, inputs):
        """diffusers' LCM callback tensors: its "denoised" (the step's x0; None with a scheduler that gives none) and
        "w_embedding" are readable; returning either is refused (diffusers would use them: a replaced x0 is decoded
        after the last step, a replaced embedding conditions the next steps)."""
        callback = None if fn is None else StepCallback(fn, inputs, self._callback_tensor_inputs, {},
                                                        read_only=("denoised", "w_embedding"))
        self._step_callback = callback
        return callback

    def _guidance_cond(self, guidance_scale, latents):
        cond = super()._guidance_cond(guidance_scale, latents)
        if self._step_callback is not None:
            self._step_callback.extra["w_embedding"] = cond[0]
        return cond

    def _scheduler_output(self, output):
        if self._step_callback is not None:
            self._step_callback.extra["denoised"] = getattr(output, "denoised", None)
        return super()._scheduler_output(output)

    def _schedule(self, original_inference_steps, strength=None):
        """The scheduler's own arguments this call gives its set_timesteps (``_set_timesteps``), checked to be taken."""
        given = {name: value for name, value in (("original_inference_steps", original_inference_steps),
                                                 ("strength", strength)) if value is not None}
        for name in given:
            if not takes(self.scheduler.set_timesteps, name):
                raise ValueError(f"{name}: {type(self.scheduler).__name__}.set_timesteps takes none (LCMScheduler "
                                 "and TCDScheduler do)")
        self._schedule_kwargs = given

    def _set_timesteps(self, num_inference_steps, device, timesteps=None, sigmas=None):
        """diffusers' retrieve_timesteps with the LCM scheduler's ``original_inference_steps`` (and ``strength``)."""
        given = self._schedule_kwargs
        if not given:
            return super()._set_timesteps(num_inference_steps, device, timesteps, sigmas)
        if timesteps is not None and not takes(self.scheduler.set_timesteps, "timesteps"):
            raise ValueError(f"timesteps: {type(self.scheduler).__name__} takes no custom timesteps")
        self.scheduler.set_timesteps(None if timesteps is not None else num_inference_steps, device=device,
                                     **({"timesteps": timesteps} if timesteps is not None else {}), **given)
        return len(self.scheduler.timesteps)

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, height=None, width=None, num_inference_steps=4, original_inference_steps=None,
                 timesteps=None, guidance_scale=8.5, num_images_per_prompt=1, generator=None, latents=None,
                 prompt_embeds=None, output_type="pil", callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), clip_skip=None):
        """As diffusers': ``guidance_scale`` (its Imagen form, as SD's; the UNet sees ``guidance_scale - 1``) is a
        condition of the distilled UNet, not a second batch; ``original_inference_steps`` overrides the scheduler
        config's distillation schedule."""
        height = height if height is not None else self.unet.config.sample_size * self.vae_scale_factor
        width = width if width is not None else self.unet.config.sample_size * self.vae_scale_factor
        shape = self._check_inputs(prompt, None, height, width, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, prompt_embeds, None, latents, output_type)
        clip_skip = self._check_clip_skip(clip_skip)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._schedule(original_inference_steps)
        try:
            embeds = self._text_embeds(prompt, None, num_images_per_prompt, False, prompt_embeds, None, clip_skip,
                                       callback)
            return self._sample(shape, embeds, (), num_inference_steps, guidance_scale, False, 0.0, generator,
                                latents, output_type, timesteps, None, callback)
        finally:
            self._schedule_kwargs, self._step_callback = {}, None


class LatentConsistencyModelImg2ImgPipeline(_ImageToImage, LatentConsistencyModelPipeline):
    """diffusers' LatentConsistencyModelImg2ImgPipeline: the image's latents noised to the first timestep of the LCM
    scheduler's schedule for ``strength`` (its set_timesteps keeps the lower ``strength`` part of the distillation
    schedule and spaces the steps over that), then the same loop."""

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, num_inference_steps=4, strength=0.8, original_inference_steps=None,
                 timesteps=None, guidance_scale=8.5, num_images_per_prompt=1, generator=None, latents=None,
                 prompt_embeds=None, output_type="pil", callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), clip_skip=None):
        """As diffusers': ``latents``, when given, are the starting latents as they are (the image is then not
        encoded, nor noised)."""
        image, latent_input, height, width = self._prepare_image(image, strength)
        shape = self._check_inputs(prompt, None, height, width, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, prompt_embeds, None, None, output_type)
        if latents is not None and (not torch.is_tensor(latents) or latents.dim() != 4 or
                                    latents.shape[0] != shape[0] or latents.shape[1] != shape[1]):
            got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"latents must be a ({shape[0]}, {shape[1]}, H, W) tensor (the batch's starting latents), "
                             f"got {got}")
        clip_skip = self._check_clip_skip(clip_skip)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._schedule(original_inference_steps, strength)
        try:
            embeds = self._text_embeds(prompt, None, num_images_per_prompt, False, prompt_embeds, None, clip_skip,
                                       callback)
            num_inference_steps = self._set_timesteps(num_inference_steps, self.device, timesteps)
            self._schedule_kwargs = {}
            timesteps = self.scheduler.timesteps
            if latents is None:
                latents = self._image_latents(image, latent_input, timesteps[:1].repeat(shape[0]), shape[0],
                                              embeds.dtype, generator)
            latents = latents.to(device=self.device, dtype=embeds.dtype)
            return self._denoise(latents, timesteps, embeds, (), num_inference_steps, guidance_scale, False, 0.0,
                                 generator, output_type, callback)
        finally:
            self._schedule_kwargs, self._step_callback = {}, None
