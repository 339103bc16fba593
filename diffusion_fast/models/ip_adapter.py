"""IP-Adapter in our UNet: image projections and the cross-attention's image keys and values, diffusers' names.

An IP-Adapter ("IP-Adapter: Text Compatible Image Prompt Adapter", Ye et al. 2023) turns a CLIP image embedding
into a few tokens (``image_proj``) and gives every cross-attention a second key/value projection of them
(``to_k_ip``/``to_v_ip``): ``out = attn(q, text) + scale * attn(q, image tokens)``, one term per adapter. The UNet
holds them as diffusers' does after ``load_ip_adapter``: ``encoder_hid_proj.image_projection_layers.N`` and
``...attn2.processor.to_k_ip.N`` / ``to_v_ip.N``, so its state_dict names match diffusers'.

Mirrored: the plain IP-Adapter (``ImageProjection``: a linear layer and a LayerNorm into 4 tokens) and IP-Adapter
Plus (``IPAdapterPlusImageProjection``: a perceiver resampler over the image encoder's penultimate hidden states),
several at once. Refused by name: Full-face and the FaceID variants (their own projections, and FaceID's LoRAs).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import loading
from .attention import Attention


class ImageProjection(nn.Module):
    """The plain IP-Adapter's projection: a CLIP image embedding (B, E) -> ``num_image_text_embeds`` tokens."""

    def __init__(self, image_embed_dim, cross_attention_dim, num_image_text_embeds=4):
        super().__init__()
        self.num_image_text_embeds = num_image_text_embeds
        self.image_embeds = nn.Linear(image_embed_dim, num_image_text_embeds * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds):  # (B, E) -> (B, T, D)
        tokens = self.image_embeds(image_embeds.to(self.image_embeds.weight.dtype))
        return self.norm(tokens.reshape(image_embeds.shape[0], self.num_image_text_embeds, -1))


class ResamplerAttention(nn.Module):
    """IP-Adapter Plus's attention: latent queries over [image features; latents], no biases (diffusers' names)."""

    def __init__(self, dim, heads, dim_head=64):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False), nn.Dropout(0.0)])

    def forward(self, latents, context):  # latents (B, Q, C), context (B, L + Q, C)
        def heads(x):
            return x.view(x.shape[0], x.shape[1], self.heads, self.dim_head).transpose(1, 2)

        out = ops._attention(heads(self.to_q(latents)), heads(self.to_k(context)), heads(self.to_v(context)),
                             self.dim_head**-0.5)
        return self.to_out[0](out.transpose(1, 2).reshape(latents.shape[0], -1, self.heads * self.dim_head))


class GeluFeedForward(nn.Module):
    """diffusers' FeedForward(activation_fn="gelu", bias=False): Linear -> GELU -> Linear."""

    def __init__(self, dim, mult):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Dropout(0.0), nn.Linear(dim * mult, dim, bias=False)])
        self.net[0].proj = nn.Linear(dim, dim * mult, bias=False)

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x)))


class ResamplerBlock(nn.Module):
    def __init__(self, dim, dim_head, heads, ffn_ratio):
        super().__init__()
        self.ln0, self.ln1 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ResamplerAttention(dim, heads, dim_head)
        self.ff = nn.Sequential(nn.LayerNorm(dim), GeluFeedForward(dim, ffn_ratio))

    def forward(self, x, latents):
        normed = self.ln1(latents)
        latents = self.attn(normed, torch.cat([self.ln0(x), normed], dim=-2)) + latents
        return self.ff(latents) + latents


