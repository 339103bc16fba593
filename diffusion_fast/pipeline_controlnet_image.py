"""Image-to-image and inpainting guided by ControlNets, with diffusers' StableDiffusionControlNetImg2ImgPipeline,
StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline and
StableDiffusionXLControlNetInpaintPipeline semantics: the same image for the same seed, images and weights.
Each is its plain pipeline (``pipeline_img2img.py``, ``pipeline_inpaint.py``) with ``ControlNetGuidance``: the nets'
images come as ``control_image``, and their start and end are fractions of the steps that run (the strength's tail).
"""
from __future__ import annotations

import torch

from .ip_adapter import ip_adapter_call
from .lora import lora_call_scale
from .pipeline import StableDiffusionPipeline
from .pipeline_common import check_given_size, given_size
from .pipeline_controlnet import SDControlNetComponents, SDXLControlNetComponents
from .pipeline_img2img import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from .pipeline_inpaint import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline


class _ControlledImageToImage:
    """The start of an image-to-image ControlNet call (SD and SDXL): the initial image (resized to ``height`` x
    ``width`` when given), then ``ControlNetGuidance._begin_call`` with the nets' images at its size."""

    def _begin_image_call(self, image, strength, height, width, control_image, control, call_inputs,
                          callback_on_step_end, callback_on_step_end_tensor_inputs):
        """(the image tensor, whether it is latents, the output height and width, then _begin_call's results);
        ``control``: the call's scale, start, end and guess mode."""
        check_given_size(self.vae_scale_factor, height, width)
        size = None if height is None and width is None else given_size(image, height, width, self.vae_scale_factor)
        image, latent_input, height, width = self._prepare_image(image, strength, size)
        return (image, latent_input, height, width, *self._begin_call(
            control_image, height, width, *control, call_inputs, callback_on_step_end,
            callback_on_step_end_tensor_inputs))


class StableDiffusionControlNetImg2ImgPipeline(_ControlledImageToImage, SDControlNetComponents,
                                               StableDiffusionImg2ImgPipeline):
    """diffusers' StableDiffusionControlNetImg2ImgPipeline: image-to-image (``image``, ``strength``) guided by the
    nets' ``control_image``, resized to the initial image's size. The nets' start and end are fractions of the steps
    that run (the strength's tail), as diffusers has them."""
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "control_image")
    _base_pipeline, _added_names, _image_name = StableDiffusionPipeline, (), "control_image"

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, control_image=None, height=None, width=None, strength=0.8,
                 num_inference_steps=50, guidance_scale=7.5, negative_prompt=None, num_images_per_prompt=1, eta=0.0,
                 generator=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
                 controlnet_conditioning_scale=0.8, guess_mode=False, control_guidance_start=0.0,
                 control_guidance_end=1.0, clip_skip=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """As diffusers': ``image`` is the initial image (resized to ``height`` x ``width`` when given), and
        ``control_image`` each net's conditioning image, resized to the initial image's size."""
        image, latent_input, height, width, shape, do_cfg, cond, callback = self._begin_image_call(
            image, strength, height, width, control_image, (controlnet_conditioning_scale, control_guidance_start,
                                                            control_guidance_end, guess_mode),
            (prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt, prompt_embeds,
             negative_prompt_embeds, None, output_type), callback_on_step_end, callback_on_step_end_tensor_inputs)
        clip_skip = self._check_clip_skip(clip_skip)  # (before the schedule is set: a refused call changes nothing)
        num_inference_steps, timesteps, do_cfg, negative_prompt_embeds, embeds = self._sd_tail_and_embeds(
            prompt, num_inference_steps, strength, None, None, guidance_scale, num_images_per_prompt,
            negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)
        if callback is not None:
            callback.extra["negative_prompt_embeds"] = negative_prompt_embeds
        latents = self._image_latents(image, latent_input, timesteps[:1].repeat(shape[0]), shape[0], embeds.dtype,
                                      generator)
        return self._denoise(latents, timesteps, embeds, cond, num_inference_steps, guidance_scale, do_cfg, eta,
                             generator, output_type, callback)


