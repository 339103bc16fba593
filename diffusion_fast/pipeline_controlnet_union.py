"""SDXL text-to-image guided by a ControlNet-Union net (``models/controlnet_union.py``), with diffusers'
StableDiffusionXLControlNetUnionPipeline semantics: the same image for the same seed, conditioning images and
weights.

One net takes several conditioning images at once, each with its control mode (for xinsir's controlnet-union-sdxl:
0 openpose, 1 depth, 2 hed/pidi/scribble/ted, 3 canny/lineart/anime lineart/mlsd, 4 normal, 5 segment; the promax
net adds tile and repaint). The rest is the SDXL ControlNet pipeline's, per mode where it had one setting per net:
the images prepared as diffusers prepares them, each mode's scale, start and end, guess mode, ``denoising_end``,
and the loop (on CUDA the whole DDIM step with the net inside replayed from a CUDA graph).
"""
from __future__ import annotations

import torch

from .ip_adapter import ip_adapter_call
from .lora import lora_call_scale
from .models.controlnet_union import ControlNetUnionModel
from .pipeline_common import check_denoising_bounds
from .pipeline_controlnet import StableDiffusionXLControlNetPipeline


class StableDiffusionXLControlNetUnionPipeline(StableDiffusionXLControlNetPipeline):
    """diffusers' StableDiffusionXLControlNetUnionPipeline: ``control_image`` one image per mode of
    ``control_mode``; ``controlnet_conditioning_scale``, ``control_guidance_start`` and ``control_guidance_end`` a
    number or one per mode. With one mode its scale multiplies the net's residuals; with several, each scales its
    image's part and the residuals are not scaled again (so a net whose modes are all at scale 0 still adds the
    residuals of the latents alone, as diffusers' does)."""
    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")  # diffusers' names
    _image_name, _each = "control_image", "control mode"
    _modes = (0,)  # the call's control modes

    @staticmethod
    def _as_controlnet(controlnet):
        if not isinstance(controlnet, ControlNetUnionModel):
            raise TypeError("controlnet must be a diffusion_fast ControlNetUnionModel (diffusion_fast."
                            "ControlNetUnionModel.from_pretrained(folder)); several union nets (diffusers' "
                            f"MultiControlNetUnionModel) are not mirrored, got {type(controlnet).__name__}")
        return controlnet

    @property
    def _image_nets(self):
        return [self.controlnet] * len(self._modes)

    @property
    def _cond_names(self):  # SDXL's added conditioning, the images (one list) and the modes' one-hot vector
        return (*self._added_names, *(self._image_name,) * len(self._modes), "control_type")

    def _check_modes(self, control_mode, control_image):
        """The call's modes: an int, or a list of distinct ints below the net's num_control_type, one per image."""
        n = self.controlnet.config.num_control_type
        modes = list(control_mode) if isinstance(control_mode, (list, tuple)) else [control_mode]
        if not modes or any(isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < n for m in modes) or len(
                set(modes)) != len(modes):
            raise ValueError(f"control_mode must be a control mode (an int in [0, {n})) or a list of distinct ones, "
                             f"one per conditioning image, got {control_mode!r}")
        images = len(control_image) if isinstance(control_image, (list, tuple)) and len(modes) > 1 else 1
        if images != len(modes):
            raise ValueError(f"control_image: {len(modes)} control modes take a list of {len(modes)} conditioning "
                             f"images, one per mode, got {images}")
        return tuple(modes)

    def _control_cond(self, images, shape, num_images_per_prompt, do_cfg, guess_mode):
        """The images as for a ControlNet, then the modes' one-hot vector (diffusers' control_type), one row per
        sample the net sees."""
        cond = super()._control_cond(images, shape, num_images_per_prompt, do_cfg, guess_mode)
        control_type = torch.zeros(self.controlnet.config.num_control_type)
        control_type[list(self._modes)] = 1.0
        return (*cond, control_type.to(self.device, self.dtype).repeat(cond[0].shape[0], 1))

    def _step_cond(self, i, steps, cond):
        """As a ControlNet's, the modes joining the settings (a graph bakes them in: other modes, another graph)."""
        *cond, settings = super()._step_cond(i, steps, cond)
        return (*cond, (*settings, self._modes))

    def _unet_call(self, model_input, t, embeds, *cond):
        """The net's residuals on all the images at once, and the UNet's prediction with them. One mode at scale 0
        adds exact zeros, so it is skipped (diffusers runs it)."""
        scales, guess_mode, split, modes = cond[-1]
        images, control_type, added = cond[-len(modes) - 2:-2], cond[-2], cond[:-len(modes) - 2]
        down = mid = None
        if len(modes) > 1 or scales[0] != 0:
            half = (lambda x: x.chunk(2)[1]) if split else (lambda x: x)  # noqa: E731  (guess mode with guidance)
            text = embeds[0] if isinstance(embeds, tuple) else embeds  # (no IP-Adapter tokens for the net)
            down, mid = self.controlnet(half(model_input), t, half(text), list(images), control_type, list(modes),
                                        list(scales), guess_mode, self._nets_added(added, half))
            if split:
                down = [torch.cat([torch.zeros_like(d), d]) for d in down]
                mid = torch.cat([torch.zeros_like(mid), mid])
        return self._unet_with(model_input, t, embeds, added, down, mid)

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, control_image=None, height=None, width=None,
                 num_inference_steps=50, timesteps=None, sigmas=None, denoising_end=None, guidance_scale=5.0,
                 negative_prompt=None, negative_prompt_2=None, num_images_per_prompt=1, eta=0.0, generator=None,
                 latents=None, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", controlnet_conditioning_scale=1.0,
                 guess_mode=False, control_guidance_start=0.0, control_guidance_end=1.0, control_mode=None,
                 original_size=None, crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, clip_skip=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        """As diffusers': the SDXL ControlNet pipeline's arguments, with ``control_image`` and ``control_mode`` (one
        image per mode) in place of ``image``."""
        check_denoising_bounds(denoising_end=denoising_end)
        self._modes = self._check_modes(control_mode, control_image)
        shape, do_cfg, control, callback = self._begin_call(
            control_image, height, width, controlnet_conditioning_scale, control_guidance_start,
            control_guidance_end, guess_mode, (prompt, negative_prompt, num_inference_steps, guidance_scale,
                                               num_images_per_prompt, prompt_embeds, negative_prompt_embeds, latents,
                                               output_type),
            callback_on_step_end, callback_on_step_end_tensor_inputs)
        size = tuple(x * self.vae_scale_factor for x in shape[2:])  # (the conditioning images')
        embeds, cond = self._text_conditioning(
            shape, do_cfg, prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip,
            size, original_size, crops_coords_top_left, target_size, negative_original_size,
            negative_crops_coords_top_left, negative_target_size)
        return self._sample(shape, embeds, (*cond, *control), num_inference_steps, guidance_scale, do_cfg, eta,
                            generator, latents, output_type, timesteps, sigmas, callback, denoising_end)
