"""IP-Adapters for our pipelines: diffusers' ``load_ip_adapter``, ``set_ip_adapter_scale``, ``unload_ip_adapter`` and
the calls' ``ip_adapter_image`` / ``ip_adapter_image_embeds``, with diffusers' semantics.

The image goes through CLIP's image processor and vision model (transformers') as in diffusers' ``encode_image``:
the image embedding for a plain IP-Adapter (its negative is zeros), the penultimate hidden states for IP-Adapter Plus
(its negative: those of an all-zero image). What differs is when the work runs: each adapter's projection (Plus's
resampler: four attention layers) runs once per call, not at every step, and the image tokens then enter the loop
as inputs of its CUDA graphs, like the text embeddings.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch

from .models import ip_adapter as ip_model


def adapter_count(unet) -> int:
    """How many IP-Adapters ``unet`` has loaded (0: none)."""
    projection = getattr(unet, "encoder_hid_proj", None)
    return len(projection.image_projection_layers) if projection is not None else 0


def _read_adapter(source, subfolder, weight_name):
    """An adapter's {"image_proj": {...}, "ip_adapter": {...}} from a dict, a .safetensors or a .bin file."""
    if isinstance(source, dict):
        state = source
    else:
        if not isinstance(source, (str, os.PathLike)) or not isinstance(weight_name, str):
            raise TypeError("pretrained_model_name_or_path_or_dict must be a local folder or a dict, and weight_name a "
                            f"file name, got {type(source).__name__} and {type(weight_name).__name__}")
        path = os.path.join(os.fspath(source), subfolder or "", weight_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"IP-Adapter weights {path!r} do not exist")
        if weight_name.endswith(".safetensors"):
            from safetensors.torch import load_file

            flat = load_file(path)
            state = {"image_proj": {}, "ip_adapter": {}}
            for key, value in flat.items():
                part, _, rest = key.partition(".")
                if part in state:
                    state[part][rest] = value
        else:
            try:  # weights_only: a pickle may hold only tensors and plain containers, never code to run
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001
                raise ValueError(f"{path!r} could not be loaded with torch.load(weights_only=True): {err}") from None
    if not isinstance(state, dict) or not isinstance(state.get("image_proj"), dict) or not isinstance(
            state.get("ip_adapter"), dict) or not state["image_proj"] or not state["ip_adapter"]:
        raise ValueError("an IP-Adapter state dict holds 'image_proj' and 'ip_adapter' weights; "
                         f"{'this dict' if isinstance(source, dict) else repr(weight_name)} does not")
    return state


def _as_list(name, value, n):
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} IP-Adapters")
    return values


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _block_scales(unet, scales, name):
    """diffusers' per-block IP-Adapter scales -> {attention block prefix ("down_blocks.1.attentions.0"): scale}, the
    blocks left out at 0."""
    unknown = sorted(set(scales) - {"down", "mid", "up"})
    if unknown:
        raise ValueError(f"{name}: per-block scales take the keys 'down', 'mid' and 'up', got {unknown}")
    mid = scales.get("mid", 0.0)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise ValueError(f"{name}: 'mid' takes one scale, got {len(mid)}")
        mid = mid[0]
    out = {"mid_block.attentions.0": _number(f"{name}['mid']", mid)}
    for side in ("down", "up"):
        blocks = {f"block_{i}": len(block.attentions) for i, block in enumerate(getattr(unet, f"{side}_blocks"))
                  if getattr(block, "attentions", None) is not None}
        given = scales.get(side, 0.0)
        given = given if isinstance(given, dict) else {block: given for block in blocks}
        if set(given) - set(blocks):
            raise ValueError(f"{name}: {side} blocks {sorted(set(given) - set(blocks))} have no attention in this "
                             f"UNet (those that do: {sorted(blocks)})")
        for block, count in blocks.items():
            values = given.get(block, 0.0)
            values = values * count if isinstance(values, list) and len(values) == 1 else values
            values = values if isinstance(values, list) else [values] * count
            if len(values) != count:
                raise ValueError(f"{name}: {side}.{block} has {count} transformers, got {len(values)} scales")
            for j, value in enumerate(values):
                out[f"{side}_blocks.{block[6:]}.attentions.{j}"] = _number(f"{name}['{side}']['{block}']", value)
    return out


