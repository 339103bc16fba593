"""SD3ControlNetModel (diffusers' ControlNet for Stable Diffusion 3 / 3.5) with diffusers' parameter names.

A copy of the transformer's first blocks that sees the latents plus the control image's latents (VAE-encoded by the
pipeline) through a zero-initialised patch projection (``pos_embed_input``), and returns, per block, a linear map of
its image stream (``controlnet_blocks``) times the conditioning scale: the residuals the transformer adds after its
blocks (``block_controlnet_hidden_states``). Two kinds, as diffusers has them: InstantX's SD3 nets (joint blocks
with the text, their own patch embedding) and SD3.5 Large's (``joint_attention_dim`` None: image-only blocks, no
text; ``use_pos_embed`` False: the pipeline gives them the transformer's patch embedding). Attention is our op.
"""
from __future__ import annotations

import torch
from torch import nn

from . import loading
from .controlnet import NetList
from .sd3_transformer import (AdaNorm, FeedForward, JointAttention, JointTransformerBlock, PatchEmbed,
                              TimeTextEmbedding, _layer_norm, _modulate, check_inputs)
from .time_conditioning import broadcast_timestep

DEFAULTS = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=18, attention_head_dim=64, num_attention_heads=18,
    joint_attention_dim=4096, caption_projection_dim=1152, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=96, extra_conditioning_channels=0, dual_attention_layers=(), qk_norm=None,
    pos_embed_type="sincos", use_pos_embed=True, force_zeros_for_pooled_projection=True,
)


