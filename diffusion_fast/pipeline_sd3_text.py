"""SD3's text encoding (mixed into StableDiffusion3Pipeline): the prompt through both CLIP encoders (their
penultimate hidden states side by side, ``clip_skip`` for the prompt alone, zero-padded to T5's width) and T5 (its
``max_sequence_length`` tokens after CLIP's; zeros where the folder has none), the pooled projections concatenated,
repeated per image, as diffusers' StableDiffusion3Pipeline.encode_prompt computes them; and a call's checks of its
prompts, embeddings, size and settings."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .pipeline_common import OUTPUT_TYPES, check_size


class SD3TextEncoding:
    def _clip_embeds(self, texts, index, device, clip_skip):
        """(hidden states ``clip_skip`` + 2 from the end, pooled projection) of CLIP encoder ``index`` (0 or 1)."""
        tokenizer, encoder = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))[index]
        ids = tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(device), output_hidden_states=True)
        hidden = out.hidden_states[-((clip_skip or 0) + 2)]
        return hidden.to(dtype=self.text_encoder.dtype, device=device), out[0]

    def _t5_embeds(self, texts, device, max_sequence_length):
        if self.text_encoder_3 is None:
            return torch.zeros((len(texts), max_sequence_length, self.transformer.config.joint_attention_dim),
                               device=device, dtype=self.text_encoder.dtype)
        ids = self.tokenizer_3(texts, padding="max_length", max_length=max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        return self.text_encoder_3(ids.to(device))[0].to(dtype=self.text_encoder_3.dtype, device=device)

    def _embed(self, texts, texts_2, texts_3, device, clip_skip, max_sequence_length):
        """(the joint text sequence, the pooled embedding) for lists of prompts, as diffusers builds them."""
        hidden, pooled = self._clip_embeds(texts, 0, device, clip_skip)
        hidden_2, pooled_2 = self._clip_embeds(texts_2, 1, device, clip_skip)
        t5 = self._t5_embeds(texts_3, device, max_sequence_length)
        clip = torch.cat([hidden, hidden_2], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([pooled, pooled_2], dim=-1)

    @torch.no_grad()
    def encode_prompt(self, prompt, prompt_2=None, prompt_3=None, device=None, num_images_per_prompt=1,
                      do_classifier_free_guidance=True, negative_prompt=None, negative_prompt_2=None,
                      negative_prompt_3=None, prompt_embeds=None, negative_prompt_embeds=None,
                      pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, clip_skip=None,
                      max_sequence_length=256):
        """(prompt_embeds, negative_prompt_embeds, pooled, negative pooled) as diffusers computes them, repeated per
        image; the negative ones None without guidance. ``prompt_2`` / ``prompt_3`` (the second CLIP's, T5's)
        default to ``prompt``; ``clip_skip`` applies to the prompt alone, as in diffusers."""
        device = device or self.device
        listed = lambda p, n: [p] * n if isinstance(p, str) else list(p)  # noqa: E731
        if prompt_embeds is None and not (isinstance(prompt, str) or (
                isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt))):
            raise TypeError(f"prompt must be a str or a non-empty list of str (or give prompt_embeds), got {prompt!r}")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too (the CLIP encoders' pooled projections)")
        if prompt_embeds is None:
            prompt = listed(prompt, 1)
            prompt_embeds, pooled_prompt_embeds = self._embed(
                prompt, listed(prompt_2 or prompt, len(prompt)), listed(prompt_3 or prompt, len(prompt)), device,
                clip_skip, max_sequence_length)
        batch = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative = negative_prompt or ""
            negative_2, negative_3 = negative_prompt_2 or negative, negative_prompt_3 or negative
            negative_prompt_embeds, negative_pooled_prompt_embeds = self._embed(
                listed(negative, batch), listed(negative_2, batch), listed(negative_3, batch), device, None,
                max_sequence_length)

        def per_image(t):
            return t.to(device=device).repeat_interleave(num_images_per_prompt, dim=0)

        if not do_classifier_free_guidance:
            return per_image(prompt_embeds), None, per_image(pooled_prompt_embeds), None
        return tuple(per_image(t) for t in (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                            negative_pooled_prompt_embeds))

    def _check_inputs(self, prompts, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                      negative_pooled_prompt_embeds, height, width, num_inference_steps, guidance_scale,
                      num_images_per_prompt, output_type, max_sequence_length, skip_guidance_layers, callback_inputs):
        prompt = prompts["prompt"]
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("prompt: give a prompt (str or list of str) or prompt_embeds, not both")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too (the CLIP encoders' pooled projections)")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds too")
        batch = (1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, (list, tuple)) else None) \
            if prompt is not None else prompt_embeds.shape[0]
        for name, value in prompts.items():
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{name} must be a str or a non-empty list of str, got {value!r}")
            if len(value) != batch:
                raise ValueError(f"{name} has {len(value)} entries but there are {batch} prompts")
        for name in ("prompt_2", "prompt_3"):
            if prompts[name] is not None and prompt_embeds is not None:
                raise ValueError(f"{name} and prompt_embeds: give one, not both")
        for name in ("negative_prompt", "negative_prompt_2", "negative_prompt_3"):
            if prompts[name] is not None and negative_prompt_embeds is not None:
                raise ValueError(f"{name} and negative_prompt_embeds: give one, not both")
        if prompt_embeds is not None and negative_prompt_embeds is not None and (
                prompt_embeds.shape != negative_prompt_embeds.shape):
            raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")
        check_size(self.vae_scale_factor * self.transformer.config.patch_size,
                   "the VAE scale factor times the patch size", height=height, width=width)
        for name, value in (("num_inference_steps", num_inference_steps),
                            ("num_images_per_prompt", num_images_per_prompt)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not np.isfinite(
                guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or not (
                0 < max_sequence_length <= 512):
            raise ValueError(f"max_sequence_length must be an int in [1, 512] (T5's tokens), got "
                             f"{max_sequence_length!r}")
        layers = len(self.transformer.transformer_blocks)
        if skip_guidance_layers is not None and (not isinstance(skip_guidance_layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in skip_guidance_layers)):
            raise ValueError(f"skip_guidance_layers must be a list of block indices in [0, {layers}), got "
                             f"{skip_guidance_layers!r}")
        unknown = [k for k in callback_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs has to be in {list(self._callback_tensor_inputs)}, "
                             f"but found {unknown}")
        return batch
