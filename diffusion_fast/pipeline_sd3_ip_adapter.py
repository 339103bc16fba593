"""IP-Adapters for our SD3 pipelines (InstantX's SD3.5-Large-IP-Adapter), with diffusers' SD3IPAdapterMixin
semantics: ``load_ip_adapter``, ``set_ip_adapter_scale``, ``unload_ip_adapter``, ``is_ip_adapter_active`` and the
calls' ``ip_adapter_image`` / ``ip_adapter_image_embeds`` (text-to-image, image-to-image and inpainting, as diffusers
takes them).

The image goes through SigLIP's processor and vision model (transformers'), its penultimate hidden states the
features; the negative features for classifier-free guidance are zeros. The adapter's time-conditioned projection
runs inside the transformer call at every step (it depends on the timestep), so the features enter the loop as one
more input of its CUDA graphs, like the text embeddings.
"""
from __future__ import annotations

import math
import os

import torch

from .ip_adapter import _read_adapter
from .models import ip_adapter_sd3


def _check_one_image(image):
    """The SD3 adapter's image prompt: one PIL image, an (H, W, C) array, a (1, C, H, W) tensor of processed pixels,
    or a list of one; anything else is refused by name (diffusers fails on a list of several, deep in its
    projection)."""
    import numpy as np
    import PIL.Image

    count = 0
    for i in image if isinstance(image, (list, tuple)) else [image]:
        if not isinstance(i, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            raise TypeError(f"ip_adapter_image must be a PIL image, a numpy array or a tensor (or a list of one), got "
                            f"{type(i).__name__}")
        if torch.is_tensor(i) and i.dim() != 4:
            raise ValueError(f"ip_adapter_image: a tensor is taken as processed pixels, (1, C, H, W); got "
                             f"{tuple(i.shape)}")
        count += i.shape[0] if not isinstance(i, PIL.Image.Image) and i.ndim == 4 else 1  # (a batch of images)
    if count != 1:
        raise ValueError(f"ip_adapter_image: give one image (the SD3 adapter takes one for the whole batch; "
                         f"diffusers fails on several), got {count}")


class SD3IPAdapterMixin:
    image_encoder = None  # SigLIP's vision model (transformers' SiglipVisionModel), if given or loaded
    feature_extractor = None  # its image processor

    def _ip_modules(self):
        return [b.attn.ip_adapter for b in self.transformer.transformer_blocks if b.attn.ip_adapter is not None]

    @property
    def is_ip_adapter_active(self) -> bool:
        """An IP-Adapter is loaded and its scale is above 0."""
        return any(m.scale > 0 for m in self._ip_modules())

    def load_ip_adapter(self, pretrained_model_name_or_path_or_dict, weight_name="ip-adapter.safetensors",
                        subfolder=None, image_encoder_folder="image_encoder"):
        """diffusers' SD3 load_ip_adapter, from a local folder (``subfolder``/``weight_name``: InstantX's
        ``ip-adapter.bin`` or a .safetensors) or a state dict. The SigLIP image encoder comes from
        ``image_encoder_folder`` (under ``subfolder`` unless it holds a "/") unless the pipeline has one (InstantX's
        card passes google/siglip-so400m-patch14-384 to the pipeline); None skips it (then only
        ``ip_adapter_image_embeds`` can be given). A loaded adapter is replaced."""
        for name, value in (("subfolder", subfolder), ("image_encoder_folder", image_encoder_folder)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
        state = _read_adapter(pretrained_model_name_or_path_or_dict, subfolder, weight_name)
        encoder, processor = self.image_encoder, self.feature_extractor
        if encoder is None and image_encoder_folder is not None:
            if isinstance(pretrained_model_name_or_path_or_dict, dict):
                raise ValueError("image_encoder: it cannot be loaded from a state dict; pass image_encoder_folder=None "
                                 "and give ip_adapter_image_embeds, or give the pipeline an image_encoder")
            from transformers import SiglipVisionModel

            folder = (os.path.join(subfolder or "", image_encoder_folder) if "/" not in image_encoder_folder
                      else image_encoder_folder)
            path = os.path.join(os.fspath(pretrained_model_name_or_path_or_dict), folder)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"image_encoder_folder: {path!r} does not exist (pass the folder that holds "
                                        "the SigLIP image encoder, or image_encoder_folder=None)")
            encoder = SiglipVisionModel.from_pretrained(path).to(device=self.device, dtype=self.dtype).eval()
            if processor is None and os.path.isfile(os.path.join(path, "preprocessor_config.json")):
                from transformers import SiglipImageProcessor

                processor = SiglipImageProcessor.from_pretrained(path)
        ip_adapter_sd3.attach(self.transformer, state)  # (checks every weight before it changes the transformer)
        if processor is None and encoder is not None:  # SigLIP's processing at the encoder's input size
            from transformers import SiglipImageProcessor

            size = encoder.config.image_size
            processor = SiglipImageProcessor(size={"height": size, "width": size})
        self.image_encoder, self.feature_extractor = encoder, processor

    def set_ip_adapter_scale(self, scale):
        """The loaded adapter's scale (0.5 when loaded, as diffusers'): how strongly the image conditions."""
        modules = self._ip_modules()
        if not modules:
            raise ValueError("set_ip_adapter_scale: no IP-Adapter is loaded (pipe.load_ip_adapter(...) first)")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"scale must be a finite number (one for the SD3 adapter), got {scale!r}")
        for m in modules:
            m.scale = float(scale)

    def unload_ip_adapter(self):
        """Remove the adapter, and the image encoder and processor, as diffusers' does."""
        ip_adapter_sd3.detach(self.transformer)
        self.image_encoder = self.feature_extractor = None

    def encode_image(self, image, device):
        """SigLIP's penultimate hidden states for ``image`` (PIL images or a pixel tensor already processed)."""
        if not torch.is_tensor(image):
            image = self.feature_extractor(image, return_tensors="pt").pixel_values
        image = image.to(device=device, dtype=self.dtype)
        return self.image_encoder(image, output_hidden_states=True).hidden_states[-2]

    def prepare_ip_adapter_image_embeds(self, ip_adapter_image=None, ip_adapter_image_embeds=None, device=None,
                                        num_images_per_prompt=1, do_classifier_free_guidance=True):
        """diffusers' SD3 prepare_ip_adapter_image_embeds: the features repeated ``num_images_per_prompt`` times
        (the call's whole batch), zeros (or the given embeddings' first half) before them under guidance."""
        device = device or self.device
        if ip_adapter_image_embeds is not None:
            if not torch.is_tensor(ip_adapter_image_embeds) or ip_adapter_image_embeds.dim() != 3:
                got = (tuple(ip_adapter_image_embeds.shape) if torch.is_tensor(ip_adapter_image_embeds)
                       else type(ip_adapter_image_embeds).__name__)
                raise ValueError(f"ip_adapter_image_embeds must be a (rows, N, E) tensor (the negative row first "
                                 f"under guidance), got {got}")
            if do_classifier_free_guidance:
                negative, positive = ip_adapter_image_embeds.chunk(2)
            else:
                positive = ip_adapter_image_embeds
        elif ip_adapter_image is not None:
            positive = self.encode_image(ip_adapter_image, device)
            negative = torch.zeros_like(positive)
        else:
            raise ValueError("give ip_adapter_image or ip_adapter_image_embeds")
        embeds = torch.cat([positive] * num_images_per_prompt)
        if do_classifier_free_guidance:
            embeds = torch.cat([torch.cat([negative] * num_images_per_prompt), embeds])
        return embeds.to(device=device)

    def _with_ip_adapter(self, text, cond, ip_adapter_image, ip_adapter_image_embeds, rows):
        """A call's (loop text, prompt's text) with the image features appended when the adapter runs (an image with
        an active adapter, or embeddings given, as diffusers decides); ``rows``: the call's batch."""
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            return text, cond
        if not self._ip_modules():
            name = "ip_adapter_image" if ip_adapter_image is not None else "ip_adapter_image_embeds"
            raise ValueError(f"{name}: no IP-Adapter is loaded (pipe.load_ip_adapter(...) first)")
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("ip_adapter_image and ip_adapter_image_embeds: give one, not both")
        if ip_adapter_image_embeds is not None:
            cfg = 2 if self.do_classifier_free_guidance else 1
            dim = self.transformer.image_proj.proj_in.in_features
            if not torch.is_tensor(ip_adapter_image_embeds) or ip_adapter_image_embeds.dim() != 3 or (
                    ip_adapter_image_embeds.shape[0] != cfg) or ip_adapter_image_embeds.shape[2] != dim:
                got = (tuple(ip_adapter_image_embeds.shape) if torch.is_tensor(ip_adapter_image_embeds)
                       else type(ip_adapter_image_embeds).__name__)
                raise ValueError(f"ip_adapter_image_embeds must be a ({cfg}, N, {dim}) tensor (the image's features"
                                 f"{', the negative ones first' if cfg == 2 else ''}), got {got}")
        elif not self.is_ip_adapter_active:  # (scale 0: the image changes nothing, as in diffusers)
            return text, cond
        elif self.image_encoder is None:
            raise ValueError("ip_adapter_image: the pipeline has no image encoder (load_ip_adapter with an "
                             "image_encoder_folder, or give the pipeline one); or pass ip_adapter_image_embeds")
        if ip_adapter_image is not None:
            _check_one_image(ip_adapter_image)
        embeds = self.prepare_ip_adapter_image_embeds(ip_adapter_image, ip_adapter_image_embeds, self.device, rows,
                                                      self.do_classifier_free_guidance)
        embeds = embeds.to(dtype=text[0].dtype)
        return (*text, embeds), (*cond, embeds[-rows:])
