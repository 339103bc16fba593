"""SD3 / SD3.5 inpainting with diffusers' StableDiffusion3InpaintPipeline semantics: the same latents for the same
seed, image, mask, strength and weights, and the image they decode to.

Both kinds of transformer diffusers runs: SD3's own (16 input channels), whose latents outside the mask are put back
to the image's own after every step, carried along the flow to the next sigma (``scale_noise``); and an inpainting
transformer (33: the latents, the mask and the masked image's latents). The image and mask are resized to the output
size (the transformer's default unless ``height``/``width`` say otherwise), the mask made grayscale and binarized at
0.5, the masked image the image where the mask is below 0.5; the tail of the schedule is SD3 image-to-image's
(``int(n - n * strength)`` steps skipped). The loop and decode are the text-to-image pipeline's: the transformer call
graphed on CUDA, with the mask and the masked image's latents among its inputs.

Where this differs from diffusers 0.42, on purpose:
- **The decode adds the VAE's shift back** (``latents / scaling_factor + shift_factor``), as every other SD3 pipeline
  of diffusers' and ours does; diffusers' inpainting decode leaves the shift out (diffusers issue #13611, its first
  finding), a colour cast of 0.06 latent units on SD3's VAE. The latents are diffusers' (``output_type="latent"``).
- A plain transformer does not encode the masked image, which only the 33-channel one reads (one VAE encode less).
- diffusers' SD3CFGCutoffCallback works (diffusers' inpainting refuses the pooled embeddings it asks for): the
  mask follows the batch once guidance is off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import lora_call_scale
from .pipeline_inpaint import _Inpainting, image_and_mask
from .pipeline_sd3 import text_arguments
from .pipeline_sd3_img2img import StableDiffusion3Img2ImgPipeline
from .schedulers.common import randn_tensor


class StableDiffusion3InpaintPipeline(StableDiffusion3Img2ImgPipeline):
    # diffusers' names, and the pooled embeddings its SD3CFGCutoffCallback replaces (which diffusers' inpainting
    # refuses); a callback may return the mask and the masked image's latents too, as diffusers reads them back
    _callback_tensor_inputs = ("latents", "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                               "negative_pooled_prompt_embeds")
    # (the SD inpainting pipelines' "inpaint only masked" crop and paste, and their per-image encode)
    _crop_to_mask, _paste_back, _encode_images = (_Inpainting._crop_to_mask, _Inpainting._paste_back,
                                                  _Inpainting._encode_images)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        latent, given = self.vae.config.latent_channels, self.transformer.config.in_channels
        if given not in (latent, 2 * latent + 1):
            raise ValueError(f"transformer has {given} input channels: an inpainting one takes {2 * latent + 1} "
                             f"(latents, mask, masked image latents) and a plain one {latent}")
        self._blend = None  # a plain transformer's (image latents, noise) during a call

    @lora_call_scale(name="joint_attention_kwargs")
    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, prompt_3=None, image=None, mask_image=None,
                 masked_image_latents=None, height=None, width=None, padding_mask_crop=None, strength=0.6,
                 num_inference_steps=50, sigmas=None, guidance_scale=7.0, negative_prompt=None,
                 negative_prompt_2=None, negative_prompt_3=None, num_images_per_prompt=1, generator=None,
                 latents=None, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True, clip_skip=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=256,
                 mu=None, ip_adapter_image=None, ip_adapter_image_embeds=None):
        """diffusers' call, with its defaults (strength 0.6, 50 steps, guidance 7.0). ``masked_image_latents``, as
        diffusers takes them, are the VAE's own latents of the masked image (shifted and scaled here)."""
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        if image is None or mask_image is None:
            raise ValueError("image and mask_image: give both (PIL images, lists of them or tensors)")
        if masked_image_latents is not None and (not torch.is_tensor(masked_image_latents)
                                                 or masked_image_latents.dim() != 4):
            raise TypeError("masked_image_latents must be a (B, C, H, W) tensor (the VAE's latents, or pixels), got "
                            f"{type(masked_image_latents).__name__}")
        latent_channels = self.vae.config.latent_channels
        shape = (None, latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        crop_image, crop_mask, box = self._crop_to_mask(image, mask_image, padding_mask_crop, output_type, shape)
        init_image, mask_condition = image_and_mask(crop_image, crop_mask, self.vae.config, self.vae_scale_factor,
                                                    shape[2:])
        plain = self.transformer.config.in_channels == latent_channels  # else the mask inputs go in beside
        if not plain and masked_image_latents is None and init_image.shape[1] == latent_channels:
            raise ValueError("image: given as latents, it cannot be masked; an inpainting transformer then needs "
                             "masked_image_latents too")
        text_args = text_arguments(locals())
        batch, text, cond, callback_inputs = self._prepare_text(
            *text_args, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type,
            clip_skip, max_sequence_length, None, callback_on_step_end, callback_on_step_end_tensor_inputs)
        shape = (batch * num_images_per_prompt, *shape[1:])
        text, cond = self._with_ip_adapter(text, cond, ip_adapter_image, ip_adapter_image_embeds, shape[0])
        for name, value in (("image", init_image), ("mask_image", mask_condition),
                            ("masked_image_latents", masked_image_latents)):
            if value is not None and shape[0] % value.shape[0] != 0:  # (each is repeated to the batch)
                raise ValueError(f"{name} has {value.shape[0]} images, which does not divide the batch of "
                                 f"{shape[0]} (prompts x images per prompt)")
        if isinstance(generator, (list, tuple)) and len(generator) != shape[0]:
            raise ValueError(f"generator is a list of {len(generator)} but the batch is {shape[0]} (prompts x images "
                             "per prompt)")
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}")
        steps = self._set_timesteps(num_inference_steps, self.device, sigmas, mu, shape)
        timesteps = self._strength_tail(steps, strength)
        dtype, do_cfg = text[0].dtype, self.do_classifier_free_guidance
        latents, noise, image_latents = self._start_latents(init_image, latents, shape, timesteps, dtype, generator,
                                                            strength, plain)
        mask = F.interpolate(mask_condition, size=shape[2:]).to(device=self.device, dtype=dtype)
        mask = self._to_batch(mask, shape[0], do_cfg)
        masked = None if plain else self._masked_latents(init_image, mask_condition, masked_image_latents, shape[0],
                                                         dtype, generator, do_cfg)
        self._blend = (image_latents, noise) if plain else None
        self._call_tensors = {"negative_prompt_embeds": text[0].chunk(2)[0] if do_cfg else None,
                              "negative_pooled_prompt_embeds": text[1].chunk(2)[0] if do_cfg else None,
                              "mask": mask, "masked_image_latents": masked}
        try:
            output = self._denoise(latents, timesteps, text, cond, ((), 0.0, 0.0, 0.0), callback_on_step_end,
                                   callback_inputs, output_type, True)
        finally:
            self._blend, self._call_tensors = None, {}
        output = self._paste_back(output, image, mask_image, box)
        return output if return_dict else (output.images,)

    def _start_latents(self, init_image, latents, shape, timesteps, dtype, generator, strength, plain):
        """diffusers' prepare_latents, drawing from the generator in its order: (the loop's first latents, the noise
        a plain transformer's blend carries the image along with, the image's latents where needed). Given latents
        are the noise, taken as they are (at any strength, as diffusers)."""
        device, image_latents = self.device, None
        if plain or (latents is None and strength != 1.0):
            pixels = init_image.to(device=device, dtype=dtype)
            image_latents = (pixels if pixels.shape[1] == shape[1] else self._encode_images(pixels, generator))
            image_latents = image_latents.repeat(shape[0] // image_latents.shape[0], 1, 1, 1)
        if latents is not None:
            noise = latents.to(device=device, dtype=dtype)
            return noise, noise, image_latents
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        start = noise if strength == 1.0 else self.scheduler.scale_noise(image_latents, timesteps[:1].repeat(shape[0]),
                                                                          noise)
        return start, noise, image_latents

    def _masked_latents(self, init_image, mask_condition, masked_image_latents, batch, dtype, generator, do_cfg):
        """diffusers' prepare_mask_latents for an inpainting transformer: the masked image encoded (a generator per
        image with a list), or the given latents, shifted and scaled; repeated to the batch, doubled under
        guidance."""
        masked = init_image * (mask_condition < 0.5) if masked_image_latents is None else masked_image_latents
        masked = masked.to(device=self.device, dtype=dtype)
        if masked.shape[1] == self.vae.config.latent_channels:
            c = self.vae.config
            masked = (masked - (c.shift_factor or 0.0)) * c.scaling_factor
        else:
            masked = self._encode_images(masked, generator)
        return self._to_batch(masked, batch, do_cfg)

    @staticmethod
    def _to_batch(tensor, batch, do_cfg):
        tensor = tensor.repeat(batch // tensor.shape[0], 1, 1, 1) if tensor.shape[0] < batch else tensor
        return torch.cat([tensor] * 2) if do_cfg else tensor

    def _model_input(self, model_input):
        """An inpainting transformer's input: the latents, the mask and the masked image's latents (their last rows:
        the whole doubled batch under guidance, its second half once a callback turns guidance off)."""
        masked = self._call_tensors.get("masked_image_latents")
        if masked is None:
            return model_input
        n = model_input.shape[0]
        return torch.cat([model_input, self._call_tensors["mask"][-n:], masked[-n:]], dim=1)

    def _after_step(self, i, timesteps, latents):
        """A plain transformer: outside the mask, the image's latents carried to the next sigma (none after the
        last step), as diffusers blends them."""
        if self._blend is None:
            return latents
        image_latents, noise = self._blend
        mask = self._call_tensors["mask"][-latents.shape[0]:]
        if i < len(timesteps) - 1:
            image_latents = self.scheduler.scale_noise(image_latents, timesteps[i + 1:i + 2], noise)
        return (1 - mask) * image_latents + mask * latents