class _ControlledInpainting:
    """The start of an inpainting ControlNet call (SD and SDXL): the output size (the image's own unless height /
    width are given), ``padding_mask_crop``'s box (the nets' images cut to it too), then ``_begin_call``."""

    def _begin_inpaint_call(self, image, mask_image, control_image, height, width, padding_mask_crop, strength,
                            control, call_inputs, callback_on_step_end, callback_on_step_end_tensor_inputs):
        """(latents shape, height, width, the cropped image and mask, the box or None, whether guidance runs, the
        nets' images for the loop, the step callback); ``control``: the call's scale, start, end and guess mode;
        ``call_inputs``: prompt, negative prompt, steps, guidance, images per prompt, embeddings, output type."""
        prompt, negative_prompt, steps, guidance_scale, per_prompt, prompt_embeds, negative_embeds, output_type = \
            call_inputs
        check_given_size(self.vae_scale_factor, height, width)
        height, width = given_size(image, height, width, self.vae_scale_factor) or (height, width)
        shape = self._latent_shape(strength, image, mask_image, height, width, prompt, negative_prompt, steps,
                                   guidance_scale, per_prompt, prompt_embeds, negative_embeds, output_type)
        crop_image, crop_mask, box = self._crop_to_mask(image, mask_image, padding_mask_crop, output_type, shape)
        height, width = shape[2] * self.vae_scale_factor, shape[3] * self.vae_scale_factor
        if box is not None:  # the nets' images cut to the image's box and filled to the output size, as diffusers
            control_image = _cropped_controls(control_image, box, width, height)
        _, do_cfg, cond, callback = self._begin_call(
            control_image, height, width, *control, (prompt, negative_prompt, steps, guidance_scale, per_prompt,
                                                     prompt_embeds, negative_embeds, None, output_type),
            callback_on_step_end, callback_on_step_end_tensor_inputs)
        return shape, height, width, crop_image, crop_mask, box, do_cfg, cond, callback


class StableDiffusionControlNetInpaintPipeline(_ControlledInpainting, SDControlNetComponents,
                                               StableDiffusionInpaintPipeline):
    """diffusers' StableDiffusionControlNetInpaintPipeline: inpainting (an inpainting UNet, or a plain one blended)
    guided by the nets' ``control_image``. The output has the image's own size unless ``height`` / ``width`` are
    given (not the UNet's default, as diffusers' ControlNet inpainting has it); with ``padding_mask_crop`` the
    control images are cut to the same box as the image. The nets take the latents alone, not the mask and masked
    image an inpainting UNet gets beside them."""
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "control_image", "mask",
                               "masked_image_latents")
    _base_pipeline, _image_name = StableDiffusionInpaintPipeline, "control_image"  # (it loads inpainting UNets)

    @property
    def _added_names(self):  # an inpainting UNet's inputs beside the latents (a plain UNet's blend takes none)
        plain = self.unet.config.in_channels == self.vae.config.latent_channels
        return () if plain else StableDiffusionInpaintPipeline._cond_names

    @staticmethod
    def _nets_added(added, half):
        return None  # (the mask and the masked image's latents are the UNet's alone)

    def _unet_with(self, model_input, t, embeds, added, down, mid, timestep_cond=None):
        return self.unet(torch.cat([model_input, *added], dim=1) if added else model_input, t, embeds, None, down,
                         mid, timestep_cond=timestep_cond)

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, mask_image=None, control_image=None, height=None, width=None,
                 padding_mask_crop=None, strength=1.0, num_inference_steps=50, guidance_scale=7.5,
                 negative_prompt=None, num_images_per_prompt=1, eta=0.0, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
                 controlnet_conditioning_scale=0.5, guess_mode=False, control_guidance_start=0.0,
                 control_guidance_end=1.0, clip_skip=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """As diffusers': ``image`` and ``mask_image`` as inpainting takes them, ``control_image`` each net's
        conditioning image (resized to the output size), the default scale 0.5."""
        shape, height, width, crop_image, crop_mask, box, do_cfg, cond, callback = self._begin_inpaint_call(
            image, mask_image, control_image, height, width, padding_mask_crop, strength,
            (controlnet_conditioning_scale, control_guidance_start, control_guidance_end, guess_mode),
            (prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt, prompt_embeds,
             negative_prompt_embeds, output_type), callback_on_step_end, callback_on_step_end_tensor_inputs)
        clip_skip = self._check_clip_skip(clip_skip)  # (before the schedule is set: a refused call changes nothing)
        init_image, mask_condition = self._image_and_mask(crop_image, crop_mask, None, shape, latents)
        num_inference_steps, timesteps, do_cfg, negative_prompt_embeds, embeds = self._sd_tail_and_embeds(
            prompt, num_inference_steps, strength, None, None, guidance_scale, num_images_per_prompt,
            negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)
        latents, mask, masked = self._inpaint_latents(init_image, mask_condition, None, latents, shape, timesteps,
                                                      embeds.dtype, generator, strength, do_cfg)
        if callback is not None:
            callback.extra.update(negative_prompt_embeds=negative_prompt_embeds, mask=mask, masked_image_latents=masked)
        inpainting = () if self._blend is not None else (mask, masked)
        output = self._denoise_and_unblend(latents, timesteps, embeds, (*inpainting, *cond), num_inference_steps,
                                           guidance_scale, do_cfg, eta, generator, output_type, callback)
        return self._paste_back(output, image, mask_image, box)