class IPAdapterMixin:
    """Mixed into our SD and SDXL pipelines (every kind: text-to-image, image-to-image, inpainting, ControlNet)."""

    image_encoder = None  # transformers' CLIPVisionModelWithProjection, loaded by load_ip_adapter
    feature_extractor = None  # transformers' CLIPImageProcessor
    _ip_call = None  # the running call's (ip_adapter_image, ip_adapter_image_embeds)

    def load_ip_adapter(self, pretrained_model_name_or_path_or_dict, subfolder, weight_name,
                        image_encoder_folder="image_encoder"):
        """diffusers' load_ip_adapter, from a local folder (``subfolder``/``weight_name``, e.g. h94/IP-Adapter's
        ``models``/``ip-adapter_sd15.safetensors``) or a state dict; lists load several adapters at once. The
        image encoder comes from ``image_encoder_folder`` (under ``subfolder`` unless it holds a "/") unless the
        pipeline has one; None skips it (then only ``ip_adapter_image_embeds`` can be given)."""
        weight_names = weight_name if isinstance(weight_name, list) else [weight_name]
        sources = _as_list("pretrained_model_name_or_path_or_dict", pretrained_model_name_or_path_or_dict,
                           len(weight_names))
        subfolders = _as_list("subfolder", subfolder, len(weight_names))
        states = [_read_adapter(src, sub, name) for src, sub, name in zip(sources, subfolders, weight_names)]
        names = [n if isinstance(n, str) else f"IP-Adapter {i}" for i, n in enumerate(weight_names)]
        encoder = self.image_encoder
        if encoder is None and image_encoder_folder is not None:
            if isinstance(sources[0], dict):
                raise ValueError("image_encoder: it cannot be loaded from a state dict; pass image_encoder_folder=None "
                                 "and give ip_adapter_image_embeds, or set pipe.image_encoder first")
            from transformers import CLIPVisionModelWithProjection

            folder = (os.path.join(subfolders[0] or "", image_encoder_folder) if "/" not in image_encoder_folder
                      else image_encoder_folder)
            path = os.path.join(os.fspath(sources[0]), folder)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"image_encoder_folder: {path!r} does not exist (pass the folder that holds "
                                        "the CLIP image encoder, or image_encoder_folder=None)")
            encoder = CLIPVisionModelWithProjection.from_pretrained(path).to(device=self.device, dtype=self.dtype)
            encoder = encoder.eval()
        ip_model.attach(self.unet, states, names)  # (checks every weight before it changes the UNet)
        self.image_encoder = encoder
        if self.feature_extractor is None:
            from transformers import CLIPImageProcessor

            size = encoder.config.image_size if encoder is not None else 224
            self.feature_extractor = CLIPImageProcessor(size=size, crop_size=size)

    def _image_encoder_of(self, pipe):
        """This pipeline, given ``pipe``'s image encoder, processor and safety checker (built on its components,
        whose UNet may hold IP-Adapters)."""
        self.image_encoder, self.feature_extractor = pipe.image_encoder, pipe.feature_extractor
        self.safety_checker = getattr(pipe, "safety_checker", None)
        return self

    def set_ip_adapter_scale(self, scale):
        """Each adapter's scale: one for all, or a list with one per adapter (0 turns an adapter off). A scale is a
        number; or as in diffusers (InstantStyle) a dict of per-block ones, every block it leaves out at 0:
        ``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}`` (a number or one per transformer
        of a block, or one for a whole side; "mid" takes one number); or a list with one per image of the adapter,
        for calls with ``ip_adapter_masks``."""
        n = adapter_count(self.unet)
        if n == 0:
            raise ValueError("set_ip_adapter_scale: no IP-Adapter is loaded (load_ip_adapter first)")
        if n == 1 and isinstance(scale, list) and len(scale) > 1 and not any(isinstance(v, (list, dict)) for v in scale):
            raise ValueError(f"scale has {len(scale)} entries for 1 IP-Adapters (per-image scales, for masks, are a "
                             "list inside the list: [[0.7, 0.4]])")
        configs = [_block_scales(self.unet, value, f"scale[{i}]") if isinstance(value, dict)
                   else [_number(f"scale[{i}][{j}]", v) for j, v in enumerate(value)] if isinstance(value, list)
                   else _number(f"scale[{i}]", value) for i, value in enumerate(_as_list("scale", scale, n))]
        for name, attn in ip_model.cross_attentions(self.unet):
            attn.processor.scale = [
                config if not isinstance(config, dict) else next(s for prefix, s in config.items()
                                                                 if name.startswith(prefix + "."))
                for config in configs]

    def unload_ip_adapter(self):
        """Remove the adapters from the UNet, and the image encoder and processor (as diffusers does: the processor
        stays where a safety checker reads it)."""
        ip_model.detach(self.unet)
        self.image_encoder = None
        if getattr(self, "safety_checker", None) is None:
            self.feature_extractor = None

    @torch.no_grad()
    def encode_image(self, image, device, num_images_per_prompt, output_hidden_states=None):
        """diffusers' encode_image: (embeds, negative embeds) for a plain adapter, or the penultimate hidden
        states of the image and of an all-zero one (``output_hidden_states``, IP-Adapter Plus)."""
        if self.image_encoder is None:
            raise ValueError("ip_adapter_image: the pipeline has no image encoder (load_ip_adapter loaded none); give "
                             "ip_adapter_image_embeds instead")
        dtype = next(self.image_encoder.parameters()).dtype
        if not isinstance(image, torch.Tensor):
            image = self.feature_extractor(image, return_tensors="pt").pixel_values
        image = image.to(device=device, dtype=dtype)
        if output_hidden_states:
            embeds = self.image_encoder(image, output_hidden_states=True).hidden_states[-2]
            negative = self.image_encoder(torch.zeros_like(image), output_hidden_states=True).hidden_states[-2]
            return (embeds.repeat_interleave(num_images_per_prompt, dim=0),
                    negative.repeat_interleave(num_images_per_prompt, dim=0))
        embeds = self.image_encoder(image).image_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return embeds, torch.zeros_like(embeds)

    def prepare_ip_adapter_image_embeds(self, ip_adapter_image, ip_adapter_image_embeds, device,
                                        num_images_per_prompt, do_classifier_free_guidance):
        """diffusers' prepare_ip_adapter_image_embeds: per adapter, (negative first with guidance) the embeddings
        repeated for ``num_images_per_prompt`` (the whole batch: prompts x images per prompt)."""
        layers = self.unet.encoder_hid_proj.image_projection_layers
        positive, negative = [], []
        if ip_adapter_image_embeds is None:
            for image, layer in zip(_as_list("ip_adapter_image", ip_adapter_image, len(layers)), layers):
                embeds, neg = self.encode_image(image, device, 1, not isinstance(layer, ip_model.ImageProjection))
                positive.append(embeds[None])
                negative.append(neg[None])
        else:
            for embeds in ip_adapter_image_embeds:
                if do_classifier_free_guidance:
                    neg, embeds = embeds.chunk(2)
                    negative.append(neg)
                positive.append(embeds)
        out = []
        for i, embeds in enumerate(positive):
            embeds = torch.cat([embeds] * num_images_per_prompt)
            if do_classifier_free_guidance:
                embeds = torch.cat([torch.cat([negative[i]] * num_images_per_prompt), embeds])
            out.append(embeds.to(device=device))
        return out

    def _check_ip_adapter_inputs(self, ip_adapter_image, ip_adapter_image_embeds, masks=None):
        n = adapter_count(self.unet)
        if masks is not None:
            masks = list(masks.unsqueeze(1)) if torch.is_tensor(masks) else masks  # (diffusers' older form)
            if n == 0 or not isinstance(masks, list) or len(masks) != n:
                raise ValueError(f"ip_adapter_masks must be a list with one entry per IP-Adapter ({n}): a (1, images, "
                                 "H, W) mask tensor (IPAdapterMaskProcessor.preprocess) or None")
            for i, mask in enumerate(masks):
                if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 4 or mask.shape[0] != 1):
                    got = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
                    raise ValueError(f"ip_adapter_masks[{i}] must be a (1, images, H, W) tensor (one mask per image "
                                     f"of the adapter; IPAdapterMaskProcessor.preprocess gives them), got {got}")
        given = ip_adapter_image is not None or ip_adapter_image_embeds is not None
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("ip_adapter_image and ip_adapter_image_embeds: give one, not both")
        if given and n == 0:
            raise ValueError("ip_adapter_image / ip_adapter_image_embeds given, but no IP-Adapter is loaded "
                             "(load_ip_adapter first)")
        if n and not given:
            raise ValueError(f"{n} IP-Adapter(s) loaded: give ip_adapter_image or ip_adapter_image_embeds (or "
                             "unload_ip_adapter())")
        if ip_adapter_image is not None:
            import numpy as np
            import PIL.Image

            kinds = (PIL.Image.Image, np.ndarray, torch.Tensor)
            for i, images in enumerate(_as_list("ip_adapter_image", ip_adapter_image, n)):
                for image in images if isinstance(images, (list, tuple)) else [images]:
                    if not isinstance(image, kinds):
                        raise TypeError(f"ip_adapter_image[{i}] must be a PIL image, a numpy array or a tensor (or a "
                                        f"list of them: several images for one adapter), got {type(image).__name__}")
            if self.image_encoder is None:
                raise ValueError("ip_adapter_image: the pipeline has no image encoder (load_ip_adapter loaded none); "
                                 "give ip_adapter_image_embeds instead")
        if ip_adapter_image_embeds is not None:
            if not isinstance(ip_adapter_image_embeds, list) or len(ip_adapter_image_embeds) != n:
                raise ValueError(f"ip_adapter_image_embeds must be a list of {n} tensors (one per IP-Adapter), got "
                                 f"{type(ip_adapter_image_embeds).__name__}")
            for i, embeds in enumerate(ip_adapter_image_embeds):
                if not torch.is_tensor(embeds) or embeds.dim() not in (3, 4):
                    got = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
                    raise ValueError(f"ip_adapter_image_embeds[{i}] must be a 3-D or 4-D tensor, got {got}")
        return masks

    def _ip_adapter_tokens(self, batch, do_cfg):
        """The running call's image tokens, one (UNet batch, images x tokens, D) tensor per adapter, then each
        adapter's mask (1, images, H, W) or None; () without adapters."""
        if self._ip_call is None or adapter_count(self.unet) == 0:
            return ()
        image, embeds, masks = self._ip_call
        for i, e in enumerate(embeds or ()):
            if e.shape[0] != (2 if do_cfg else 1):
                raise ValueError(f"ip_adapter_image_embeds[{i}] has {e.shape[0]} rows: give "
                                 f"{'2 (the negative, then the positive) with guidance' if do_cfg else '1 without guidance'}"
                                 ", as diffusers takes them; they are repeated for the batch")
        embeds = self.prepare_ip_adapter_image_embeds(image, embeds, self.device, batch, do_cfg)
        masks = masks or [None] * len(embeds)
        processor = ip_model.cross_attentions(self.unet)[0][1].processor
        for i, (e, mask, scale) in enumerate(zip(embeds, masks, processor.scale)):
            if mask is not None and mask.shape[1] != e.shape[1]:
                raise ValueError(f"ip_adapter_masks[{i}] has {mask.shape[1]} masks for the adapter's {e.shape[1]} "
                                 "images")
            if isinstance(scale, list) and (mask is None or len(scale) != e.shape[1]):
                raise ValueError(f"IP-Adapter {i} has one scale per image ({len(scale)}): give ip_adapter_masks with "
                                 f"one mask per image ({e.shape[1]}), or set one scale")
        with torch.no_grad():
            tokens = self.unet.encoder_hid_proj([e.to(self.dtype) for e in embeds])
        return (*tokens, *[None if m is None else m.to(self.device) for m in masks])

    def _model_call(self, model_input, t, embeds, *cond):
        """The UNet call (``_unet_call``) with the IP-Adapters' image tokens and masks, the last entries of ``cond``
        (but for an LCM-distilled UNet's guidance embedding, the very last: ``_guidance_cond``), joined to the text
        as the UNet takes them."""
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            cond, timestep_cond = cond[:-1], cond[-1]
        n = adapter_count(self.unet)
        if n:
            cond, tokens, masks = cond[:-2 * n], cond[-2 * n:-n], cond[-n:]
            embeds = (embeds, list(tokens), None if all(m is None for m in masks) else list(masks))
        return self._unet_call(model_input, t, embeds, *cond, timestep_cond=timestep_cond)


