"""Text-to-image guided by T2I-Adapters, with diffusers' StableDiffusionAdapterPipeline and
StableDiffusionXLAdapterPipeline semantics: the same image for the same seed, conditioning images and weights.

The adapter (or a MultiAdapter, several summed with weights) turns the conditioning image into one feature map per
UNet level once per call, before the loop; scaled by ``adapter_conditioning_scale``, repeated to the batch and
doubled for guidance, the maps are inputs of every step's UNet call, which adds them inside its down blocks
(``down_intrablock_additional_residuals``). ``adapter_conditioning_factor`` gives them the first fraction of the
steps. The loop is the SD pipeline's: fused scheduler steps and, on CUDA, the whole DDIM step (the maps are graph
inputs) or the UNet call replayed from a CUDA graph. Unlike ControlNet, nothing runs per step but the UNet.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .ip_adapter import ip_adapter_call
from .lora import lora_call_scale
from .models.t2i_adapter import MultiAdapter, T2IAdapter
from .pipeline import StableDiffusionPipeline
from .pipeline_common import GuidedComponents, check_denoising_bounds, check_given_size, checked_model, given_size
from .pipeline_controlnet import prepare_control_image
from .pipeline_xl import StableDiffusionXLPipeline


def load_adapter(folder, index, dtype=None, device=None, variant=None):
    """The adapter a diffusers adapter pipeline folder holds: adapter/ (a MultiAdapter's in adapter/, adapter_1/, ...
    as diffusers saves them)."""
    entry = index.get("adapter")
    if not isinstance(entry, list) or not os.path.isdir(os.path.join(folder, "adapter")):
        raise ValueError(f"{folder!r} holds no T2I-Adapter: pass adapter=diffusion_fast.T2IAdapter.from_pretrained"
                         "(path) (or a list of them)")
    if entry[1] != "MultiAdapter":
        return T2IAdapter.from_pretrained(folder, dtype, device, subfolder="adapter", variant=variant)
    names = ["adapter"]
    while os.path.isdir(os.path.join(folder, f"adapter_{len(names)}")):
        names.append(f"adapter_{len(names)}")
    return MultiAdapter([T2IAdapter.from_pretrained(folder, dtype, device, subfolder=name, variant=variant)
                         for name in names])


class AdapterGuidance(GuidedComponents):
    """What the T2I-Adapter pipelines add to their plain pipeline: the adapter, its fit to the UNet, the
    conditioning images, the feature maps as loop inputs and each step's choice of them (``_step_cond``)."""
    _guide, _load_guide = "adapter", staticmethod(load_adapter)  # (GuidedComponents)
    _steps_counted = None  # diffusers' num_inference_steps of the call, which the conditioning factor multiplies
    _factor = 1.0  # the call's adapter_conditioning_factor

    def _set_adapter(self, adapter):
        self._adapter = self._as_adapter(adapter)

    @staticmethod
    def _as_adapter(adapter):
        if isinstance(adapter, (list, tuple)):
            adapter = MultiAdapter(adapter)
        if not isinstance(adapter, (T2IAdapter, MultiAdapter)):
            raise TypeError("adapter must be a diffusion_fast T2IAdapter (diffusion_fast.T2IAdapter.from_pretrained("
                            f"folder)), a list of them or a MultiAdapter, got {type(adapter).__module__}."
                            f"{type(adapter).__name__}")
        return adapter

    adapter = checked_model("adapter", "_as_adapter", "The T2IAdapter (or MultiAdapter); one assigned (a list, as "
                            "diffusers takes several) is checked against the UNet as at construction, and one that "
                            "does not fit leaves the old one in place.")

    @property
    def _adapters(self):
        return list(self.adapter.adapters) if isinstance(self.adapter, MultiAdapter) else [self.adapter]

    @property
    def _cond_names(self):  # the plain pipeline's added conditioning (SDXL's), then the feature maps (one list)
        return (*self._added_names, *("adapter_state",) * len(self.adapter.feature_shapes()))

    def _models(self):
        models = super()._models()
        return dict(models, moved=(*models["moved"], self.adapter))

    def _check_components(self):
        """The adapter's feature maps must land where diffusers' UNet adds them (``intrablock_shapes``): each in
        turn at a down block of its width and scale, and a last one at the mid block's; none left over."""
        super()._check_components()
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        *down, mid = [(width, scale * vae_scale) for width, scale in self.unet.intrablock_shapes()]
        features = self.adapter.feature_shapes()
        fits = len(features) <= len(down) + 1 and features[:len(down)] == down[:len(features)] and (
            len(features) <= len(down) or features[-1] == mid)
        if not fits:
            raise ValueError(f"adapter (feature maps of (channels, downscale from the image) {features}) does not fit "
                             f"this UNet, which adds them at {down} and at its mid block {mid}: a T2I-Adapter for "
                             "another model (an SD adapter for SDXL, or the other way round)?")

    def _begin_adapter_call(self, image, height, width, adapter_conditioning_scale, adapter_conditioning_factor):
        """The call's conditioning images (one batch per adapter), output size and adapter weights, checked. The
        size defaults to the first image's, cut down to a multiple of the adapter's downscale factor (diffusers')."""
        check_given_size(self.vae_scale_factor, height, width)
        n, factor = len(self._adapters), self.adapter.downscale_factor
        images = list(image) if n > 1 and isinstance(image, (list, tuple)) else [image]
        if len(images) != n or any(im is None for im in images):
            raise ValueError("image: give a conditioning image" if n == 1 else
                             f"image: {n} adapters take a list of {n} conditioning images")
        size = given_size(images[0], height, width, factor)
        if size is None:
            raise TypeError(f"image must be a PIL image, a tensor or numpy images, or a list of them, got "
                            f"{type(images[0]).__name__}")
        height, width = size
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % factor:
                raise ValueError(f"{name} must be a positive multiple of the adapter's downscale_factor {factor}, got "
                                 f"{value}")
        weights = adapter_conditioning_scale if isinstance(adapter_conditioning_scale, (list, tuple)) else \
            [adapter_conditioning_scale] * n
        if len(weights) != n or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and np.isfinite(w)
                                        for w in weights):
            raise ValueError(f"adapter_conditioning_scale must be a number or a list of {n} numbers (one per adapter), "
                             f"got {adapter_conditioning_scale!r}")
        if (isinstance(adapter_conditioning_factor, bool) or not isinstance(adapter_conditioning_factor, (int, float))
                or not 0.0 <= adapter_conditioning_factor <= 1.0):
            raise ValueError(f"adapter_conditioning_factor must be a number in [0, 1] (the fraction of the steps the "
                             f"adapter acts in), got {adapter_conditioning_factor!r}")
        self._factor = float(adapter_conditioning_factor)
        prepared = []
        for i, (im, adapter) in enumerate(zip(images, self._adapters)):
            which = f"image{f' {i}' if n > 1 else ''}"
            pixels = prepare_control_image(im, height, width, self.vae_scale_factor, which, keep_mode=True)
            if pixels.shape[1] != adapter.config.in_channels:
                gray = " (a grayscale image)" if adapter.config.in_channels == 1 else ""
                raise ValueError(f"{which} has {pixels.shape[1]} channels; adapter {i} takes "
                                 f"{adapter.config.in_channels}{gray}")
            prepared.append(pixels)
        return prepared, height, width, [float(w) for w in weights]

    @torch.no_grad()
    def _adapter_states(self, images, weights, shape, num_images_per_prompt, do_cfg):
        """The feature maps, scaled (a MultiAdapter's weights are its scales, as diffusers passes them), each image's
        repeated to its prompt's images (one image serves every prompt) and doubled for guidance."""
        batch = shape[0] // num_images_per_prompt  # prompts
        for i, im in enumerate(images):
            if im.shape[0] not in (1, batch):
                raise ValueError(f"image{f' {i}' if len(images) > 1 else ''} has {im.shape[0]} images for {batch} "
                                 "prompts: give one, or one per prompt")
        inputs = [im.to(device=self.device, dtype=self.adapter.dtype) for im in images]
        if isinstance(self.adapter, MultiAdapter):
            features = self.adapter(inputs, weights)
        else:
            features = [f * weights[0] for f in self.adapter(inputs[0])]
        states = []
        for f in features:
            f = f.repeat_interleave(shape[0] // f.shape[0], dim=0).to(self.dtype)
            states.append(torch.cat([f, f]) if do_cfg else f)
        return tuple(states)

    def _set_timesteps(self, num_inference_steps, device, timesteps=None, sigmas=None):
        steps = super()._set_timesteps(num_inference_steps, device, timesteps, sigmas)
        self._steps_counted = steps
        return steps

    def _end_at(self, timesteps, denoising_end):
        kept = super()._end_at(timesteps, denoising_end)
        if denoising_end is not None:  # diffusers recounts its steps after the cut
            self._steps_counted = len(kept)
        return kept

    def _step_cond(self, i, steps, cond):
        """The feature maps in the first ``int(steps * adapter_conditioning_factor)`` steps (diffusers' count of
        steps: the schedule's, or the steps left by ``denoising_end``), none after."""
        cond = super()._step_cond(i, steps, cond)
        on = i < int(self._steps_counted * self._factor)
        return cond if on else cond[:len(self._added_names)]

    def _unet_call(self, model_input, t, embeds, *cond, timestep_cond=None):
        added, states = cond[:len(self._added_names)], cond[len(self._added_names):]
        return self.unet(model_input, t, embeds, dict(zip(("text_embeds", "time_ids"), added)) or None, None, None,
                         list(states) or None, timestep_cond=timestep_cond)



class StableDiffusionAdapterPipeline(AdapterGuidance, StableDiffusionPipeline):
    """diffusers' StableDiffusionAdapterPipeline (SD 1.x/2.x), and ``adapter_conditioning_factor`` as its SDXL
    pipeline has it."""
    _base_pipeline, _added_names = StableDiffusionPipeline, ()
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "adapter_state")

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, adapter, *, cuda_graph="auto",
                 channels_last="auto"):
        self._set_adapter(adapter)
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, cuda_graph=cuda_graph,
                         channels_last=channels_last)


    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, height=None, width=None, num_inference_steps=50, timesteps=None,
                 sigmas=None, guidance_scale=7.5, negative_prompt=None, num_images_per_prompt=1, eta=0.0,
                 generator=None, latents=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
                 adapter_conditioning_scale=1.0, adapter_conditioning_factor=1.0, clip_skip=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        """As diffusers': ``image`` the conditioning image (a list of one per adapter with several) sets the output
        size unless ``height`` / ``width`` are given; ``adapter_conditioning_scale`` a number or one per adapter."""
        images, height, width, weights = self._begin_adapter_call(image, height, width, adapter_conditioning_scale,
                                                                  adapter_conditioning_factor)
        shape = self._check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, prompt_embeds, negative_prompt_embeds, latents, output_type)
        clip_skip = self._check_clip_skip(clip_skip)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        do_cfg = self._guided(guidance_scale)
        states = self._adapter_states(images, weights, shape, num_images_per_prompt, do_cfg)
        embeds = self._text_embeds(prompt, negative_prompt, num_images_per_prompt, do_cfg, prompt_embeds,
                                   negative_prompt_embeds, clip_skip, callback)
        return self._sample(shape, embeds, states, num_inference_steps, guidance_scale, do_cfg, eta, generator,
                            latents, output_type, timesteps, sigmas, callback)