class SingleTransformerBlock(nn.Module):
    """An image-only block (diffusers' SD3SingleTransformerBlock, SD3.5 Large's ControlNets): adaLN-Zero, self-
    attention, a tanh-GELU feed-forward."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.norm1 = AdaNorm(dim, 6)
        self.attn = JointAttention(dim, heads, dim_head, qk_norm=None, joint=False)
        self.ff = FeedForward(dim)

    def forward(self, x, temb):
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        x = x + gate_msa.unsqueeze(1) * self.attn(normed)
        return x + gate_mlp.unsqueeze(1) * self.ff(_modulate(_layer_norm(x), shift_mlp, scale_mlp))


class PatchProjection(nn.Module):
    """Patches through a strided conv, no position table (diffusers' PatchEmbed with pos_embed_type=None)."""

    def __init__(self, in_channels, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class SD3ControlNetModel(loading.PretrainedMixin, nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        c = self.config = loading.make_config("SD3ControlNetModel", DEFAULTS, {}, config)
        for field in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                      "num_attention_heads", "pooled_projection_dim", "pos_embed_max_size"):
            if isinstance(c[field], bool) or not isinstance(c[field], int) or c[field] <= 0:
                raise ValueError(f"SD3ControlNetModel: config field {field} must be a positive int, got {c[field]!r}")
        if c.use_pos_embed and c.pos_embed_type != "sincos":
            raise ValueError(f"SD3ControlNetModel: config field pos_embed_type={c.pos_embed_type!r} is not supported "
                             "with use_pos_embed (supported: 'sincos')")
        if c.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"SD3ControlNetModel: config field qk_norm={c.qk_norm!r} is not supported (None or "
                             "'rms_norm')")
        dim = c.num_attention_heads * c.attention_head_dim
        # (SD3.5 Large's nets: None here, the transformer's own set by the pipeline, as diffusers' does)
        self.pos_embed = PatchEmbed(c.in_channels, dim, c.patch_size, c.pos_embed_max_size) if c.use_pos_embed \
            else None
        self.time_text_embed = TimeTextEmbedding(dim, c.pooled_projection_dim)
        if c.joint_attention_dim is not None:
            self.context_embedder = nn.Linear(c.joint_attention_dim, c.caption_projection_dim)
            dual = set(c.dual_attention_layers or ())
            self.transformer_blocks = nn.ModuleList(
                JointTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim, False, c.qk_norm, i in dual)
                for i in range(c.num_layers))
        else:
            self.context_embedder = None
            self.transformer_blocks = nn.ModuleList(
                SingleTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim) for _ in range(c.num_layers))
        self.controlnet_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(c.num_layers))
        self.pos_embed_input = PatchProjection(c.in_channels + c.extra_conditioning_channels, dim, c.patch_size)

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None, subfolder=None, variant=None):
        """A diffusers folder, strictly; a net without its own patch embedding (``use_pos_embed`` False) that
        diffusers' pipeline saved carries the copy of the transformer's that pipeline gave it (``pos_embed.*``):
        those three tensors are left out, since our pipeline shares the transformer's own."""
        own = loading.read_config(folder, subfolder).get("use_pos_embed", True)
        copied = ("pos_embed.pos_embed", "pos_embed.proj.weight", "pos_embed.proj.bias")

        def convert(state):
            return state if own else {k: v for k, v in state.items() if k not in copied}

        return loading.from_pretrained(cls, folder, dtype, device, subfolder, variant, convert=convert)

    def forward(self, hidden_states, controlnet_cond, conditioning_scale=1.0, encoder_hidden_states=None,
                pooled_projections=None, timestep=None):
        """Each block's residual, times ``conditioning_scale``: a list of (B, tokens, width) tensors (diffusers'
        output's ``controlnet_block_samples``). ``hidden_states``: the (B, C, H, W) latents; ``controlnet_cond``: the
        control image's latents, (B, C + extra_conditioning_channels, H, W)."""
        c = self.config
        if self.pos_embed is None:
            raise ValueError("this SD3 ControlNet (use_pos_embed=False, SD3.5 Large's) patches the latents with the "
                             "transformer's patch embedding: set controlnet.pos_embed = transformer.pos_embed (our "
                             "SD3 ControlNet pipeline does)")
        if (encoder_hidden_states is None) != (self.context_embedder is None):
            raise ValueError("encoder_hidden_states: " + (
                "this ControlNet's blocks attend to the text: give the prompt embeddings"
                if self.context_embedder is not None else
                "this ControlNet (joint_attention_dim None) has image-only blocks: give None"))
        check_inputs(c, hidden_states, encoder_hidden_states, pooled_projections)
        want = (hidden_states.shape[0], c.in_channels + c.extra_conditioning_channels, *hidden_states.shape[2:])
        if not torch.is_tensor(controlnet_cond) or tuple(controlnet_cond.shape) != want:
            got = tuple(controlnet_cond.shape) if torch.is_tensor(controlnet_cond) else type(controlnet_cond).__name__
            raise ValueError(f"controlnet_cond must be a {want} tensor (the control latents, hidden_states' batch and "
                             f"size), got {got}")
        if isinstance(conditioning_scale, bool) or not isinstance(conditioning_scale, (int, float)):
            raise TypeError(f"conditioning_scale must be a number, got {type(conditioning_scale).__name__}")
        x = self.pos_embed(hidden_states)
        temb = self.time_text_embed(broadcast_timestep(timestep, hidden_states), pooled_projections)
        context = self.context_embedder(encoder_hidden_states) if self.context_embedder is not None else None
        x = x + self.pos_embed_input(controlnet_cond)
        residuals = []
        for block, out in zip(self.transformer_blocks, self.controlnet_blocks):
            if context is not None:
                context, x = block(x, context, temb)
            else:
                x = block(x, temb)
            residuals.append(out(x) * conditioning_scale)
        return residuals


class SD3MultiControlNetModel(NetList):
    """Several SD3 ControlNets whose residuals add up (diffusers' SD3MultiControlNetModel): one control image's
    latents and one scale per net."""
    net_class = SD3ControlNetModel

    def forward(self, hidden_states, controlnet_cond, conditioning_scale, pooled_projections,
                encoder_hidden_states=None, timestep=None):
        self._check_per_net(controlnet_cond, conditioning_scale)
        total = None
        for net, cond, scale in zip(self.nets, controlnet_cond, conditioning_scale):
            residuals = net(hidden_states, cond, scale, encoder_hidden_states, pooled_projections, timestep)
            total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
        return total