class IPAdapterPlusImageProjection(nn.Module):
    """IP-Adapter Plus's perceiver resampler: image-encoder hidden states (B, L, E) -> ``num_queries`` tokens."""

    def __init__(self, embed_dims, output_dims, hidden_dims, depth, heads, num_queries, dim_head=64, ffn_ratio=4):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(1, num_queries, hidden_dims))
        self.proj_in = nn.Linear(embed_dims, hidden_dims)
        self.proj_out = nn.Linear(hidden_dims, output_dims)
        self.norm_out = nn.LayerNorm(output_dims)
        self.layers = nn.ModuleList(ResamplerBlock(hidden_dims, dim_head, heads, ffn_ratio) for _ in range(depth))

    def forward(self, x):  # (B, L, E) -> (B, Q, D)
        latents = self.latents.repeat(x.shape[0], 1, 1)
        x = self.proj_in(x)
        for block in self.layers:
            latents = block(x, latents)
        return self.norm_out(self.proj_out(latents))


class MultiIPAdapterImageProjection(nn.Module):
    """The UNet's ``encoder_hid_proj`` with IP-Adapters: one projection per adapter."""

    def __init__(self, layers):
        super().__init__()
        self.image_projection_layers = nn.ModuleList(layers)

    def forward(self, image_embeds):
        """A list, one per adapter, of (B, images, E) or (B, images, L, E) embeddings -> (B, images * T, D) tokens."""
        if not isinstance(image_embeds, (list, tuple)) or len(image_embeds) != len(self.image_projection_layers):
            got = f"{len(image_embeds)} tensors" if isinstance(image_embeds, (list, tuple)) else type(image_embeds).__name__
            raise ValueError(f"image_embeds must be a list of {len(self.image_projection_layers)} tensors (one per "
                             f"IP-Adapter), got {got}")
        tokens = []
        for i, (embeds, layer) in enumerate(zip(image_embeds, self.image_projection_layers)):
            want = 3 if isinstance(layer, ImageProjection) else 4
            if not torch.is_tensor(embeds) or embeds.dim() != want:
                shape = "(B, images, embed)" if want == 3 else "(B, images, tokens, hidden)"
                got = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
                raise ValueError(f"image_embeds[{i}] must be a {shape} tensor for this IP-Adapter, got {got}")
            batch, images = embeds.shape[:2]
            projected = layer(embeds.reshape(batch * images, *embeds.shape[2:]))
            tokens.append(projected.reshape(batch, images * projected.shape[1], projected.shape[2]))
        return tokens


class IPAdapterAttnProcessor(nn.Module):
    """A cross-attention's image keys and values, one pair per adapter, and each adapter's ``scale`` (a float, or
    with per-block scales set by ``set_ip_adapter_scale``, the value for this layer)."""

    def __init__(self, hidden_size, cross_attention_dim, num_tokens):
        super().__init__()
        self.num_tokens = list(num_tokens)
        self.scale = [1.0] * len(num_tokens)
        self.to_k_ip = nn.ModuleList(nn.Linear(cross_attention_dim, hidden_size, bias=False) for _ in num_tokens)
        self.to_v_ip = nn.ModuleList(nn.Linear(cross_attention_dim, hidden_size, bias=False) for _ in num_tokens)

    def add_image_attention(self, attn: Attention, q, out, image_tokens, masks=None):
        """``out`` (B, H, L, D) + each adapter's scale * attention of ``q`` over its image tokens (B, T, C). With a
        mask for an adapter (1, images, h, w), each of its images attends alone, its term masked to the mask's
        region (downsampled to this layer's L queries) and scaled by its own scale when the scale is a list."""
        if len(image_tokens) != len(self.scale):
            raise ValueError(f"{len(image_tokens)} IP-Adapter image token tensors for {len(self.scale)} adapters")
        masks = masks if masks is not None else [None] * len(self.scale)
        for scale, to_k, to_v, tokens, mask in zip(self.scale, self.to_k_ip, self.to_v_ip, image_tokens, masks):
            if scale == 0 or isinstance(scale, list) and all(s == 0 for s in scale):  # (skipped, as in diffusers)
                continue
            k, v = attn._heads(to_k(tokens)), attn._heads(to_v(tokens))
            if mask is None:
                out = out + scale * attn._attend(q, k, v)
                continue
            images = mask.shape[1]
            per_image = k.shape[2] // images
            scales = scale if isinstance(scale, list) else [scale] * images
            for i in range(images):
                part = slice(i * per_image, (i + 1) * per_image)
                region = downsample_mask(mask[:, i], q.shape[0], q.shape[2]).to(q.dtype)
                out = out + scales[i] * (attn._attend(q, k[:, :, part], v[:, :, part]) * region)
        return out


