"""The SD 1.x/2.x safety checker: diffusers' StableDiffusionSafetyChecker, loaded from a pipeline folder's
``safety_checker/`` (and its ``feature_extractor/``), run by our SD pipelines as diffusers' run it.

The checker embeds each decoded image with CLIP's vision tower and projection (transformers' CLIPVisionModel, as in
diffusers) and compares the embedding's cosine with 17 concept embeddings and 3 "special care" ones against per-
concept thresholds. An image is flagged when a concept's score, rounded to 3 decimals as diffusers rounds it, is
above 0, with 0.01 added to the concept scores once a special-care score is; a flagged image is returned black.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn


class StableDiffusionSafetyChecker(nn.Module):
    def __init__(self, config):
        """``config``: transformers' CLIPConfig (its vision config and projection width), as diffusers takes it."""
        super().__init__()
        from transformers import CLIPVisionModel

        self.config = config
        width = config.projection_dim
        self.vision_model = CLIPVisionModel(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, width, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(17, width), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(3, width), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(17), requires_grad=False)  # the thresholds
        self.special_care_embeds_weights = nn.Parameter(torch.ones(3), requires_grad=False)

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None, variant=None):
        """A transformers-saved folder (config.json, model.safetensors or pytorch_model.bin, the latter read with
        ``weights_only=True``; ``model.<variant>.safetensors`` first with a variant, e.g. "fp16"), loaded strictly:
        missing, unexpected and mis-shaped weights in one error."""
        from safetensors.torch import load_file
        from transformers import CLIPConfig

        folder = os.fspath(folder)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"{folder!r} is not a safety checker folder (no config.json)")
        config = CLIPConfig.from_pretrained(folder)
        names = ("model.safetensors", "pytorch_model.bin")
        if variant:
            names = (f"model.{variant}.safetensors", f"pytorch_model.{variant}.bin", *names)
        files = [os.path.join(folder, name) for name in names]
        path = next((f for f in files if os.path.isfile(f)), None)
        if path is None:
            raise FileNotFoundError(f"{folder!r} has no safety checker weights (looked for {files})")
        state = load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu",
                                                                                 weights_only=True)
        with warnings.catch_warnings():  # (transformers' note about the vision model's unused text config)
            warnings.simplefilter("ignore")
            model = cls(config)
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
        if missing or unexpected or shapes:
            raise ValueError(f"{path!r} does not fit StableDiffusionSafetyChecker: missing {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}, mis-shaped {shapes}")
        model.load_state_dict(state)
        return model.to(device=device, dtype=dtype).eval()

    @torch.no_grad()
    def flags(self, clip_input) -> list:
        """For each image (CLIP-preprocessed pixels, ``clip_input``), whether it is flagged (see the module)."""
        size = self.config.vision_config.image_size
        if not torch.is_tensor(clip_input) or clip_input.dim() != 4 or clip_input.shape[1] != 3:
            got = tuple(clip_input.shape) if torch.is_tensor(clip_input) else type(clip_input).__name__
            raise ValueError(f"clip_input must be a (B, 3, {size}, {size}) tensor (the feature extractor's "
                             f"pixel_values), got {got}")
        embeds = self.visual_projection(self.vision_model(clip_input)[1])

        def scores(concepts, thresholds, adjustment):  # diffusers' arithmetic: float32, then rounded to 3 decimals
            cos = (nn.functional.normalize(embeds) @ nn.functional.normalize(concepts).t()).cpu().float().numpy()
            return np.round(cos - thresholds.detach().cpu().float().numpy() + np.float32(adjustment), 3)

        special = (scores(self.special_care_embeds, self.special_care_embeds_weights, 0.0) > 0).any(axis=1)
        flagged = []
        for i, care in enumerate(special):  # (a special-care score above 0 raises every concept score by 0.01)
            flagged.append(bool((scores(self.concept_embeds, self.concept_embeds_weights, 0.01 if care else 0.0)[i]
                                 > 0).any()))
        return flagged

    def forward(self, clip_input, images):
        """diffusers' call: (``images`` with the flagged ones replaced by zeros, the flags)."""
        flags = self.flags(clip_input)
        for i, flagged in enumerate(flags):
            if flagged:
                images[i] = torch.zeros_like(images[i]) if torch.is_tensor(images[i]) else np.zeros(images[i].shape)
        return images, flags


def run_safety_checker(checker, feature_extractor, images):
    """diffusers' run_safety_checker on a pipeline's decoded (B, 3, H, W) images in [-1, 1]: (the images, a flagged
    one black, the flags), or (the images, None) without a checker. The checker (ours, or diffusers') sees them as
    diffusers gives them to its feature extractor: 8-bit PIL images."""
    from .pipeline_common import postprocess

    if checker is None:
        return images, None
    if feature_extractor is None:
        raise ValueError("safety_checker: a checker needs its feature_extractor (a CLIPImageProcessor), as "
                         "diffusers' does; give one, or set safety_checker=None")
    weight = next(checker.parameters())
    pixels = feature_extractor(postprocess(images, "pil"), return_tensors="pt").pixel_values
    flags = [bool(f) for f in checker(clip_input=pixels.to(weight.device, weight.dtype), images=images.clone())[1]]
    if any(flags):
        warnings.warn("Potential NSFW content was detected in one or more images: a black image is returned instead "
                      "(diffusers' safety checker). Try another prompt or seed, or load the pipeline with "
                      "safety_checker=None.", UserWarning, stacklevel=4)
        images = images.clone()
        images[torch.tensor(flags, device=images.device)] = -1.0  # (black once mapped to [0, 1])
    return images, flags
