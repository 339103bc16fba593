"""SD3 / SD3.5 text-to-image guided by SD3 ControlNets, with diffusers' StableDiffusion3ControlNetPipeline semantics:
the same image for the same seed, control image and weights.

The control image is resized to the output size (the transformer's default unless ``height``/``width`` say
otherwise; a tensor is taken as it is, and one net's image sets the size), mapped to [-1, 1], repeated to the batch
and doubled under guidance, then encoded by the VAE and sampled from its posterior with the global generator, as
diffusers does (no ``generator``), scaled (and shifted, for nets that take the pooled text); each step the nets give
their residuals (scale times 0 or 1 by ``control_guidance_start``/``_end``, fractions of the steps) and the
transformer adds them after its blocks. InstantX's SD3 nets see the prompt embeddings and zeros for the pooled ones
(``force_zeros_for_pooled_projection``); SD3.5 Large's see no text and the transformer's patch embedding.

What differs is how it runs: the control image is encoded once and its posterior sampled for both guidance halves
(diffusers encodes the doubled batch: the same draws, half the encode), a net at scale 0 is not run, and on CUDA the
nets and the transformer are captured together as one CUDA graph per input shape and scales.
"""
from __future__ import annotations

import os

import torch

from .lora import lora_call_scale
from .models.controlnet_sd3 import SD3ControlNetModel, SD3MultiControlNetModel
from .models.vae import DiagonalGaussianDistribution
from .pipeline_controlnet import _net_settings
from .pipeline_img2img import preprocess_image
from .pipeline_sd3 import StableDiffusion3Pipeline, text_arguments
from .schedulers.common import randn_tensor


def load_sd3_controlnet(folder, index, dtype=None, device=None, variant=None):
    """The SD3 ControlNet a diffusers SD3 ControlNet pipeline folder holds (controlnet/)."""
    entry = index.get("controlnet")
    if not isinstance(entry, list) or not os.path.isdir(os.path.join(folder, "controlnet")):
        raise ValueError(f"{folder!r} holds no ControlNet: pass controlnet=diffusion_fast.models.SD3ControlNetModel"
                         ".from_pretrained(path) (or a list of them)")
    if entry[1] != "SD3ControlNetModel":
        raise ValueError(f"{folder!r} holds a {entry[1]} (diffusers cannot load a saved SD3MultiControlNetModel "
                         "either): pass controlnet=[SD3ControlNetModel.from_pretrained(path), ...]")
    return SD3ControlNetModel.from_pretrained(folder, dtype, device, subfolder="controlnet", variant=variant)


