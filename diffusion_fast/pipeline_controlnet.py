"""Text-to-image guided by ControlNets, with diffusers' StableDiffusionControlNetPipeline and
StableDiffusionXLControlNetPipeline semantics: the same image for the same seed, conditioning images and weights.
(Image-to-image and inpainting guided by them: ``pipeline_controlnet_image.py``, on the same ControlNetGuidance.)

Each conditioning image is prepared as diffusers' control image processor prepares it (a PIL image resized to the
output size, Lanczos, in its own mode and then converted to RGB; pixels in [0, 1], not normalised; a tensor resized
nearest), repeated to the batch, and doubled for guidance. At each step every ControlNet runs on the step's model
input and adds its residuals, times its conditioning scale, to the UNet's skips; ``control_guidance_start`` /
``control_guidance_end`` give each net the fraction of the steps it acts in, and ``guess_mode`` runs the nets on the
conditional half alone with diffusers' rising scales. The loop is the SD pipeline's (fused scheduler steps, and on
CUDA the whole DDIM step, ControlNets included, or the ControlNets' and UNet's call replayed from a CUDA graph). A
net whose scale is 0 at a step (outside its start and end) is not run: diffusers adds its residuals times 0, exact
zeros, so the image is the same and the step is cheaper.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .ip_adapter import ip_adapter_call
from .lora import lora_call_scale
from .models import ControlNetModel, MultiControlNetModel
from .models.unet import _per_block
from .pipeline import StableDiffusionPipeline
from .pipeline_common import (GuidedComponents, check_denoising_bounds, check_given_size, checked_model,
                              numpy_images)
from .pipeline_xl import StableDiffusionXLPipeline


def prepare_control_image(image, height, width, scale, name="image", keep_mode=False) -> torch.Tensor:
    """diffusers' control image processor (VaeImageProcessor with do_normalize=False, do_convert_rgb=True): PIL
    images (one or a list) resized to (height, width), each None taken from the (first) image and cut down to a
    multiple of ``scale``, then RGB, in [0, 1]; a (B, C, H, W) or (C, H, W) tensor, or a list of them, resized
    (nearest) the same way, and numpy images too (``numpy_images``). With ``keep_mode`` (diffusers' T2I-Adapter
    preprocessing) a PIL image keeps its mode: a grayscale one is one channel. Returns a float32 (B, C, H, W)
    tensor; errors name the argument as ``name``."""
    import PIL.Image

    image = numpy_images(image, name)
    images = image if isinstance(image, (list, tuple)) else [image]
    if images and all(isinstance(im, PIL.Image.Image) for im in images):
        width, height = (given if given is not None else x for given, x in zip((width, height), images[0].size))
        width, height = width - width % scale, height - height % scale
        if width == 0 or height == 0:
            raise ValueError(f"{name} is {images[0].size[0]}x{images[0].size[1]}: smaller than the VAE's scale {scale}")
        images = [im.resize((width, height), resample=PIL.Image.LANCZOS) for im in images]
        if keep_mode and any(im.mode != images[0].mode for im in images):
            raise ValueError(f"{name}: the images have different modes ({[im.mode for im in images]}): give them "
                             "in one mode")
        arrays = [np.array(im if keep_mode else im.convert("RGB")).astype(np.float32) / 255.0 for im in images]
        return torch.from_numpy(np.stack([a[..., None] if a.ndim == 2 else a for a in arrays]).transpose(0, 3, 1, 2))
    if images and all(torch.is_tensor(im) and im.dim() == images[0].dim() for im in images):
        batch = torch.cat(images) if images[0].dim() == 4 else torch.stack(images)
        if batch.dim() != 4 or not batch.is_floating_point():
            raise ValueError(f"{name}: a tensor must be a float (B, C, H, W) batch or (C, H, W) image in [0, 1], got "
                             f"{images[0].dtype} of shape {tuple(images[0].shape)}")
        height, width = (given if given is not None else x for given, x in zip((height, width), batch.shape[2:]))
        height, width = height - height % scale, width - width % scale
        if (height, width) != tuple(batch.shape[2:]):
            batch = torch.nn.functional.interpolate(batch, size=(height, width))
        return batch.float()
    raise TypeError(f"{name} must be a PIL image, a (B, C, H, W) or (C, H, W) tensor, numpy images, or a list of "
                    "PIL images or tensors, got "
                    f"{type(image).__name__}")


def _net_settings(name, value, nets, kind=float, each="ControlNet"):
    """A per-ControlNet setting (per ``each``: a union net's control mode): one number for every net, or a list of
    one per net."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * nets
    if len(values) != nets or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                                      for v in values):
        raise ValueError(f"{name} must be a number or a list of {nets} numbers (one per {each}), got {value!r}")
    return [kind(v) for v in values]


