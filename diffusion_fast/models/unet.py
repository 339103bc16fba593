"""UNet2DConditionModel for SD 1.x, SD 2.x (and SDXL's text-time conditioning), with diffusers' parameter names.

``unet(sample, timestep, encoder_hidden_states)`` returns the noise prediction tensor. The timestep (int, float, 0-d
or (B,) tensor, on any device) is broadcast to the batch without reading it on the host, so the forward can be
captured in a CUDA graph.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import loading
from .attention import Transformer2DModel, fuse_qkv_projections
from .freeu import FACTORS as FREEU_FACTORS
from .freeu import apply_freeu, freeu_factors
from .layers import Downsample2D, GroupNorm, ResnetBlock2D, TimestepEmbedding, Upsample2D
from .time_conditioning import embed_time

DEFAULTS = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    only_cross_attention=False, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1.0, dropout=0.0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280,
    transformer_layers_per_block=1, attention_head_dim=8, num_attention_heads=None, use_linear_projection=False,
    upcast_attention=False, addition_embed_type=None, addition_time_embed_dim=None,
    projection_class_embeddings_input_dim=None, resnet_out_scale_factor=1.0, conv_in_kernel=3, conv_out_kernel=3,
    time_cond_proj_dim=None, class_embed_type=None, num_class_embeds=None,
    mid_block_only_cross_attention=None,  # (diffusers reads it for a SimpleCrossAttn mid block only: ignored here)
)
# Fields we accept only at diffusers' default (anything else is a clear error naming the field).
UNSUPPORTED = dict(
    encoder_hid_dim=None, encoder_hid_dim_type=None,
    dual_cross_attention=False, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    time_embedding_type="positional", time_embedding_dim=None, time_embedding_act_fn=None, timestep_post_act=None,
    attention_type="default", class_embeddings_concat=False,
    cross_attention_norm=None, reverse_transformer_layers_per_block=None,
    addition_embed_type_num_heads=64,
)
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_block(value, n, name):
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"UNet2DConditionModel: {name} has {len(values)} entries for {n} blocks")
    return values


def check_inputs(config, sample, encoder_hidden_states):
    """A UNet's or ControlNet's inputs, by shape only (never values: reading a device tensor on the host would break
    CUDA-graph capture)."""
    if not torch.is_tensor(sample) or sample.dim() != 4 or sample.shape[1] != config.in_channels:
        got = tuple(sample.shape) if torch.is_tensor(sample) else type(sample).__name__
        raise ValueError(f"sample must be a (B, {config.in_channels}, H, W) tensor, got {got}")
    cross = config.cross_attention_dim if isinstance(config.cross_attention_dim, int) else None
    if not torch.is_tensor(encoder_hidden_states) or encoder_hidden_states.dim() != 3 or (
            cross is not None and encoder_hidden_states.shape[-1] != cross):
        got = tuple(encoder_hidden_states.shape) if torch.is_tensor(encoder_hidden_states) else \
            type(encoder_hidden_states).__name__
        raise ValueError(f"encoder_hidden_states must be a (B, L, {cross or 'cross_attention_dim'}) tensor, "
                         f"got {got}")
    if encoder_hidden_states.shape[0] != sample.shape[0]:
        raise ValueError(f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]} but sample has "
                         f"batch {sample.shape[0]}")


def _split_context(encoder_hidden_states):
    """(text hidden states, IP-Adapter image tokens or None, their masks or None) from what a UNet or ControlNet was
    given: the text, or (text, [tokens per adapter]) or (text, [tokens per adapter], [mask or None per adapter])."""
    if isinstance(encoder_hidden_states, tuple) and len(encoder_hidden_states) in (2, 3) and isinstance(
            encoder_hidden_states[1], (list, tuple)):
        text, tokens, *masks = encoder_hidden_states
        return text, tokens, masks[0] if masks else None
    return encoder_hidden_states, None, None


def _intrablock_list(residuals):
    """down_intrablock_additional_residuals as a fresh list (the forward consumes it), checked to be tensors."""
    if residuals is None:
        return []
    if not isinstance(residuals, (list, tuple)) or not all(torch.is_tensor(r) for r in residuals):
        raise TypeError("down_intrablock_additional_residuals must be a list of tensors (a T2I-Adapter's feature "
                        f"maps), got {type(residuals).__name__}")
    return list(residuals)


def _fitted(residual, shape):
    """A T2I-Adapter feature map checked against the hidden states it is added to (no silent broadcast)."""
    if residual.shape != shape:
        raise ValueError(f"down_intrablock_additional_residuals: a feature map of shape {tuple(residual.shape)} where "
                         f"the UNet's hidden states are {tuple(shape)}: an adapter for another UNet or image size?")
    return residual


class DownBlock(nn.Module):
    def __init__(self, kind, in_ch, out_ch, temb, layers, groups, eps, downsample, pad, heads=None, depth=1,
                 cross_dim=None, linear=False, upcast=False, only_cross=False):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb, groups, eps) for i in range(layers))
        if kind == "CrossAttnDownBlock2D":
            self.attentions = nn.ModuleList(
                Transformer2DModel(heads, out_ch // heads, out_ch, depth, cross_dim, groups, linear, upcast, only_cross)
                for _ in range(layers))
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, pad)]) if downsample else None

    def forward(self, h, temb, context, residual=None):
        """``residual``: a T2I-Adapter's feature map, added as diffusers adds it: after the last resnet and attention
        pair in a block with attention; at the very end (after the downsampler) in one without, where diffusers'
        in-place add also changes the last skip state, which is the same tensor there."""
        states = ()
        attentions = getattr(self, "attentions", None)
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if attentions is not None:
                h = attentions[i](h, context)
                if residual is not None and i == len(self.resnets) - 1:
                    h = h + _fitted(residual, h.shape)
            states += (h,)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            states += (h,)
        if attentions is None and residual is not None:
            h = h + _fitted(residual, h.shape)
            states = states[:-1] + (h,)
        return h, states


class UpBlock(nn.Module):
    def __init__(self, kind, in_ch, out_ch, prev_ch, temb, layers, groups, eps, upsample, heads=None, depth=1,
                 cross_dim=None, linear=False, upcast=False, only_cross=False):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_ch if i == 0 else out_ch) + (in_ch if i == layers - 1 else out_ch), out_ch, temb,
                          groups, eps) for i in range(layers))
        if kind == "CrossAttnUpBlock2D":
            self.attentions = nn.ModuleList(
                Transformer2DModel(heads, out_ch // heads, out_ch, depth, cross_dim, groups, linear, upcast, only_cross)
                for _ in range(layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, h, skips, temb, context, upsample_size=None, stage=None):
        attentions = getattr(self, "attentions", None)
        freeu = freeu_factors(self)  # (enable_freeu's; ``stage``: this block's index among the up blocks)
        for i, resnet in enumerate(self.resnets):
            skip = skips[-1 - i]
            if freeu is not None:
                h, skip = apply_freeu(stage, h, skip, freeu)
            h = resnet(torch.cat([h, skip], dim=1), temb)
            if attentions is not None:
                h = attentions[i](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h


class MidBlock(nn.Module):
    def __init__(self, ch, temb, groups, eps, heads, depth, cross_dim, linear, upcast, scale):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, temb, groups, eps, scale) for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2DModel(heads, ch // heads, ch, depth, cross_dim, groups, linear, upcast)])

    def forward(self, h, temb, context):
        h = self.resnets[0](h, temb)
        return self.resnets[1](self.attentions[0](h, context), temb)


class UNet2DConditionModel(loading.PretrainedMixin, nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        c = self.config = loading.make_config("UNet2DConditionModel", DEFAULTS, UNSUPPORTED, config)
        for field, value, allowed in (("mid_block_type", c.mid_block_type, ("UNetMidBlock2DCrossAttn",)),
                                      ("act_fn", c.act_fn, ("silu",)),
                                      ("addition_embed_type", c.addition_embed_type, (None, "text_time")),
                                      # (a class embedding: a table of num_class_embeds vectors, e.g. the x4
                                      # upscaler's noise levels; diffusers' other kinds are not built)
                                      ("class_embed_type", c.class_embed_type, (None,))):
            if value not in allowed:
                raise ValueError(f"UNet2DConditionModel: config field {field}={value!r} is not supported ({allowed})")
        if c.num_class_embeds is not None and (isinstance(c.num_class_embeds, bool) or not isinstance(
                c.num_class_embeds, int) or c.num_class_embeds <= 0):
            raise ValueError(f"UNet2DConditionModel: config field num_class_embeds must be a positive int or None, "
                             f"got {c.num_class_embeds!r}")
        if c.time_cond_proj_dim is not None and (isinstance(c.time_cond_proj_dim, bool) or not isinstance(
                c.time_cond_proj_dim, int) or c.time_cond_proj_dim < 4):
            raise ValueError(f"UNet2DConditionModel: config field time_cond_proj_dim (an LCM-distilled model's "
                             f"guidance-scale embedding width) must be an int >= 4, got {c.time_cond_proj_dim!r}")
        if c.addition_embed_type == "text_time":
            for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if not isinstance(c[field], int) or c[field] <= 0:
                    raise ValueError(f"UNet2DConditionModel: addition_embed_type='text_time' needs config field "
                                     f"{field} (a positive int), got {c[field]!r}")
        for kind in c.down_block_types:
            if kind not in DOWN_BLOCKS:
                raise ValueError(f"UNet2DConditionModel: unknown down block type {kind!r} (supported: {DOWN_BLOCKS})")
        for kind in c.up_block_types:
            if kind not in UP_BLOCKS:
                raise ValueError(f"UNet2DConditionModel: unknown up block type {kind!r} (supported: {UP_BLOCKS})")
        chans, n = list(c.block_out_channels), len(c.block_out_channels)
        heads = _per_block(c.num_attention_heads or c.attention_head_dim, n, "attention heads")  # legacy name
        layers = _per_block(c.layers_per_block, n, "layers_per_block")
        depth = _per_block(c.transformer_layers_per_block, n, "transformer_layers_per_block")
        if not all(isinstance(d, int) and d > 0 for d in depth):  # diffusers also allows per-layer nested lists
            raise ValueError(f"UNet2DConditionModel: config field transformer_layers_per_block="
                             f"{c.transformer_layers_per_block!r} is not supported (an int or one int per block)")
        cross = _per_block(c.cross_attention_dim, n, "cross_attention_dim")
        # only_cross_attention: the blocks whose transformers' first attention also attends to the text (the x4
        # upscaler's high-resolution blocks: no self-attention over their many tokens)
        only_cross = [bool(f) for f in _per_block(c.only_cross_attention, n, "only_cross_attention")]
        groups, eps, temb = c.norm_num_groups, c.norm_eps, chans[0] * 4
        kin, kout = c.conv_in_kernel, c.conv_out_kernel

        self.conv_in = nn.Conv2d(c.in_channels, chans[0], kin, padding=(kin - 1) // 2)
        self.time_embedding = TimestepEmbedding(chans[0], temb, c.time_cond_proj_dim)
        self.encoder_hid_proj = None  # IP-Adapters' image projections, once loaded (models/ip_adapter.py)
        if c.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb)
        self.class_embedding = nn.Embedding(c.num_class_embeds, temb) if c.num_class_embeds else None
        self.down_blocks = nn.ModuleList(
            DownBlock(kind, chans[max(i - 1, 0)], chans[i], temb, layers[i], groups, eps, i < n - 1,
                      c.downsample_padding, heads[i], depth[i], cross[i], c.use_linear_projection, c.upcast_attention,
                      only_cross[i])
            for i, kind in enumerate(c.down_block_types))
        self.mid_block = MidBlock(chans[-1], temb, groups, eps, heads[-1], depth[-1], cross[-1],
                                  c.use_linear_projection, c.upcast_attention, c.mid_block_scale_factor)
        rchans, rheads, rlayers, rdepth, rcross, ronly = (list(reversed(v)) for v in (chans, heads, layers, depth,
                                                                                      cross, only_cross))
        self.up_blocks = nn.ModuleList(
            UpBlock(kind, rchans[min(i + 1, n - 1)], rchans[i], rchans[max(i - 1, 0)], temb, rlayers[i] + 1, groups,
                    eps, i < n - 1, rheads[i], rdepth[i], rcross[i], c.use_linear_projection, c.upcast_attention,
                    ronly[i])
            for i, kind in enumerate(c.up_block_types))
        self.conv_norm_out = GroupNorm(groups, chans[0], eps, silu=True)  # + conv_act (SiLU), fused
        self.conv_out = nn.Conv2d(chans[0], c.out_channels, kout, padding=(kout - 1) // 2)

    def _context(self, sample, text, image_tokens, image_masks, added_cond_kwargs):
        """What the cross-attentions attend to: the text, and with IP-Adapters loaded each adapter's image tokens."""
        if self.encoder_hid_proj is None:
            if image_tokens is not None:
                raise ValueError("encoder_hidden_states holds IP-Adapter image tokens, but no IP-Adapter is loaded")
            return text
        if image_tokens is None:
            embeds = (added_cond_kwargs or {}).get("image_embeds")
            if embeds is None:
                raise ValueError("an IP-Adapter is loaded: pass its image embeddings as added_cond_kwargs="
                                 "{'image_embeds': [...]} (one tensor per adapter), or unload it")
            image_tokens = self.encoder_hid_proj(embeds)
        for i, tokens in enumerate(image_tokens):
            if not torch.is_tensor(tokens) or tokens.dim() != 3 or tokens.shape[0] != sample.shape[0]:
                got = tuple(tokens.shape) if torch.is_tensor(tokens) else type(tokens).__name__
                raise ValueError(f"IP-Adapter image tokens [{i}] must be a ({sample.shape[0]}, T, D) tensor (the "
                                 f"sample's batch), got {got}")
        if image_masks is not None and len(image_masks) != len(image_tokens):
            raise ValueError(f"{len(image_masks)} IP-Adapter masks for {len(image_tokens)} adapters")
        return text, list(image_tokens), image_masks

    def fuse_qkv_projections(self):
        """One q/k/v GEMM per self-attention (weights concatenated into non-persistent buffers; names unchanged).
        Call again after loading new weights (a pipeline's load_lora_weights refreshes it), or call
        unfuse_qkv_projections()."""
        return fuse_qkv_projections(self, True)

    def unfuse_qkv_projections(self):
        return fuse_qkv_projections(self, False)

    def enable_freeu(self, s1, s2, b1, b2):
        """FreeU (``models.freeu``) with diffusers' factors: s1, s2 scale the skips' low frequencies in the first two
        up stages, b1, b2 their backbone's first half of channels (e.g. SD1.5's s1=0.9, s2=0.2, b1=1.5, b2=1.6)."""
        for name, value in zip(FREEU_FACTORS, (s1, s2, b1, b2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"enable_freeu: {name} must be a finite number, got {value!r}")
        for block in self.up_blocks:
            for name, value in zip(FREEU_FACTORS, (s1, s2, b1, b2)):
                setattr(block, name, float(value))

    def disable_freeu(self):
        for block in self.up_blocks:
            for name in FREEU_FACTORS:
                setattr(block, name, None)

    def intrablock_shapes(self):
        """Where T2I-Adapter feature maps go, in order, as diffusers adds them: [(channels, downscale from the
        latents)] of each down block (a block with attention inside it, before its downsampler; one without, after
        it), then the mid block's output (taken only by a map of its shape)."""
        shapes, scale = [], 1
        for block, width in zip(self.down_blocks, self.config.block_out_channels):
            down = 2 if block.downsamplers is not None else 1
            shapes.append((width, scale if hasattr(block, "attentions") else scale * down))
            scale *= down
        return shapes + [(self.config.block_out_channels[-1], scale)]

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, timestep_cond=None, class_labels=None):
        """The noise (or v) prediction for ``sample`` at ``timestep``, conditioned on ``encoder_hidden_states``; a
        ControlNet's residuals, as diffusers takes them, are added to the skip connections and the mid block's output;
        a T2I-Adapter's feature maps (``down_intrablock_additional_residuals``) inside the down blocks and, when one
        is left of its shape, to the mid block's output (``intrablock_shapes``).
        With IP-Adapters loaded, ``added_cond_kwargs["image_embeds"]`` (one tensor per adapter, as diffusers takes
        them) are projected here, or ``encoder_hidden_states`` is (text, [projected image tokens per adapter]).
        An LCM-distilled UNet (``time_cond_proj_dim``) takes its guidance-scale embedding as ``timestep_cond``
        ((B, time_cond_proj_dim), ``layers.guidance_scale_embedding``); without it, none is added, as in diffusers.
        A UNet with a class embedding (``num_class_embeds``: the x4 upscaler's noise levels) takes ``class_labels``."""
        c = self.config
        encoder_hidden_states, image_tokens, image_masks = _split_context(encoder_hidden_states)
        check_inputs(c, sample, encoder_hidden_states)
        context = self._context(sample, encoder_hidden_states, image_tokens, image_masks, added_cond_kwargs)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = embed_time(self, sample, timestep, added_cond_kwargs, timestep_cond, class_labels)

        h = self.conv_in(sample)
        skips = (h,)
        intrablock = _intrablock_list(down_intrablock_additional_residuals)
        for block in self.down_blocks:
            h, states = block(h, emb, context, intrablock.pop(0) if intrablock else None)
            skips += states
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} tensors "
                                 f"but this UNet has {len(skips)} skip connections (a ControlNet of another shape?)")
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))
        h = self.mid_block(h, emb, context)
        if intrablock and intrablock[0].shape == h.shape:  # (SDXL's adapter)
            h = h + intrablock.pop(0)
        if intrablock:
            raise ValueError(f"down_intrablock_additional_residuals: {len(intrablock)} feature maps left over (shapes "
                             f"{[tuple(r.shape) for r in intrablock]}): an adapter for another UNet?")
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        # Odd latent sizes: upsample to the skip's size instead of exactly 2x (diffusers' forward_upsample_size).
        factor = 2 ** (len(self.up_blocks) - 1)
        odd = any(s % factor != 0 for s in sample.shape[-2:])
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if odd and i < len(self.up_blocks) - 1 else None
            h = block(h, block_skips, emb, context, size, stage=i)
        return self.conv_out(self.conv_norm_out(h))