class StableDiffusion3ControlNetPipeline(StableDiffusion3Pipeline):
    # diffusers' names, and the pooled embeddings its SD3CFGCutoffCallback replaces
    _callback_tensor_inputs = ("latents", "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                               "negative_pooled_prompt_embeds")
    _component_names = StableDiffusion3Pipeline._component_names + ("controlnet",)
    _inpainting = False  # (the inpainting ControlNet pipeline's: a control_mask, nets with its extra channel)

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3=None, tokenizer_3=None, controlnet=None, *, image_encoder=None, feature_extractor=None,
                 cuda_graph="auto", channels_last="auto"):
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                         text_encoder_3, tokenizer_3, image_encoder=image_encoder, feature_extractor=feature_extractor,
                         cuda_graph=cuda_graph, channels_last=channels_last)
        if isinstance(controlnet, (list, tuple)):
            controlnet = SD3MultiControlNetModel(controlnet)
        if not isinstance(controlnet, (SD3ControlNetModel, SD3MultiControlNetModel)):
            raise TypeError("controlnet must be a diffusion_fast SD3ControlNetModel (diffusion_fast.models."
                            "SD3ControlNetModel.from_pretrained(folder)), a list of them or an SD3MultiControlNetModel, "
                            f"got {type(controlnet).__name__}")
        self.controlnet = controlnet
        t = transformer.config
        width = t.num_attention_heads * t.attention_head_dim
        for i, net in enumerate(self._nets):
            n = net.config
            if (n.num_attention_heads * n.attention_head_dim != width or n.patch_size != t.patch_size
                    or n.pooled_projection_dim != t.pooled_projection_dim or n.in_channels != t.in_channels
                    or n.joint_attention_dim not in (None, t.joint_attention_dim)):
                raise ValueError(f"controlnet {i} (width {n.num_attention_heads * n.attention_head_dim}, patch "
                                 f"{n.patch_size}, pooled {n.pooled_projection_dim}, in_channels {n.in_channels}, "
                                 f"joint_attention_dim {n.joint_attention_dim}) does not fit this transformer (width "
                                 f"{width}, patch {t.patch_size}, pooled {t.pooled_projection_dim}, in_channels "
                                 f"{t.in_channels}, joint_attention_dim {t.joint_attention_dim}): a ControlNet "
                                 "trained for another model")
            if n.extra_conditioning_channels != (1 if self._inpainting else 0):
                raise ValueError(
                    f"controlnet {i} takes {n.extra_conditioning_channels} extra conditioning channels: " + (
                        "an inpainting ControlNet takes 1 (the mask)" if self._inpainting else
                        "an inpainting ControlNet (its mask): StableDiffusion3ControlNetInpaintingPipeline runs it"))
            if not n.use_pos_embed:  # (SD3.5 Large's nets patch with the transformer's embedding, as diffusers')
                net.pos_embed = transformer.pos_embed
        kinds = {(bool(net.config.force_zeros_for_pooled_projection), net.config.joint_attention_dim is None)
                 for net in self._nets}
        if len(kinds) > 1:
            raise ValueError("controlnet: the nets differ in force_zeros_for_pooled_projection or in whether they see "
                             "the text (joint_attention_dim), which diffusers reads from the first for all: give nets "
                             "of one kind")

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None, *, variant=None, cuda_graph="auto", channels_last="auto",
                        controlnet=None, **components):
        """A diffusers SD3 ControlNet pipeline folder (its controlnet/ too), or an SD3 folder with ``controlnet``
        given."""
        from .pipeline_folder import read_model_index, resolve_dtype

        if controlnet is None:
            controlnet = load_sd3_controlnet(*read_model_index(folder), resolve_dtype(dtype), device, variant)
        base = StableDiffusion3Pipeline.from_pretrained(folder, dtype, device, variant=variant, **components)
        return cls.from_pipe(base, controlnet=controlnet, cuda_graph=cuda_graph, channels_last=channels_last)

    def load_ip_adapter(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} takes no IP-Adapter (neither does diffusers'); load it on the SD3 "
                        "text-to-image, image-to-image or inpainting pipeline")

    @property
    def _nets(self):
        return list(self.controlnet.nets) if isinstance(self.controlnet, SD3MultiControlNetModel) else [self.controlnet]

    def _graph_modules(self):
        return (self.transformer, *self._nets)

    @lora_call_scale(name="joint_attention_kwargs")
    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, prompt_3=None, height=None, width=None, num_inference_steps=28,
                 sigmas=None, guidance_scale=7.0, control_guidance_start=0.0, control_guidance_end=1.0,
                 control_image=None, control_mask=None, controlnet_conditioning_scale=1.0,
                 controlnet_pooled_projections=None,
                 negative_prompt=None, negative_prompt_2=None, negative_prompt_3=None, num_images_per_prompt=1,
                 generator=None, latents=None, prompt_embeds=None, negative_prompt_embeds=None,
                 pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True,
                 clip_skip=None, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 max_sequence_length=256, mu=None):
        """diffusers' call, with its defaults (28 steps, guidance 7.0, each net at scale 1 over the whole schedule);
        ``control_mask`` is the inpainting pipeline's (white: repainted)."""
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        nets = len(self._nets)
        scales = _net_settings("controlnet_conditioning_scale", controlnet_conditioning_scale, nets)
        starts = _net_settings("control_guidance_start", control_guidance_start, nets)
        ends = _net_settings("control_guidance_end", control_guidance_end, nets)
        for start, end in zip(starts, ends):
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(f"control_guidance_start {start} and control_guidance_end {end}: fractions of the "
                                 "schedule with 0 <= start < end <= 1")
        if (control_mask is None) == self._inpainting:
            raise ValueError("control_mask: " + ("give the mask (white: repainted) beside control_image" if
                                                 self._inpainting else "for an inpainting ControlNet "
                                                 "(StableDiffusion3ControlNetInpaintingPipeline)"))
        images = [control_image] if nets == 1 else control_image
        if not isinstance(images, (list, tuple)) or len(images) != nets or any(im is None for im in images):
            raise ValueError(f"control_image: give a conditioning image per ControlNet ({nets}: a list for several)")
        text_args = text_arguments(locals())
        batch, text, cond, callback_inputs = self._prepare_text(
            *text_args, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type,
            clip_skip, max_sequence_length, None, callback_on_step_end, callback_on_step_end_tensor_inputs)
        do_cfg = self.do_classifier_free_guidance
        control = [self._control_latents(im, control_mask, height, width, batch, num_images_per_prompt, do_cfg, i)
                   for i, im in enumerate(images)]
        if nets == 1:  # (one net's image sets the size, as diffusers)
            height, width = (x * self.vae_scale_factor for x in control[0].shape[2:])
        shape = (batch * num_images_per_prompt, self.transformer.config.in_channels,
                 height // self.vae_scale_factor, width // self.vae_scale_factor)
        if any(c.shape[2:] != shape[2:] for c in control):
            raise ValueError(f"control_image: the images' sizes {[tuple(c.shape[2:]) for c in control]} (latents) "
                             f"differ from the output's {shape[2:]}")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=text[0].dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}")
        latents = latents.to(device=self.device, dtype=text[0].dtype)
        self._set_timesteps(num_inference_steps, self.device, sigmas, mu, shape)
        given = controlnet_pooled_projections
        if given is not None and not torch.is_tensor(given):
            raise TypeError(f"controlnet_pooled_projections must be a tensor, got {type(given).__name__}")
        if given is not None and tuple(given.shape) != tuple(text[1].shape):
            raise ValueError(f"controlnet_pooled_projections must have the loop's pooled shape {tuple(text[1].shape)} "
                             f"(doubled under guidance), got {tuple(given.shape)}")
        net_pooled = self._net_pooled(text[1], None if given is None else given.to(self.device, text[1].dtype))
        # (as bound before the loop: a callback's new prompt embeddings do not reach the nets, as in diffusers)
        net_text = text[0] if self._nets[0].config.joint_attention_dim is not None else None
        self._control = (net_text, net_pooled, control, scales, starts, ends)
        self._call_tensors = {"negative_prompt_embeds": text[0].chunk(2)[0] if do_cfg else None,
                              "negative_pooled_prompt_embeds": text[1].chunk(2)[0] if do_cfg else None}
        try:
            return self._denoise(latents, self.scheduler.timesteps, text, cond, ((), 0.0, 0.0, 0.0),
                                 callback_on_step_end, callback_inputs, output_type, return_dict)
        finally:
            self._control, self._call_tensors = None, {}

    def _net_pooled(self, pooled, given):
        """The pooled text the nets see: zeros for nets that take none (force_zeros_for_pooled_projection), else the
        given projections or the prompt's."""
        if self._nets[0].config.force_zeros_for_pooled_projection:
            return torch.zeros_like(pooled)
        return given if given is not None else pooled

    def _control_latents(self, image, mask, height, width, batch, num_images_per_prompt, do_cfg, i):
        """diffusers' prepare_image and encode for net ``i``'s image: a tensor as it is, else resized to (height,
        width) and mapped to [-1, 1]; repeated to the batch (one image, or one per prompt), doubled under guidance,
        encoded and sampled with the global generator, shifted (nets that see the pooled text) and scaled."""
        name = "control_image" if len(self._nets) == 1 else f"control_image {i}"
        pixels = image if torch.is_tensor(image) else preprocess_image(image, self.vae_scale_factor, None,
                                                                        (height, width))
        if pixels.dim() != 4 or pixels.shape[1] != self.vae.config.in_channels:
            raise ValueError(f"{name} must be images with {self.vae.config.in_channels} channels (B, C, H, W), got "
                             f"shape {tuple(pixels.shape)}")
        if pixels.shape[0] not in (1, batch):
            raise ValueError(f"{name} has {pixels.shape[0]} images for {batch} prompts: give one, or one per prompt")
        pixels = pixels.repeat_interleave(batch * num_images_per_prompt if pixels.shape[0] == 1 else
                                          num_images_per_prompt, dim=0)
        pixels = pixels.to(device=self.device, dtype=self.transformer.dtype)
        posterior = self._vae(pixels.device).encode(pixels).latent_dist.parameters
        posterior = DiagonalGaussianDistribution(torch.cat([posterior] * 2) if do_cfg else posterior)
        c = self.vae.config
        shift = 0.0 if self._nets[0].config.force_zeros_for_pooled_projection else (c.shift_factor or 0.0)
        return (posterior.sample() - shift) * c.scaling_factor

    def _step_inputs(self, i, steps, batch):
        """The nets' text, pooled text and control latents (the last ``batch`` rows: all of them under guidance,
        the prompt's half once a callback turns guidance off), and this step's scale per net (0 outside its start
        and end, as diffusers' controlnet_keep)."""
        net_text, net_pooled, control, scales, starts, ends = self._control
        kept = tuple(scale * (1.0 - float(i / steps < start or (i + 1) / steps > end))
                     for scale, start, end in zip(scales, starts, ends))
        return (None if net_text is None else net_text[-batch:], net_pooled[-batch:],
                *(c[-batch:] for c in control), kept)

    def _transformer_call(self, latents, t, embeds, pooled, *inputs):
        """The nets' residuals, summed (a net at scale 0 is not run), and the transformer's prediction with them."""
        if not inputs:  # (a call of the plain pipeline's, skip-layer guidance's: none here)
            return super()._transformer_call(latents, t, embeds, pooled)
        net_text, net_pooled, *control, scales = inputs
        timestep = t.expand(latents.shape[0])
        residuals = None
        for net, cond, scale in zip(self._nets, control, scales):
            if scale != 0:
                more = net(latents, cond, scale, net_text, net_pooled, timestep)
                residuals = more if residuals is None else [a + b for a, b in zip(residuals, more)]
        return self.transformer(latents, embeds, pooled, timestep, block_controlnet_hidden_states=residuals)