def load_controlnet(folder, index, dtype=None, device=None, variant=None):
    """The ControlNet a diffusers ControlNet pipeline folder holds: controlnet/ (a MultiControlNetModel's nets in
    controlnet/, controlnet_1/, ... as diffusers saves them)."""
    entry = index.get("controlnet")
    if not isinstance(entry, list) or not os.path.isdir(os.path.join(folder, "controlnet")):
        raise ValueError(f"{folder!r} holds no ControlNet: pass controlnet=diffusion_fast.models.ControlNetModel"
                         ".from_pretrained(path) (or a list of them)")
    if entry[1] == "MultiControlNetUnionModel":
        raise ValueError(f"{folder!r} holds several ControlNet-Union nets (a MultiControlNetUnionModel): not "
                         "mirrored; one ControlNetUnionModel is")
    if entry[1] == "ControlNetUnionModel":
        from .models.controlnet_union import ControlNetUnionModel

        return ControlNetUnionModel.from_pretrained(folder, dtype, device, subfolder="controlnet", variant=variant)
    if entry[1] != "MultiControlNetModel":
        return ControlNetModel.from_pretrained(folder, dtype, device, subfolder="controlnet", variant=variant)
    names = ["controlnet"]
    while os.path.isdir(os.path.join(folder, f"controlnet_{len(names)}")):
        names.append(f"controlnet_{len(names)}")
    return MultiControlNetModel([ControlNetModel.from_pretrained(folder, dtype, device, subfolder=name,
                                                                 variant=variant) for name in names])


