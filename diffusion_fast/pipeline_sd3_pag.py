"""Perturbed-attention guidance for SD3 and SD3.5: diffusers' StableDiffusion3PAGPipeline and
StableDiffusion3PAGImg2ImgPipeline, the same image for the same seed, scales, applied layers and weights.

The transformer runs one more copy of the batch, conditioned on the prompt, in which the applied layers' attentions
are perturbed as diffusers' PAG joint processors mask them: each image token attends to itself and to the text, to
no other image token; text tokens attend to everything (``JointAttention._perturbed``). The applied layers
(``pag_applied_layers``, "blocks.1" by default) are regexes searched in the transformer's module names as diffusers
searches them, so "blocks.1" also matches blocks 10 to 19 of a model that has them (diffusers#13594); r"blocks\\.1\\."
names block 1 alone. The combine is the SD one: ``uncond + guidance_scale * (text - uncond) + pag_scale * (text -
perturbed)``, without classifier-free guidance ``text + pag_scale * (text - perturbed)``; ``pag_adaptive_scale``
lowers the PAG scale by that much per timestep below 1000 (SD3's timesteps are 1000 sigma).

Where ours differs from diffusers, deliberately:
- SD3.5's q/k RMSNorms run in the applied layers. diffusers' PAG joint processors skip them, for the guidance
  copies as well as the perturbed one, so with SD3.5 its PAG pipeline's image at ``pag_scale`` near 0 is not its
  plain pipeline's (SD3, which has no such norms, is unaffected). The tests hold ours to diffusers' with the norms
  put back, and to diffusers' own on SD3.
- SD3.5 Medium's blocks with a second, image-only attention (``dual_attention_layers``): diffusers gives that
  attention the joint processor too, which fails on it (no text stream); ours perturbs it as the UNets' PAG does a
  self-attention, each token's output its own value.
- The loop is the SD3 pipeline's: skip-layer guidance, ``mu`` and ``SD3CFGCutoffCallback`` work with PAG (diffusers'
  PAG pipelines take neither argument and cannot hand that callback the pooled embeddings); after the cutoff the
  perturbed copy goes on beside the prompt's. On CUDA the transformer call replays from a graph, one per applied-layer
  set and batch.
"""
from __future__ import annotations

import torch

from .pipeline_pag import PAGSettings, pag_call
from .pipeline_sd3 import StableDiffusion3Pipeline
from .pipeline_sd3_img2img import StableDiffusion3Img2ImgPipeline


class SD3PAGGuidance(PAGSettings):
    """Mixed into our SD3 pipelines: the perturbed copy of the text (the prompt's rows once more) and the PAG
    combine."""
    _pag_default = "blocks.1"  # (diffusers' default: the second block, and with 11 or more blocks 10 to 19 too)
    pag_applied_layers = ("blocks.1",)
    _component_names = (*StableDiffusion3Pipeline._component_names, "pag_applied_layers")  # (from_pipe)
    _pag_rows = None  # the running call's batch: the perturbed rows, last in the transformer's
    _graphed_pag = None  # (module names, rows) the current graphs were captured with

    @property
    def _pag_denoiser(self):
        return self.transformer

    def _prepare_text(self, *args):
        """With PAG, the prompt's embeddings and pooled ones once more after the loop's (diffusers'
        _prepare_perturbed_attention_guidance): [negative, prompt, prompt] under guidance, else [prompt, prompt]."""
        batch, text, cond, callback_inputs = super()._prepare_text(*args)
        if self._pag_run is not None:
            text = tuple(torch.cat([t, c]) for t, c in zip(text, cond))
        return batch, text, cond, callback_inputs

    def _with_ip_adapter(self, text, cond, ip_adapter_image, ip_adapter_image_embeds, rows):
        if self._pag_run is not None and (ip_adapter_image is not None or ip_adapter_image_embeds is not None):
            raise ValueError("ip_adapter_image: not with perturbed-attention guidance here (diffusers' SD3 PAG "
                             "pipelines take no IP-Adapter); pass pag_scale=0, or use the plain SD3 pipeline")
        return super()._with_ip_adapter(text, cond, ip_adapter_image, ip_adapter_image_embeds, rows)

    def _denoise(self, latents, *args):
        self._pag_rows = latents.shape[0]
        return super()._denoise(latents, *args)

    def _model(self, device):
        """A graph replays the perturbed layers it captured: another layer set or batch gets fresh graphs."""
        key = None if self._pag_run is None else (tuple(self._pag_run[0]), self._pag_rows)
        if key != self._graphed_pag:
            self._graph = None
        self._graphed_pag = key
        return super()._model(device)

    def _predict(self, model, latents, t, i, steps, text, cond, slg):
        """The transformer on the latents two or three times over (the perturbed copy last, its applied layers'
        attentions perturbed), and the PAG combine; skip-layer guidance as the SD3 pipeline's."""
        if self._pag_run is None:
            return super()._predict(model, latents, t, i, steps, text, cond, slg)
        b, do_cfg = latents.shape[0], self.do_classifier_free_guidance
        copies = 3 if do_cfg else 2
        if text[0].shape[0] == b * (copies - 1):  # (a callback cut the text to the guidance's rows: SD3's cutoff)
            text = tuple(torch.cat([x, x[-b:]]) for x in text)
        model_input = torch.cat([latents] * copies)
        modules = self._pag_run[0].values()
        for m in modules:
            m.perturbed_rows = b
        try:
            pred = model(self._model_input(model_input), t, *text, *self._step_inputs(i, steps, b * copies))
        finally:
            for m in modules:
                m.perturbed_rows = 0
        scale = self._pag_scale_at(t)
        if not do_cfg:
            text_pred, perturbed = pred.chunk(2)
            return text_pred + scale * (text_pred - perturbed)
        uncond, text_pred, perturbed = pred.chunk(3)
        pred = uncond + self._guidance_scale * (text_pred - uncond) + scale * (text_pred - perturbed)
        return self._skip_layer_guidance(pred, text_pred, model, latents, t, i, steps, cond, slg)


class StableDiffusion3PAGPipeline(SD3PAGGuidance, StableDiffusion3Pipeline):
    """diffusers' StableDiffusion3PAGPipeline: SD3 / SD3.5 text-to-image with perturbed-attention guidance."""
    __call__ = pag_call(StableDiffusion3Pipeline.__call__)


class StableDiffusion3PAGImg2ImgPipeline(SD3PAGGuidance, StableDiffusion3Img2ImgPipeline):
    """diffusers' StableDiffusion3PAGImg2ImgPipeline."""
    __call__ = pag_call(StableDiffusion3Img2ImgPipeline.__call__)


PAG_FOR_SD3 = {StableDiffusion3Pipeline: StableDiffusion3PAGPipeline,
               StableDiffusion3Img2ImgPipeline: StableDiffusion3PAGImg2ImgPipeline}
