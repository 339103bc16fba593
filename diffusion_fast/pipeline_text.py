"""The SD pipelines' text encoding (mixed into StableDiffusionPipeline; SDXL's pipeline overrides ``encode_prompt``
for its two encoders): the prompt's CLIP hidden states as diffusers computes them (max-length padding, ``clip_skip``,
textual-inversion tokens through ``maybe_convert_prompt``), repeated per image, and the loop's embeddings, negative
first with guidance."""
from __future__ import annotations

import torch


class TextEncoding:
    def encode_prompt(self, prompt, device, num_images_per_prompt, do_cfg, negative_prompt=None,
                      prompt_embeds=None, negative_prompt_embeds=None, clip_skip=None):
        """Text embeddings as diffusers computes them: max-length padding, last hidden state (``clip_skip`` layers
        before it, then the final layer norm, for the prompt alone, as diffusers skips), repeated per image."""
        if prompt_embeds is None:
            prompt_embeds = self._encode_text(prompt, device, clip_skip=clip_skip)
        batch = prompt_embeds.shape[0]
        prompt_embeds = prompt_embeds.to(dtype=self.text_encoder.dtype, device=device)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if not do_cfg:
            return prompt_embeds, None
        if negative_prompt_embeds is None:
            if negative_prompt is None:
                negative = [""] * batch
            elif isinstance(negative_prompt, str):
                negative = [negative_prompt] * batch
            else:
                negative = list(negative_prompt)
            negative_prompt_embeds = self._encode_text(negative, device, max_length=prompt_embeds.shape[1])
        negative_prompt_embeds = negative_prompt_embeds.to(dtype=self.text_encoder.dtype, device=device)
        negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    @torch.no_grad()
    def _encode_text(self, texts, device, max_length=None, clip_skip=None):
        tokens = self.tokenizer(
            self.maybe_convert_prompt(texts, self.tokenizer), padding="max_length",
            max_length=max_length or self.tokenizer.model_max_length, truncation=True, return_tensors="pt",
        )
        mask = tokens.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        if clip_skip is None:
            return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        out = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        text_model = getattr(self.text_encoder, "text_model", self.text_encoder)  # (transformers 5 flattened it)
        return text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])

    def _check_clip_skip(self, clip_skip):
        """clip_skip: None, or how many of the text encoder's last layers to skip (fewer than it has)."""
        if clip_skip is None:
            return None
        layers = min(e.config.num_hidden_layers for e in (self.text_encoder, getattr(self, "text_encoder_2", None))
                     if e is not None)
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
            raise ValueError(f"clip_skip must be None or an int in [0, {layers}) (the text encoder's layers to skip), "
                             f"got {clip_skip!r}")
        return clip_skip

    def _text_embeds(self, prompt, negative_prompt, num_images_per_prompt, do_cfg, prompt_embeds,
                     negative_prompt_embeds, clip_skip, callback):
        """The loop's text embeddings (negative first with guidance), in the UNet's dtype; the callback reads the
        negative ones (a replacement is not used, as in diffusers)."""
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            [prompt] if isinstance(prompt, str) else prompt, self.device, num_images_per_prompt, do_cfg,
            negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)
        if callback is not None:
            callback.extra["negative_prompt_embeds"] = negative_prompt_embeds
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        return embeds.to(self.dtype)