class ControlNetGuidance(GuidedComponents):
    """What every ControlNet pipeline adds to its plain pipeline (text-to-image, SDXL's, image-to-image, inpainting):
    the nets (``controlnet``), their fit to the UNet, the conditioning images, each step's scales (``_step_cond``)
    and the nets' residuals in the UNet call."""
    _guide, _load_guide = "controlnet", staticmethod(load_controlnet)  # (GuidedComponents)
    _callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "image")  # diffusers' names
    _image_name = "image"  # the step callback's name for the nets' images
    _keep_over_schedule = False  # whether a net's start and end are fractions of the whole schedule (SDXL's)

    def _set_controlnet(self, controlnet):
        self._controlnet = self._as_controlnet(controlnet)
        self._control = None  # the current call's (scales, starts, ends, guess_mode, split) for _step_cond

    @staticmethod
    def _as_controlnet(controlnet):
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        if not isinstance(controlnet, (ControlNetModel, MultiControlNetModel)):
            raise TypeError("controlnet must be a diffusion_fast ControlNetModel (diffusion_fast.models.ControlNetModel"
                            ".from_pretrained(folder)), a list of them or a MultiControlNetModel, got "
                            f"{type(controlnet).__module__}.{type(controlnet).__name__}")
        return controlnet

    controlnet = checked_model("controlnet", "_as_controlnet", "The ControlNet (or MultiControlNetModel); one "
                               "assigned (a list of nets, as diffusers takes them) is checked against the UNet as at "
                               "construction, and a net that does not fit leaves the old one in place.")

    @property
    def _nets(self):
        return list(self.controlnet.nets) if isinstance(self.controlnet, MultiControlNetModel) else [self.controlnet]

    @property
    def _image_nets(self):
        """The net each conditioning image of a call goes to: one image per net (a union net takes one per mode)."""
        return self._nets

    _each = "ControlNet"  # what each conditioning image is for, in messages
    _nested_per_prompt = True  # diffusers' [[canny_1, pose_1], [canny_2, pose_2]]: one list per prompt

    @property
    def _cond_names(self):  # the text-to-image pipeline's added conditioning (SDXL's), then one image per net
        return (*self._added_names, *(self._image_name,) * len(self._image_nets))  # (several: one list)

    def _check_components(self):
        """Each ControlNet must give the residuals this UNet takes, from the same conditioning."""
        super()._check_components()
        c = self.unet.config
        layers = _per_block(c.layers_per_block, len(c.block_out_channels), "layers_per_block")
        want = [c.block_out_channels[0]] + [ch for i, ch in enumerate(c.block_out_channels)
                                            for _ in range(layers[i] + (i < len(layers) - 1))]
        cross = set(c.cross_attention_dim) if isinstance(c.cross_attention_dim, (list, tuple)) else \
            {c.cross_attention_dim}
        fields = ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
        latent = self.vae.config.latent_channels  # (what the nets take: an inpainting UNet takes more channels)
        for i, net in enumerate(self._nets):
            got = [conv.in_channels for conv in net.controlnet_down_blocks]
            n = net.config
            if (got != want or cross != {n.cross_attention_dim} or n.in_channels != latent
                    or any(n[f] != c[f] for f in fields)):
                theirs = ", ".join(f"{f} {n[f]!r}" for f in fields)
                ours = ", ".join(f"{f} {c[f]!r}" for f in fields)
                raise ValueError(f"controlnet {i} (residual widths {got}, cross_attention_dim {n.cross_attention_dim}, "
                                 f"in_channels {n.in_channels}, {theirs}) does not fit this UNet (residual widths "
                                 f"{want}, cross_attention_dim {c.cross_attention_dim}, latents of {latent} "
                                 f"channels, {ours}): a ControlNet trained for another model")

    def _models(self):
        models = super()._models()
        return {kind: (*found, self.controlnet) for kind, found in models.items()}

    def _check_control(self, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                       guess_mode):
        """(scales, starts, ends): one each per net (per conditioning image), checked."""
        nets, each = len(self._image_nets), self._each
        scales = _net_settings("controlnet_conditioning_scale", controlnet_conditioning_scale, nets, each=each)
        starts = _net_settings("control_guidance_start", control_guidance_start, nets, each=each)
        ends = _net_settings("control_guidance_end", control_guidance_end, nets, each=each)
        for start, end in zip(starts, ends):
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(f"control_guidance_start {start} and control_guidance_end {end}: fractions of the "
                                 "schedule with 0 <= start < end <= 1")
        if not isinstance(guess_mode, bool):
            raise TypeError(f"guess_mode must be a bool, got {guess_mode!r}")
        return scales, starts, ends

    def _begin_call(self, image, height, width, controlnet_conditioning_scale, control_guidance_start,
                    control_guidance_end, guess_mode, call_inputs, callback_on_step_end,
                    callback_on_step_end_tensor_inputs):
        """A call's checks and conditioning images; the output size is the first image's unless height / width are
        given. ``call_inputs``: the text-to-image pipeline's ``_check_inputs`` arguments but the size. Returns
        (latents shape, whether guidance runs, each net's images for the loop, the step callback); this call's
        per-net settings are kept for ``_step_cond``."""
        scales, starts, ends = self._check_control(controlnet_conditioning_scale, control_guidance_start,
                                                   control_guidance_end, guess_mode)
        images = self._control_images(image, height, width)
        prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt, *rest = call_inputs
        shape = self._check_inputs(prompt, negative_prompt, *images[0].shape[2:], num_inference_steps, guidance_scale,
                                   num_images_per_prompt, *rest)
        callback = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        guess_mode = guess_mode or self._nets[0].config.global_pool_conditions
        do_cfg = self._guided(guidance_scale)
        self._control = (scales, starts, ends, guess_mode, guess_mode and do_cfg)
        return shape, do_cfg, self._control_cond(images, shape, num_images_per_prompt, do_cfg, guess_mode), callback

    def _control_images(self, image, height, width):
        """One prepared (not yet repeated) conditioning image batch per net; the later nets' at the first's size."""
        check_given_size(self.vae_scale_factor, height, width)
        nets = len(self._image_nets)
        if nets > 1:
            if not isinstance(image, (list, tuple)) or len(image) != nets:
                given = f" of {len(image)}" if isinstance(image, (list, tuple)) else ""
                raise ValueError(f"{self._image_name}: {nets} {self._each}s take a list of {nets} conditioning "
                                 f"images (or a list of {nets} lists, one image per prompt each), got "
                                 f"{type(image).__name__}{given}")
            if self._nested_per_prompt and any(isinstance(im, list) for im in image):  # (to one list per net)
                image = [list(per_net) for per_net in zip(*image)]
        images = [image] if nets == 1 else list(image)
        if any(im is None for im in images):
            raise ValueError(f"{self._image_name}: give a conditioning image per {self._each}")
        first = prepare_control_image(images[0], height, width, self.vae_scale_factor, self._image_name)
        size = first.shape[2:]
        prepared = [first] + [prepare_control_image(im, size[0], size[1], self.vae_scale_factor, self._image_name)
                              for im in images[1:]]
        for i, (im, net) in enumerate(zip(prepared, self._image_nets)):  # (PIL images are RGB by now; tensors not)
            if im.shape[1] != net.config.conditioning_channels:
                raise ValueError(f"{self._image_name}{f' {i}' if nets > 1 else ''} has {im.shape[1]} channels; "
                                 f"{self._each} {i} takes {net.config.conditioning_channels} (an RGB image)")
        return prepared

    def _control_cond(self, images, shape, num_images_per_prompt, do_cfg, guess_mode):
        """diffusers' prepare_image after the preprocessing: each net's images repeated to the batch (one image, or
        one per prompt) and doubled for guidance (not in guess mode)."""
        batch = shape[0] // num_images_per_prompt  # prompts
        cond = []
        for i, im in enumerate(images):
            if im.shape[0] not in (1, batch):
                which = f"{self._image_name}{f' {i}' if len(images) > 1 else ''}"
                raise ValueError(f"{which} has {im.shape[0]} images for {batch} prompts: give one, or one per prompt")
            im = im.repeat_interleave(shape[0] if im.shape[0] == 1 else num_images_per_prompt, dim=0)
            im = im.to(device=self.device, dtype=self.controlnet.dtype)
            cond.append(torch.cat([im, im]) if do_cfg and not guess_mode else im)
        return tuple(cond)

    def _step_cond(self, i, steps, cond):
        """The conditioning images and this step's settings: each net's scale (0 outside its start and end, as
        diffusers' controlnet_keep has it: fractions of the steps the loop runs, or with SDXL's of the whole
        schedule, even where denoising_end cuts it), guess mode, and whether the nets see only the conditional
        half."""
        scales, starts, ends, guess_mode, split = self._control
        steps = len(self.scheduler.timesteps) if self._keep_over_schedule else steps
        kept = tuple(scale * (1.0 - float(i / steps < start or (i + 1) / steps > end))
                     for scale, start, end in zip(scales, starts, ends))
        return (*cond, (kept, guess_mode, split))

    def _unet_call(self, model_input, t, embeds, *cond, timestep_cond=None):
        """The ControlNets' residuals, summed, and the UNet's prediction with them (a net at scale 0 is skipped)."""
        nets = len(self._nets)
        added, images, (scales, guess_mode, split) = cond[:-nets - 1], cond[-nets - 1:-1], cond[-1]
        active = [(net, image, scale) for net, image, scale in zip(self._nets, images, scales) if scale != 0]
        down = mid = None
        # guess mode with guidance: the nets see the conditional half only; the unconditional half gets no residual
        half = (lambda x: x.chunk(2)[1]) if split else (lambda x: x)  # noqa: E731
        text = embeds[0] if isinstance(embeds, tuple) else embeds  # the nets see no IP-Adapter tokens (diffusers')
        for net, image, scale in active:
            d, m = net(half(model_input), t, half(text), image, scale, guess_mode, self._nets_added(added, half))
            down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
        if active and split:
            down, mid = [torch.cat([torch.zeros_like(d), d]) for d in down], torch.cat([torch.zeros_like(mid), mid])
        return self._unet_with(model_input, t, embeds, added, down, mid, timestep_cond)

    @staticmethod
    def _nets_added(added, half):
        """The nets' added conditioning from the UNet's: SDXL's pooled embeddings and time ids; None for SD."""
        return {k: half(v) for k, v in zip(("text_embeds", "time_ids"), added)} or None

    def _unet_with(self, model_input, t, embeds, added, down, mid, timestep_cond=None):
        """The UNet's prediction with the residuals (None: no net ran) and its added conditioning (SDXL's)."""
        return self.unet(model_input, t, embeds, dict(zip(("text_embeds", "time_ids"), added)) or None, down, mid,
                         timestep_cond=timestep_cond)


