"""SDXL text-to-image, image-to-image and inpainting guided by a ControlNet-Union net (``models/controlnet_union.py``),
with diffusers' StableDiffusionXLControlNetUnion(Img2Img|Inpaint)Pipeline semantics: the same image for the same
seed, conditioning images and weights.

One net takes several conditioning images at once, each with its control mode (for xinsir's controlnet-union-sdxl:
0 openpose, 1 depth, 2 hed/pidi/scribble/ted, 3 canny/lineart/anime lineart/mlsd, 4 normal, 5 segment; the promax
net adds tile and repaint). The rest is the SDXL ControlNet pipelines', per mode where they have one setting per
net: the images prepared as diffusers prepares them, each mode's scale, start and end, guess mode, the image-to-image
and inpainting inputs, and the loop (on CUDA the whole DDIM step with the net inside replayed from a CUDA graph).
"""
from __future__ import annotations

import torch

from .models.controlnet_union import ControlNetUnionModel
from .pipeline_controlnet import StableDiffusionXLControlNetPipeline
from .pipeline_controlnet_image import (StableDiffusionXLControlNetImg2ImgPipeline,
                                        StableDiffusionXLControlNetInpaintPipeline)


class _UnionGuidance:
    """What a ControlNet-Union pipeline changes in its ControlNet pipeline: one union net, one conditioning image
    per control mode (each with its scale, start and end), the modes' one-hot vector beside the images, the modes in
    each step's settings (a graph bakes them in: other modes, another graph), and the net's call on all the images
    at once. With one mode its scale multiplies the net's residuals; with several, each scales its image's part and
    the residuals are not scaled again, so a net whose modes are all at scale 0 still adds the residuals of the
    latents alone, as diffusers' does."""
    _each = "control mode"
    _nested_per_prompt = False  # a list of lists is one list per mode (each of one image per prompt)
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
    def _cond_names(self):  # the added conditioning, the images (one list) and the modes' one-hot vector
        return (*self._added_names, *(self._image_name,) * len(self._modes), "control_type")

    def _set_modes(self, control_mode):
        """The call's modes: an int, or a list of distinct ints below the net's num_control_type (one image each:
        the images are checked against them with the rest of the call's inputs)."""
        n = self.controlnet.config.num_control_type
        modes = list(control_mode) if isinstance(control_mode, (list, tuple)) else [control_mode]
        if not modes or any(isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < n for m in modes) or len(
                set(modes)) != len(modes):
            raise ValueError(f"control_mode must be a control mode (an int in [0, {n})) or a list of distinct ones, "
                             f"one per conditioning image, got {control_mode!r}")
        self._modes = tuple(modes)

    def _control_cond(self, images, shape, num_images_per_prompt, do_cfg, guess_mode):
        """The images as for a ControlNet, then the modes' one-hot vector (diffusers' control_type), one row per
        sample the net sees."""
        cond = super()._control_cond(images, shape, num_images_per_prompt, do_cfg, guess_mode)
        control_type = torch.zeros(self.controlnet.config.num_control_type)
        control_type[list(self._modes)] = 1.0
        return (*cond, control_type.to(self.device, self.dtype).repeat(cond[0].shape[0], 1))

    def _step_cond(self, i, steps, cond):
        *cond, settings = super()._step_cond(i, steps, cond)
        return (*cond, (*settings, self._modes))

    def _unet_call(self, model_input, t, embeds, *cond, timestep_cond=None):
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
        return self._unet_with(model_input, t, embeds, added, down, mid, timestep_cond)


class StableDiffusionXLControlNetUnionPipeline(_UnionGuidance, StableDiffusionXLControlNetPipeline):
    """diffusers' StableDiffusionXLControlNetUnionPipeline: the SDXL ControlNet pipeline's call with
    ``control_image`` (one image per mode of ``control_mode``) in place of ``image``, and ``control_mode``."""
    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")  # diffusers' names
    _image_name = "control_image"

    def __call__(self, prompt=None, prompt_2=None, control_image=None, *args, control_mode=None, **kwargs):
        self._set_modes(control_mode)
        return super().__call__(prompt, prompt_2, control_image, *args, **kwargs)


class StableDiffusionXLControlNetUnionImg2ImgPipeline(_UnionGuidance, StableDiffusionXLControlNetImg2ImgPipeline):
    """diffusers' StableDiffusionXLControlNetUnionImg2ImgPipeline: the SDXL ControlNet image-to-image pipeline's
    call, and ``control_mode`` (one per ``control_image``)."""

    def __call__(self, *args, control_mode=None, **kwargs):
        self._set_modes(control_mode)
        return super().__call__(*args, **kwargs)


class StableDiffusionXLControlNetUnionInpaintPipeline(_UnionGuidance, StableDiffusionXLControlNetInpaintPipeline):
    """diffusers' StableDiffusionXLControlNetUnionInpaintPipeline: the SDXL ControlNet inpainting pipeline's call,
    and ``control_mode`` (one per ``control_image``)."""
    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "mask", "control_image")

    def __call__(self, *args, control_mode=None, **kwargs):
        self._set_modes(control_mode)
        return super().__call__(*args, **kwargs)