def downsample_mask(mask, batch, queries):
    """An image's IP-Adapter mask (1, h, w) -> (batch, 1, queries, 1) over a layer's queries, as diffusers'
    IPAdapterMaskProcessor.downsample computes it: bicubic to the mask's aspect ratio at ``queries`` tokens, then
    padded with zeros or cut where that grid does not hold exactly ``queries`` (an aspect ratio the output lacks)."""
    ratio = mask.shape[2] / mask.shape[1]
    rows = int(math.sqrt(queries / ratio))
    rows = rows + int(queries % rows != 0)
    cols = queries // rows
    small = F.interpolate(mask[None].float(), size=(rows, cols), mode="bicubic")[0].reshape(mask.shape[0], -1)
    if rows * cols != queries:
        ops.warn_once(f"ip-mask-aspect-{mask.shape[1]}x{mask.shape[2]}-{queries}",
                  "diffusion_fast: an IP-Adapter mask's aspect ratio does not match the output's; its downsampled "
                  "region is padded or cut (as in diffusers): give masks at the output's size")
        small = F.pad(small, (0, queries - small.shape[1])) if small.shape[1] < queries else small[:, :queries]
    return small.to(mask.dtype).expand(batch, -1)[:, None, :, None]


def cross_attentions(unet) -> list:
    """The UNet's cross-attention modules with their diffusers names, in the order of diffusers' attn_processors
    (down blocks, up blocks, then the mid block: the order IP-Adapter files number them by). An only-cross block's
    first attention ("attn1", attending to the text) takes none, as in diffusers."""
    found = []
    for prefix in ("down_blocks", "up_blocks", "mid_block"):
        for name, module in getattr(unet, prefix).named_modules(prefix=prefix):
            if isinstance(module, Attention) and module.is_cross and not name.endswith("attn1"):
                found.append((name, module))
    return found


_PLUS_RENAMES = (  # the original IP-Adapter Plus names (layers.N.M...) -> diffusers' (layers.N.attn/ln0/ln1/ff)
    (r"^layers\.(\d+)\.0\.norm1\.", r"layers.\1.ln0."), (r"^layers\.(\d+)\.0\.norm2\.", r"layers.\1.ln1."),
    (r"^layers\.(\d+)\.0\.to_q\.", r"layers.\1.attn.to_q."), (r"^layers\.(\d+)\.0\.to_out\.", r"layers.\1.attn.to_out.0."),
    (r"^layers\.(\d+)\.1\.0\.", r"layers.\1.ff.0."), (r"^layers\.(\d+)\.1\.1\.", r"layers.\1.ff.1.net.0.proj."),
    (r"^layers\.(\d+)\.1\.3\.", r"layers.\1.ff.1.net.2."),
)