class SDControlNetComponents(ControlNetGuidance):
    """The SD 1.x/2.x ControlNet pipelines' components: the SD pipeline's and the nets."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, controlnet, *, cuda_graph="auto",
                 channels_last="auto"):
        self._set_controlnet(controlnet)
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, cuda_graph=cuda_graph,
                         channels_last=channels_last)



class StableDiffusionControlNetPipeline(SDControlNetComponents, StableDiffusionPipeline):
    _base_pipeline, _added_names = StableDiffusionPipeline, ()

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, image=None, height=None, width=None, num_inference_steps=50, timesteps=None,
                 sigmas=None, guidance_scale=7.5, negative_prompt=None, num_images_per_prompt=1, eta=0.0,
                 generator=None, latents=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
                 controlnet_conditioning_scale=1.0, guess_mode=False, control_guidance_start=0.0,
                 control_guidance_end=1.0, clip_skip=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        """As diffusers': ``image`` is the conditioning image (one per ControlNet, in a list, with several) and sets
        the output size unless ``height`` / ``width`` are given; ``controlnet_conditioning_scale``,
        ``control_guidance_start`` and ``control_guidance_end`` are a number or one per net."""
        shape, do_cfg, cond, callback = self._begin_call(
            image, height, width, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
            guess_mode, (prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt,
                         prompt_embeds, negative_prompt_embeds, latents, output_type),
            callback_on_step_end, callback_on_step_end_tensor_inputs)
        embeds = self._text_embeds(prompt, negative_prompt, num_images_per_prompt, do_cfg, prompt_embeds,
                                   negative_prompt_embeds, self._check_clip_skip(clip_skip), callback)
        return self._sample(shape, embeds, cond, num_inference_steps, guidance_scale, do_cfg, eta, generator, latents,
                            output_type, timesteps, sigmas, callback)


class SDXLControlNetComponents(ControlNetGuidance):
    """The SDXL ControlNet pipelines' components: the SDXL pipeline's and the nets; the nets take SDXL's added
    conditioning (pooled embeddings and size ids) too."""
    _base_pipeline, _added_names = StableDiffusionXLPipeline, StableDiffusionXLPipeline._cond_names

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, controlnet, *,
                 force_zeros_for_empty_prompt=True, requires_aesthetics_score=False, cuda_graph="auto",
                 channels_last="auto"):
        """``requires_aesthetics_score``: a refiner-style UNet and nets (image-to-image and inpainting only, as in
        diffusers)."""
        self._set_controlnet(controlnet)
        super().__init__(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                         requires_aesthetics_score=requires_aesthetics_score, cuda_graph=cuda_graph,
                         channels_last=channels_last)



class StableDiffusionXLControlNetPipeline(SDXLControlNetComponents, StableDiffusionXLPipeline):
    """diffusers' StableDiffusionXLControlNetPipeline: SDXL's text conditioning (two encoders, pooled embeddings and
    size ids, which the nets take too), the ControlNets' guidance, and ``denoising_end``."""
    _callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "image")
    _begins_at_zero = False  # (diffusers' SDXL ControlNet pipeline does not set a begin index, unlike its SDXL one)
    _keep_over_schedule = True

    @ip_adapter_call
    @lora_call_scale
    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, image=None, height=None, width=None, num_inference_steps=50,
                 timesteps=None, sigmas=None, denoising_end=None, guidance_scale=5.0, negative_prompt=None,
                 negative_prompt_2=None, num_images_per_prompt=1, eta=0.0, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", controlnet_conditioning_scale=1.0,
                 guess_mode=False, control_guidance_start=0.0, control_guidance_end=1.0, original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, clip_skip=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        """As diffusers': the SD ControlNet pipeline's conditioning image and settings, SDXL's prompts, sizes and
        ``denoising_end``."""
        check_denoising_bounds(denoising_end=denoising_end)
        shape, do_cfg, control, callback = self._begin_call(
            image, height, width, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
            guess_mode, (prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt,
                         prompt_embeds, negative_prompt_embeds, latents, output_type),
            callback_on_step_end, callback_on_step_end_tensor_inputs)
        size = tuple(x * self.vae_scale_factor for x in shape[2:])  # (the conditioning image's)
        embeds, cond = self._text_conditioning(
            shape, do_cfg, prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip,
            size, original_size, crops_coords_top_left, target_size, negative_original_size,
            negative_crops_coords_top_left, negative_target_size)
        return self._sample(shape, embeds, (*cond, *control), num_inference_steps, guidance_scale, do_cfg, eta,
                            generator, latents, output_type, timesteps, sigmas, callback, denoising_end)