def _cropped_controls(control_image, box, width, height):
    """padding_mask_crop's box cut from each PIL conditioning image (nested lists too) and filled to the output
    size (diffusers' crops_coords with resize mode "fill"); tensors as they are (diffusers crops PIL images only)."""
    import PIL.Image

    from .mask_crop import resize_fill

    if isinstance(control_image, (list, tuple)):
        return [_cropped_controls(im, box, width, height) for im in control_image]
    if isinstance(control_image, PIL.Image.Image):
        return resize_fill(control_image.crop(box), width, height)
    return control_image


class StableDiffusionXLControlNetImg2ImgPipeline(_ControlledImageToImage, SDXLControlNetComponents,
                                                 StableDiffusionXLImg2ImgPipeline):
    """diffusers' StableDiffusionXLControlNetImg2ImgPipeline: SDXL image-to-image (the initial image encoded as SDXL's
    VAE wants it, the strength's tail, SDXL's prompts, size ids and aesthetic scores) guided by the nets'
    ``control_image``, resized to the initial image's size; the nets take the pooled embeddings and size ids too."""
    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "control_image")
    _base_pipeline, _image_name = StableDiffusionXLImg2ImgPipeline, "control_image"  # (it loads refiner folders)

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, image=None, control_image=None, height=None, width=None,
                 strength=0.8, num_inference_steps=50, guidance_scale=5.0, negative_prompt=None,
                 negative_prompt_2=None, num_images_per_prompt=1, eta=0.0, generator=None, prompt_embeds=None,
                 negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 output_type="pil", controlnet_conditioning_scale=0.8, guess_mode=False, control_guidance_start=0.0,
                 control_guidance_end=1.0, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                 negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None,
                 aesthetic_score=6.0, negative_aesthetic_score=2.5, clip_skip=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """As diffusers': SDXL image-to-image's arguments, and ``control_image`` each net's conditioning image."""
        image, latent_input, height, width, shape, do_cfg, cond, callback = self._begin_image_call(
            image, strength, height, width, control_image, (controlnet_conditioning_scale, control_guidance_start,
                                                            control_guidance_end, guess_mode),
            (prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt, prompt_embeds,
             negative_prompt_embeds, None, output_type), callback_on_step_end, callback_on_step_end_tensor_inputs)
        clip_skip = self._check_clip_skip(clip_skip)  # (before the schedule is set: a refused call changes nothing)
        sizes = self._check_image_call(
            None, None, aesthetic_score, negative_aesthetic_score, 0.0, prompt, prompt_2, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, height, width,
            original_size, crops_coords_top_left, target_size, negative_original_size,
            negative_crops_coords_top_left, negative_target_size)
        num_inference_steps = self._set_timesteps(num_inference_steps, self.device)
        timesteps = self._tail(num_inference_steps, strength)
        embeds, added = self._image_conditioning(
            prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, do_cfg, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, sizes, aesthetic_score,
            negative_aesthetic_score, shape[0], clip_skip)
        latents = self._image_latents(image, latent_input, timesteps[:1].repeat(shape[0]), shape[0], embeds.dtype,
                                      generator)
        return self._denoise(latents, timesteps, embeds, (*added, *cond), num_inference_steps, guidance_scale, do_cfg,
                             eta, generator, output_type, callback)


