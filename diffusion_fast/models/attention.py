"""Attention blocks: multi-head attention on our flash-attention op, the transformer block and Transformer2DModel.

q, k and v reach ``ops._attention`` (``ops.attention`` without the Python re-checks) as (B, H, L, D) views of the
projection outputs (view + transpose, no copy): the Triton kernel takes any strides with a unit last stride.
Parameter names are diffusers' (to_q, to_k, to_v, to_out.0, norm1..3, ff.net.0.proj, ff.net.2, proj_in, proj_out).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .layers import GroupNorm


class Attention(nn.Module):
    """Multi-head (self or cross) attention; ``upcast`` computes the attention itself in fp32 (SD 2.x)."""

    def __init__(self, query_dim, heads, dim_head, cross_attention_dim=None, bias=False, upcast=False,
                 group_norm: GroupNorm | None = None, residual_connection=False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.upcast = heads, dim_head, upcast
        self.scale = dim_head**-0.5
        self.group_norm = group_norm
        self.residual_connection = residual_connection
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])
        self.is_cross = cross_attention_dim is not None
        # perturbed-attention guidance (pipeline_pag.py): for the batch's last ``perturbed_rows`` samples a
        # self-attention's map is the identity, so their output is their values (diffusers' PAG identity processors)
        self.perturbed_rows = 0
        self.processor = None  # IP-Adapter image keys/values (models/ip_adapter.py), diffusers' name for them
        # Optional fused q/k/v projection for self-attention (one GEMM instead of three). Non-persistent buffers:
        # state_dict keeps diffusers' names; built by fuse_qkv() from the current weights, dropped by unfuse_qkv().
        self.register_buffer("fused_qkv_weight", None, persistent=False)
        self.register_buffer("fused_qkv_bias", None, persistent=False)

    def set_processor(self, processor):
        """Attach (or with None, remove) IP-Adapter image keys/values, as diffusers' set_processor swaps them in."""
        self.processor = processor

    @torch.no_grad()
    def fuse_qkv(self):
        """Concatenate to_q/to_k/to_v into one projection (self-attention only; call again after changing weights)."""
        if self.is_cross:
            return
        projections = (self.to_q, self.to_k, self.to_v)
        for name in ("weight", "bias"):
            fused = None if getattr(self.to_q, name) is None else torch.cat([getattr(p, name) for p in projections])
            current = getattr(self, f"fused_qkv_{name}")
            if fused is not None and current is not None and current.shape == fused.shape and (
                    current.dtype, current.device) == (fused.dtype, fused.device):
                current.copy_(fused)  # in place: a captured CUDA graph reads the buffer by address
            else:
                setattr(self, f"fused_qkv_{name}", fused)

    def unfuse_qkv(self):
        self.fused_qkv_weight = self.fused_qkv_bias = None

    def _heads(self, x):
        b, length, _ = x.shape
        return x.view(b, length, self.heads, self.dim_head).transpose(1, 2)  # (B, H, L, D) view, no copy

    def _attend(self, q, k, v):
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            return ops._attention(q.float(), k.float(), v.float(), self.scale).to(q.dtype)
        return ops._attention(q, k, v, self.scale)

    def forward(self, hidden_states, encoder_hidden_states=None):
        """``encoder_hidden_states``: the text's hidden states, or (text, [image tokens per IP-Adapter], [mask or None
        per IP-Adapter]) as the UNet passes them with IP-Adapters loaded (a cross-attention without them attends to
        the text alone)."""
        image_tokens = image_masks = None
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, image_tokens, image_masks = encoder_hidden_states
        residual = hidden_states
        spatial = hidden_states.dim() == 4
        if spatial:  # the VAE's attention: (B, C, H, W) in, GroupNorm over channels, tokens = pixels
            b, c, h, w = hidden_states.shape
            if self.group_norm is not None:
                hidden_states = self.group_norm(hidden_states)
            hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.fused_qkv_weight is not None and encoder_hidden_states is None:
            qkv = F.linear(hidden_states, self.fused_qkv_weight, self.fused_qkv_bias)  # (B, L, 3 * H * D)
            qkv = qkv.view(qkv.shape[0], qkv.shape[1], 3, self.heads, self.dim_head)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) views, unit last stride
        else:
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            q, k, v = self._heads(self.to_q(hidden_states)), self._heads(self.to_k(context)), self._heads(self.to_v(context))
        n = self.perturbed_rows
        out = torch.cat([self._attend(q[:-n], k[:-n], v[:-n]), v[-n:]]) if n else self._attend(q, k, v)
        if image_tokens is not None and self.processor is not None:
            out = self.processor.add_image_attention(self, q, out, image_tokens, image_masks)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, self.heads * self.dim_head)
        out = self.to_out[0](out)
        if spatial:
            out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return residual + out if self.residual_connection else out


def fuse_qkv_projections(model: nn.Module, fuse: bool = True) -> nn.Module:
    """Fuse (or unfuse) the q/k/v projections of every self-attention in ``model``; state_dict names are unchanged."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fuse_qkv() if fuse else module.unfuse_qkv()
    return model


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """LayerNorm -> self-attention -> LayerNorm -> cross-attention -> LayerNorm -> GEGLU feed-forward, residuals.
    ``only_cross``: the first attention attends to the text too (diffusers' only_cross_attention), not to itself."""

    def __init__(self, dim, heads, dim_head, cross_attention_dim, upcast=False, only_cross=False):
        super().__init__()
        self.only_cross = only_cross
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, cross_attention_dim if only_cross else None, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim=cross_attention_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x), context if self.only_cross else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """GroupNorm -> project in -> transformer blocks on H*W tokens -> project out, plus the input."""

    def __init__(self, heads, dim_head, in_channels, num_layers, cross_attention_dim, groups, use_linear_projection,
                 upcast=False, only_cross=False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(groups, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear_projection else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, upcast, only_cross)
            for _ in range(num_layers)
        )
        self.proj_out = nn.Linear(inner, in_channels) if use_linear_projection else nn.Conv2d(inner, in_channels, 1)

    def forward(self, x, context):
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear_projection:
            x = self.proj_in(x)
        inner = x.shape[1]
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, inner)  # a free view when x is channels_last
        if self.use_linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear_projection:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # channels_last strides, no copy
        if not self.use_linear_projection:
            x = self.proj_out(x)
        return residual + x  # residual first: the sum takes its memory layout (NCHW model stays NCHW)
