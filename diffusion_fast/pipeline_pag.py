"""Perturbed-attention guidance (PAG, "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance"):
diffusers' StableDiffusion(XL)PAGPipeline, its image-to-image and inpainting ones (...PAGImg2ImgPipeline,
...PAGInpaintPipeline) and its ControlNet ones (StableDiffusionControlNetPAG(Inpaint)Pipeline,
StableDiffusionXLControlNetPAG(Img2Img)Pipeline), the same image for the same seed, scales, applied layers and
weights.

The UNet runs one more copy of the batch, conditioned on the prompt, in which the self-attentions of the applied
layers (``pag_applied_layers``: regexes searched in the UNet's module names, "mid" by default) have an identity
attention map: each token's output is its own value (``Attention.perturbed_rows``). The prediction is guided away
from that perturbed one: with classifier-free guidance ``uncond + guidance_scale * (text - uncond) + pag_scale *
(text - perturbed)``, without it ``text + pag_scale * (text - perturbed)``; ``pag_adaptive_scale`` lowers the PAG
scale by that much per timestep below 1000 (to no less than 0). The loop is the SD pipeline's: on CUDA the UNet call
replays from a graph (one per applied-layer set), the three-way combine and the scheduler's step eager.

With ControlNets the perturbed copy takes the prompt's rows of every UNet input, the conditioning images included, so
the nets run on all three copies as diffusers runs them; only the UNet's applied self-attentions are perturbed, never
a net's. Guess mode is refused with PAG: diffusers' PAG ControlNet pipelines fail on it (SD's) or ignore it (SDXL's).
"""
from __future__ import annotations

import functools
import inspect
import re

import numpy as np
import torch

from .models.attention import Attention
from .models.sd3_transformer import JointAttention
from .pipeline import StableDiffusionPipeline
from .pipeline_common import rescale_noise_cfg
from .pipeline_controlnet import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
from .pipeline_controlnet_image import (StableDiffusionControlNetInpaintPipeline,
                                        StableDiffusionXLControlNetImg2ImgPipeline)
from .pipeline_img2img import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from .pipeline_inpaint import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline
from .pipeline_xl import StableDiffusionXLPipeline


def pag_layers(model, layers) -> dict:
    """{name: module} of the self-attentions PAG perturbs in ``model`` (a UNet, or an SD3 transformer: its joint
    attentions and SD3.5 Medium's image-only ones) for ``layers``, matched as diffusers matches them: ``re.search`` in
    the module's name. (diffusers also skips a name whose last part is the same number as the layer id's; the
    self-attentions' names end in "attn1", "attn" or "attn2", so that never applies. Its search does let "blocks.1"
    match "transformer_blocks.10.attn" too.) A layer id that matches none is refused by name."""
    self_attentions = {name: m for name, m in model.named_modules()
                       if isinstance(m, (Attention, JointAttention)) and not m.is_cross}
    what = "transformer" if hasattr(model, "transformer_blocks") else "UNet"
    examples = ("'blocks.1', 'transformer_blocks.13', r'blocks\\.1\\.'" if what == "transformer" else
                "'mid', 'down_blocks.2', 'up_blocks.0.attentions.1'")
    found = {}
    for layer in layers:
        try:
            matched = {name: m for name, m in self_attentions.items() if re.search(layer, name) is not None}
        except re.error as exc:
            raise ValueError(f"pag_applied_layers: {layer!r} is not a regular expression ({exc})") from None
        if not matched:
            example = next(iter(self_attentions), "none")
            raise ValueError(f"pag_applied_layers: {layer!r} matches no self-attention of the {what} (names such as "
                             f"{example!r}; e.g. {examples})")
        found.update(matched)
    return found