class StableDiffusionXLControlNetInpaintPipeline(_ControlledInpainting, SDXLControlNetComponents,
                                                 StableDiffusionXLInpaintPipeline):
    """diffusers' StableDiffusionXLControlNetInpaintPipeline: SDXL inpainting (SDXL's inpainting UNet, or a plain
    one blended; ``denoising_start`` / ``denoising_end``, aesthetic scores, ``padding_mask_crop``) guided by the
    nets' ``control_image``, resized to the output size (the image's own unless ``height`` / ``width`` are given). As
    diffusers has them: the nets' start and end are fractions of the strength's tail before ``denoising_end`` cuts
    it; the negative size ids take the positive crop corner; the nets take the pooled embeddings and size ids, not
    the mask inputs."""
    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "mask",
                               "masked_image_latents", "control_image")
    _base_pipeline, _image_name = StableDiffusionXLInpaintPipeline, "control_image"  # (it loads inpainting UNets)
    _tail_steps = None  # the call's strength tail, before denoising_end: what the nets' start and end divide

    @property
    def _added_names(self):  # SDXL's added conditioning, then an inpainting UNet's inputs beside the latents
        plain = self.unet.config.in_channels == self.vae.config.latent_channels
        return StableDiffusionXLInpaintPipeline._cond_names[:2 if plain else 4]

    def _step_cond(self, i, steps, cond):
        return super()._step_cond(i, self._tail_steps, cond)

    def _unet_with(self, model_input, t, embeds, added, down, mid, timestep_cond=None):
        text_embeds, time_ids, *mask_inputs = added
        if mask_inputs:
            model_input = torch.cat([model_input, *mask_inputs], dim=1)
        return self.unet(model_input, t, embeds, {"text_embeds": text_embeds, "time_ids": time_ids}, down, mid,
                         timestep_cond=timestep_cond)

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, image=None, mask_image=None, control_image=None, height=None,
                 width=None, padding_mask_crop=None, strength=0.9999, num_inference_steps=50, denoising_start=None,
                 denoising_end=None, guidance_scale=5.0, negative_prompt=None, negative_prompt_2=None,
                 num_images_per_prompt=1, eta=0.0, generator=None, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 output_type="pil", controlnet_conditioning_scale=1.0, guess_mode=False, control_guidance_start=0.0,
                 control_guidance_end=1.0, guidance_rescale=0.0, original_size=None, crops_coords_top_left=(0, 0),
                 target_size=None, aesthetic_score=6.0, negative_aesthetic_score=2.5, clip_skip=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        """As diffusers', with its defaults (strength 0.9999, guidance 5.0, the nets' scale 1.0)."""
        shape, height, width, crop_image, crop_mask, box, do_cfg, control, callback = self._begin_inpaint_call(
            image, mask_image, control_image, height, width, padding_mask_crop, strength,
            (controlnet_conditioning_scale, control_guidance_start, control_guidance_end, guess_mode),
            (prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt, prompt_embeds,
             negative_prompt_embeds, output_type), callback_on_step_end, callback_on_step_end_tensor_inputs)
        clip_skip = self._check_clip_skip(clip_skip)  # (before the schedule is set: a refused call changes nothing)
        sizes = self._check_image_call(
            denoising_start, denoising_end, aesthetic_score, negative_aesthetic_score, guidance_rescale, prompt,
            prompt_2, negative_prompt_2, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
            negative_pooled_prompt_embeds, height, width, original_size, crops_coords_top_left, target_size, None,
            crops_coords_top_left, None)
        init_image, mask_condition = self._image_and_mask(crop_image, crop_mask, None, shape, latents)
        num_inference_steps = self._set_timesteps(num_inference_steps, self.device)
        timesteps = self._tail(num_inference_steps, strength, denoising_start)
        embeds, added = self._image_conditioning(
            prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, do_cfg, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, sizes, aesthetic_score,
            negative_aesthetic_score, shape[0], clip_skip)
        latents, mask, masked = self._inpaint_latents(init_image, mask_condition, None, latents, shape, timesteps,
                                                      embeds.dtype, generator, strength, do_cfg,
                                                      add_noise=denoising_start is None)
        self._tail_steps = len(timesteps)
        timesteps = self._end_at(timesteps, denoising_end)
        if callback is not None:
            callback.extra.update(mask=mask, masked_image_latents=masked)
        inpainting = () if self._blend is not None else (mask, masked)
        output = self._denoise_and_unblend(latents, timesteps, embeds, (*added, *inpainting, *control),
                                           num_inference_steps, guidance_scale, do_cfg, eta, generator, output_type,
                                           callback)
        return self._paste_back(output, image, mask_image, box)