class StableDiffusionXLAdapterPipeline(AdapterGuidance, StableDiffusionXLPipeline):
    """diffusers' StableDiffusionXLAdapterPipeline: SDXL's text and size conditioning, ``denoising_end`` and
    ``guidance_rescale``, with the adapter's feature maps (its last one at the mid block, as SDXL's adapter has it)
    for the first ``adapter_conditioning_factor`` of the steps."""
    _base_pipeline, _added_names = StableDiffusionXLPipeline, StableDiffusionXLPipeline._cond_names
    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "adapter_state")
    _begins_at_zero = False  # (diffusers' SDXL adapter pipeline sets no begin index)

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, adapter, *,
                 force_zeros_for_empty_prompt=True, requires_aesthetics_score=False, cuda_graph="auto",
                 channels_last="auto"):
        """(``requires_aesthetics_score`` is refused: a refiner's UNet takes no adapter here, as in diffusers.)"""
        self._set_adapter(adapter)
        super().__init__(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                         requires_aesthetics_score=requires_aesthetics_score, cuda_graph=cuda_graph,
                         channels_last=channels_last)

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, image=None, height=None, width=None, num_inference_steps=50,
                 timesteps=None, sigmas=None, denoising_end=None, guidance_scale=5.0, negative_prompt=None,
                 negative_prompt_2=None, num_images_per_prompt=1, eta=0.0, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", guidance_rescale=0.0, original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, adapter_conditioning_scale=1.0,
                 adapter_conditioning_factor=1.0, clip_skip=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """As diffusers': the SD adapter pipeline's image and scale, SDXL's prompts, sizes, ``denoising_end`` and
        ``guidance_rescale``, and ``adapter_conditioning_factor``."""
        check_denoising_bounds(denoising_end=denoising_end)
        images, height, width, weights = self._begin_adapter_call(image, height, width, adapter_conditioning_scale,
                                                                  adapter_conditioning_factor)
        shape = self._check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                   num_images_per_prompt, prompt_embeds, negative_prompt_embeds, latents, output_type)
        self._set_guidance_rescale(guidance_rescale)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        do_cfg = self._guided(guidance_scale)
        states = self._adapter_states(images, weights, shape, num_images_per_prompt, do_cfg)
        embeds, cond = self._text_conditioning(
            shape, do_cfg, prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip,
            (height, width), original_size, crops_coords_top_left, target_size, negative_original_size,
            negative_crops_coords_top_left, negative_target_size)
        return self._sample(shape, embeds, (*cond, *states), num_inference_steps, guidance_scale, do_cfg, eta,
                            generator, latents, output_type, timesteps, sigmas, callback, denoising_end)