class IPAdapterMaskProcessor:
    """diffusers' IPAdapterMaskProcessor: ``preprocess(masks, height, width)`` turns masks (a PIL image, a list of
    them, or a (B, 1, H, W) tensor) into a (B, 1, H, W) tensor at the output size: Lanczos-resized, grayscale, in
    [0, 1], binarized at 0.5 (without a size, the first mask's own, cut to a multiple of 8). For one adapter with B
    images, pass ``masks.reshape(1, B, H, W)`` in ``cross_attention_kwargs={"ip_adapter_masks": [...]}``."""

    @staticmethod
    def preprocess(image, height=None, width=None):
        import PIL.Image

        from .pipeline_inpaint import preprocess_mask

        first = image[0] if isinstance(image, (list, tuple)) and image else image
        own = first.size[::-1] if isinstance(first, PIL.Image.Image) else tuple(first.shape[-2:]) if torch.is_tensor(
            first) else (None, None)
        height, width = (given if given is not None else x - x % 8 if x is not None else None
                         for given, x in zip((height, width), own))
        return preprocess_mask(image, height, width)


def ip_adapter_call(call):
    """A pipeline ``__call__`` that takes diffusers' ``ip_adapter_image`` and ``ip_adapter_image_embeds``, and masks
    as ``cross_attention_kwargs={"ip_adapter_masks": [...]}``: checked before any work, encoded and projected once
    the batch is known (``_ip_adapter_tokens``). The rest of ``cross_attention_kwargs`` goes on to the call."""
    @functools.wraps(call)
    def with_images(self, *args, ip_adapter_image=None, ip_adapter_image_embeds=None, cross_attention_kwargs=None,
                    **kwargs):
        masks = None
        if isinstance(cross_attention_kwargs, dict) and "ip_adapter_masks" in cross_attention_kwargs:
            cross_attention_kwargs = dict(cross_attention_kwargs)
            masks = cross_attention_kwargs.pop("ip_adapter_masks")
        masks = self._check_ip_adapter_inputs(ip_adapter_image, ip_adapter_image_embeds, masks)
        self._ip_call = (ip_adapter_image, ip_adapter_image_embeds, masks) if adapter_count(self.unet) else None
        try:
            return call(self, *args, cross_attention_kwargs=cross_attention_kwargs, **kwargs)
        finally:
            self._ip_call = None

    signature = inspect.signature(call)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
             for name in ("ip_adapter_image", "ip_adapter_image_embeds")]
    with_images.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    return with_images