def image_projection(state: dict, name: str) -> nn.Module:
    """The projection an adapter's ``image_proj`` weights describe, loaded strictly (its kind read from its keys)."""
    if "proj.weight" in state:  # the plain IP-Adapter: Linear(E, 4 * D) + LayerNorm(D)
        state = {k.replace("proj", "image_embeds", 1) if k.startswith("proj.") else k: v for k, v in state.items()}
        dim = state["norm.weight"].shape[0] if "norm.weight" in state else state["image_embeds.weight"].shape[0] // 4
        tokens = state["image_embeds.weight"].shape[0] // dim
        with torch.device("meta"):
            layer = ImageProjection(state["image_embeds.weight"].shape[1], dim, tokens)
    elif "latents" in state and "proj_in.weight" in state:  # IP-Adapter Plus
        converted = {}
        for key, value in state.items():
            kv = re.match(r"^layers\.(\d+)\.0\.to_kv\.(.*)$", key)
            if kv:  # one fused key/value projection in the original files
                k, v = value.chunk(2, dim=0)
                converted[f"layers.{kv[1]}.attn.to_k.{kv[2]}"], converted[f"layers.{kv[1]}.attn.to_v.{kv[2]}"] = k, v
                continue
            for pattern, replacement in _PLUS_RENAMES:
                key = re.sub(pattern, replacement, key)
            converted[key] = value
        state = converted
        depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
        with torch.device("meta"):
            layer = IPAdapterPlusImageProjection(
                embed_dims=state["proj_in.weight"].shape[1], output_dims=state["proj_out.weight"].shape[0],
                hidden_dims=state["latents"].shape[2], depth=depth, heads=state["layers.0.attn.to_q.weight"].shape[0] // 64,
                num_queries=state["latents"].shape[1])
    else:
        kind = ("IP-Adapter Full-face" if "proj.3.weight" in state else "IP-Adapter FaceID Plus"
                if "perceiver_resampler.proj_in.weight" in state else "IP-Adapter FaceID" if "norm.weight" in state
                else "an unknown kind of IP-Adapter")
        raise ValueError(f"{name}: {kind} is not supported (supported: IP-Adapter and IP-Adapter Plus, with "
                         "image_proj keys proj.weight, or latents and proj_in.weight)")
    loading.load_strict(layer, state, f"{name} image_proj")
    return layer


def attach(unet, state_dicts: list, names: list) -> None:
    """Give ``unet`` the adapters' projections and image keys/values (the weights on its device and dtype); the
    weights of the adapters already attached are replaced, as diffusers' ``load_ip_adapter`` replaces them."""
    projections = [image_projection(sd["image_proj"], name) for sd, name in zip(state_dicts, names)]
    tokens = [p.num_image_text_embeds if isinstance(p, ImageProjection) else p.latents.shape[1] for p in projections]
    processors, problems = [], []
    for index, (module_name, attn) in enumerate(cross_attentions(unet)):
        key_id = 2 * index + 1  # the files number every attention module; the cross-attentions are the odd ones
        hidden, cross = attn.to_q.out_features, attn.to_k.in_features
        with torch.device("meta"):
            processor = IPAdapterAttnProcessor(hidden, cross, tokens)
        state = {}
        for i, (sd, name) in enumerate(zip(state_dicts, names)):
            for part in ("to_k_ip", "to_v_ip"):
                key = f"{key_id}.{part}.weight"
                if key not in sd["ip_adapter"]:
                    problems.append(f"{name}: ip_adapter.{key} missing (for {module_name})")
                elif tuple(sd["ip_adapter"][key].shape) != (hidden, cross):
                    problems.append(f"{name}: ip_adapter.{key} is {tuple(sd['ip_adapter'][key].shape)}, "
                                    f"{module_name} takes {(hidden, cross)}")
                else:
                    state[f"{part}.{i}.weight"] = sd["ip_adapter"][key]
        processors.append((attn, processor, state, module_name))
    for sd, name in zip(state_dicts, names):
        extra = sorted(k for k in sd["ip_adapter"] if not re.match(r"^\d+\.to_[kv]_ip\.weight$", k)
                       or int(k.split(".")[0]) > 2 * len(processors) - 1)
        if extra:
            problems.append(f"{name}: unexpected ip_adapter keys {extra[:8]}{' ...' if len(extra) > 8 else ''} (an "
                            "adapter for another UNet, or a FaceID adapter's LoRA)")
    if problems:
        raise ValueError("the IP-Adapter weights do not fit this UNet: " + "; ".join(problems[:20])
                         + (" ..." if len(problems) > 20 else ""))
    for attn, processor, state, module_name in processors:
        loading.load_strict(processor, state, f"IP-Adapter for {module_name}")
        attn.set_processor(processor.to(device=unet.device, dtype=unet.dtype))
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(projections).to(device=unet.device, dtype=unet.dtype)


def detach(unet) -> None:
    for _, attn in cross_attentions(unet):
        attn.set_processor(None)
    unet.encoder_hid_proj = None