def _check_scale(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def pag_call(call):
    """A pipeline ``__call__`` that takes diffusers' ``pag_scale`` (3.0) and ``pag_adaptive_scale`` (0.0): PAG runs
    for the call when the scale is above 0 and layers are set, as diffusers decides."""
    @functools.wraps(call)
    def with_pag(self, *args, pag_scale=3.0, pag_adaptive_scale=0.0, **kwargs):
        scale = _check_scale("pag_scale", pag_scale)
        adaptive = _check_scale("pag_adaptive_scale", pag_adaptive_scale)
        on = scale > 0 and len(self.pag_applied_layers) > 0
        self._pag_run = (pag_layers(self._pag_denoiser, self.pag_applied_layers), scale, adaptive) if on else None
        try:
            return call(self, *args, **kwargs)
        finally:
            self._pag_run = self._pag_rows = None

    signature = inspect.signature(call)
    extra = [inspect.Parameter("pag_scale", inspect.Parameter.KEYWORD_ONLY, default=3.0),
             inspect.Parameter("pag_adaptive_scale", inspect.Parameter.KEYWORD_ONLY, default=0.0)]
    with_pag.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    return with_pag


class PAGSettings:
    """Mixed into every PAG pipeline: the applied layers (set at construction, ``from_pretrained`` or
    ``set_pag_applied_layers``; ``_pag_default`` unless given), whether the running call guides with PAG, and its
    scale at a timestep. ``_pag_denoiser``: the model whose self-attentions are perturbed."""
    _pag_default = "mid"
    pag_applied_layers = ("mid",)
    _pag_run = None  # the running call's ({name: module} perturbed, pag_scale, pag_adaptive_scale), while PAG is on

    def __init__(self, *args, pag_applied_layers=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_pag_applied_layers(self._pag_default if pag_applied_layers is None else pag_applied_layers)

    @classmethod
    def from_pretrained(cls, folder, *args, pag_applied_layers=None, **kwargs):
        pipe = super().from_pretrained(folder, *args, **kwargs)
        pipe.set_pag_applied_layers(cls._pag_default if pag_applied_layers is None else pag_applied_layers)
        return pipe

    @property
    def _pag_denoiser(self):
        return self.unet

    def set_pag_applied_layers(self, pag_applied_layers):
        """The self-attention layers PAG perturbs: a regex or a list of them, searched in the denoiser's module names
        (a UNet's "mid", "down_blocks.2", "up_blocks.0.attentions.1"; an SD3 transformer's "blocks.1"); each must
        match one at least."""
        layers = [pag_applied_layers] if isinstance(pag_applied_layers, str) else pag_applied_layers
        if not isinstance(layers, (list, tuple)) or not all(isinstance(layer, str) for layer in layers):
            raise TypeError(f"pag_applied_layers must be a str or a list of str, got {pag_applied_layers!r}")
        pag_layers(self._pag_denoiser, layers)
        self.pag_applied_layers = list(layers)

    @property
    def do_perturbed_attention_guidance(self) -> bool:
        return self._pag_run is not None

    def _pag_scale_at(self, t):
        """diffusers' _get_pag_scale: with an adaptive scale, pag_scale - adaptive * (1000 - t), at least 0 (a
        tensor like ``t``: no host sync)."""
        _, scale, adaptive = self._pag_run
        if adaptive > 0 and scale > 0:
            return torch.clamp(scale - adaptive * (1000 - t), min=0)
        return scale


class PAGGuidance(PAGSettings):
    """Mixed into our SD and SDXL pipelines: the perturbed copy of the batch (text embeddings, SDXL's added
    conditioning, IP-Adapter tokens: the prompt's rows once more) and the PAG combine."""
    _pag_rows = None  # the running call's batch: the UNet batch's last rows, which are perturbed
    _graphed_pag = None  # (module names, rows) the current graphs were captured with

    def _check_components(self):
        super()._check_components()
        if self.unet.config.time_cond_proj_dim is not None:
            raise ValueError("unet has a time_cond_proj_dim (an LCM-distilled UNet): PAG's perturbed copy of the batch "
                             "does not take its guidance embedding (diffusers' PAG pipelines fail on it)")

    def _denoise(self, latents, timesteps, embeds, cond, *args, **kwargs):
        """With PAG, the prompt's rows of the text embeddings and of the UNet's added inputs (SDXL's pooled
        embeddings and time ids, an inpainting UNet's mask and masked image) once more, for the perturbed copy
        (diffusers' _prepare_perturbed_attention_guidance)."""
        if self._pag_run is not None:
            rows = self._pag_rows = latents.shape[0]
            embeds = torch.cat([embeds, embeds[-rows:]])
            cond = tuple(torch.cat([c, c[-rows:]]) for c in cond)
        return super()._denoise(latents, timesteps, embeds, cond, *args, **kwargs)

    def _ip_adapter_tokens(self, batch, do_cfg):
        tokens = super()._ip_adapter_tokens(batch, do_cfg)
        if self._pag_run is None or not tokens:
            return tokens
        n = len(tokens) // 2  # (each adapter's image tokens, then each one's mask)
        return (*(torch.cat([t, t[-batch:]]) for t in tokens[:n]), *tokens[n:])

    def _graph_mode(self, device, eta):
        """The UNet call at most with PAG: the three-way combine is not the whole-step graph's fused CFG step."""
        mode = super()._graph_mode(device, eta)
        return "unet" if mode == "step" and self._pag_run is not None else mode

    def _graphs_for_components(self):
        """A graph replays the perturbed layers it captured: another layer set or batch gets fresh graphs."""
        key = None if self._pag_run is None else (tuple(self._pag_run[0]), self._pag_rows)
        if key != self._graphed_pag:
            self._graphs = None
        graphs = super()._graphs_for_components()
        self._graphed_pag = key
        return graphs

    def _unet_call(self, model_input, t, embeds, *cond, timestep_cond=None):
        """The UNet call, the applied self-attentions perturbed for the batch's last rows."""
        if self._pag_run is None:
            return super()._unet_call(model_input, t, embeds, *cond, timestep_cond=timestep_cond)
        modules = self._pag_run[0].values()
        for m in modules:
            m.perturbed_rows = self._pag_rows
        try:
            return super()._unet_call(model_input, t, embeds, *cond, timestep_cond=timestep_cond)
        finally:
            for m in modules:
                m.perturbed_rows = 0

    def _denoise_step(self, latents, t, embeds, cond, guidance_scale, do_cfg, eta, generator, unet=None):
        if self._pag_run is None:
            return super()._denoise_step(latents, t, embeds, cond, guidance_scale, do_cfg, eta, generator, unet)
        model_input = self.scheduler.scale_model_input(torch.cat([latents] * (3 if do_cfg else 2)), t)
        noise_pred = (self._model_call if unet is None else unet)(model_input, t, embeds, *cond)
        scale = self._pag_scale_at(t)
        if do_cfg:
            uncond, text, perturbed = noise_pred.chunk(3)
            noise_pred = uncond + guidance_scale * (text - uncond) + scale * (text - perturbed)
            if self._guidance_rescale > 0:
                noise_pred = rescale_noise_cfg(noise_pred, text, self._guidance_rescale)
        else:
            text, perturbed = noise_pred.chunk(2)
            noise_pred = text + scale * (text - perturbed)
        return self._scheduler_step(noise_pred, t, latents, eta, generator)


class StableDiffusionPAGPipeline(PAGGuidance, StableDiffusionPipeline):
    """diffusers' StableDiffusionPAGPipeline: SD text-to-image with perturbed-attention guidance."""
    __call__ = pag_call(StableDiffusionPipeline.__call__)


class StableDiffusionXLPAGPipeline(PAGGuidance, StableDiffusionXLPipeline):
    """diffusers' StableDiffusionXLPAGPipeline: SDXL text-to-image with perturbed-attention guidance."""
    __call__ = pag_call(StableDiffusionXLPipeline.__call__)


class StableDiffusionPAGImg2ImgPipeline(PAGGuidance, StableDiffusionImg2ImgPipeline):
    """diffusers' StableDiffusionPAGImg2ImgPipeline."""
    __call__ = pag_call(StableDiffusionImg2ImgPipeline.__call__)


class StableDiffusionXLPAGImg2ImgPipeline(PAGGuidance, StableDiffusionXLImg2ImgPipeline):
    """diffusers' StableDiffusionXLPAGImg2ImgPipeline."""
    __call__ = pag_call(StableDiffusionXLImg2ImgPipeline.__call__)


class StableDiffusionPAGInpaintPipeline(PAGGuidance, StableDiffusionInpaintPipeline):
    """diffusers' StableDiffusionPAGInpaintPipeline (an inpainting UNet, or a plain one blended)."""
    __call__ = pag_call(StableDiffusionInpaintPipeline.__call__)


class StableDiffusionXLPAGInpaintPipeline(PAGGuidance, StableDiffusionXLInpaintPipeline):
    """diffusers' StableDiffusionXLPAGInpaintPipeline (an inpainting UNet, or a plain one blended)."""
    __call__ = pag_call(StableDiffusionXLInpaintPipeline.__call__)


class ControlNetPAGGuidance(PAGGuidance):
    """PAG on a ControlNet pipeline: guess mode (given, or a net's global_pool_conditions) refused while PAG runs."""

    def _control_cond(self, images, shape, num_images_per_prompt, do_cfg, guess_mode):
        if guess_mode and self._pag_run is not None:
            raise ValueError("guess_mode: not with perturbed-attention guidance (diffusers' PAG ControlNet pipelines "
                             "fail on it or ignore it); pass guess_mode=False, or pag_scale=0 for guess mode without "
                             "PAG")
        return super()._control_cond(images, shape, num_images_per_prompt, do_cfg, guess_mode)


class StableDiffusionControlNetPAGPipeline(ControlNetPAGGuidance, StableDiffusionControlNetPipeline):
    """diffusers' StableDiffusionControlNetPAGPipeline: SD text-to-image guided by ControlNets and PAG."""
    __call__ = pag_call(StableDiffusionControlNetPipeline.__call__)


class StableDiffusionControlNetPAGInpaintPipeline(ControlNetPAGGuidance, StableDiffusionControlNetInpaintPipeline):
    """diffusers' StableDiffusionControlNetPAGInpaintPipeline (an inpainting UNet, or a plain one blended)."""
    __call__ = pag_call(StableDiffusionControlNetInpaintPipeline.__call__)


class StableDiffusionXLControlNetPAGPipeline(ControlNetPAGGuidance, StableDiffusionXLControlNetPipeline):
    """diffusers' StableDiffusionXLControlNetPAGPipeline: SDXL text-to-image guided by ControlNets and PAG."""
    __call__ = pag_call(StableDiffusionXLControlNetPipeline.__call__)


class StableDiffusionXLControlNetPAGImg2ImgPipeline(ControlNetPAGGuidance, StableDiffusionXLControlNetImg2ImgPipeline):
    """diffusers' StableDiffusionXLControlNetPAGImg2ImgPipeline."""
    __call__ = pag_call(StableDiffusionXLControlNetImg2ImgPipeline.__call__)


# each PAG pipeline for the plain one it adds PAG to (exact classes: an LCM, T2I-Adapter, InstructPix2Pix or upscaler
# pipeline has none, nor a ControlNet one of a kind diffusers has no PAG class for), and by diffusers' class name
# (load_pipeline)
PAG_FOR = {cls.__bases__[-1]: cls for cls in (
    StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline, StableDiffusionPAGImg2ImgPipeline,
    StableDiffusionXLPAGImg2ImgPipeline, StableDiffusionPAGInpaintPipeline, StableDiffusionXLPAGInpaintPipeline,
    StableDiffusionControlNetPAGPipeline, StableDiffusionControlNetPAGInpaintPipeline,
    StableDiffusionXLControlNetPAGPipeline, StableDiffusionXLControlNetPAGImg2ImgPipeline)}
PAG_PIPELINES = {cls.__name__: cls for cls in PAG_FOR.values()}
