"""SD3 IP-Adapters (InstantX's SD3.5-Large-IP-Adapter; diffusers' SD3IPAdapterMixin): the time-conditioned image
projection and each joint block's image attention, with diffusers' parameter names.

The image's SigLIP features (B, N, embed_dim) go through a resampler conditioned on the timestep
(``TimeImageProjection``, diffusers' IPAdapterTimeImageProjection): learned queries attend to the features and to
themselves in ``depth`` blocks, each modulated by the timestep's embedding (adaLN), then are projected to the
transformer's width. Every joint block then lets its image queries attend once more, to their own keys and the
image tokens' (``IPJointAttention``, diffusers' SD3IPAdapterJointAttnProcessor2_0: the tokens LayerNorm-modulated by
the same timestep embedding, RMSNorm on queries and keys of its own) and adds that times the adapter's scale (0.5 by
default) to the image stream's attention output. ``attach`` builds both from an adapter's state dict (InstantX's key
names or diffusers'), every weight checked before the transformer changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .ip_adapter import GeluFeedForward
from .layers import TimestepEmbedding, timestep_embedding
from .loading import state_problems


class _ResamplerAttention(nn.Module):
    """Queries from the latents; keys and values from the image features and the latents at once (one fused to_kv)."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(heads * dim_head, dim, bias=False), nn.Dropout(0.0)])

    def forward(self, latents, features):
        b = latents.shape[0]
        q = self.to_q(latents).view(b, -1, self.heads, self.dim_head).transpose(1, 2)
        k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2)
                for t in self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1))
        out = ops._attention(q, k, v, self.dim_head**-0.5)  # (diffusers scales q and k by dim_head**-0.25 each)
        return self.to_out[0](out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head))


class _ResamplerBlock(nn.Module):
    """diffusers' IPAdapterTimeImageProjectionBlock: adaLN-modulated attention and feed-forward on the latents."""

    def __init__(self, dim, heads, dim_head, ffn_ratio):
        super().__init__()
        self.ln0, self.ln1, self.adaln_norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _ResamplerAttention(dim, heads, dim_head)
        self.ff = GeluFeedForward(dim, ffn_ratio)
        self.adaln_proj = nn.Linear(dim, 4 * dim)

    def forward(self, features, latents, temb):
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaln_proj(F.silu(temb)).chunk(4, dim=1)
        modulated = self.ln1(latents) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        latents = latents + self.attn(modulated, self.ln0(features))
        return latents + self.ff(self.adaln_norm(latents) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])


class TimeImageProjection(nn.Module):
    """diffusers' IPAdapterTimeImageProjection: (B, N, embed_dim) image features and (B,) timesteps -> (B,
    num_queries, output_dim) image tokens and the (B, hidden_dim) timestep embedding the blocks' image attention
    is modulated by."""

    def __init__(self, embed_dim, output_dim, hidden_dim, heads, num_queries, timestep_in_dim, depth=4, dim_head=64,
                 ffn_ratio=4):
        super().__init__()
        self.timestep_in_dim = timestep_in_dim
        self.latents = nn.Parameter(torch.zeros(1, num_queries, hidden_dim))
        self.proj_in = nn.Linear(embed_dim, hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(_ResamplerBlock(hidden_dim, heads, dim_head, ffn_ratio) for _ in range(depth))
        self.time_embedding = TimestepEmbedding(timestep_in_dim, hidden_dim)

    def forward(self, features, timestep):
        temb = timestep_embedding(timestep, self.timestep_in_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        temb = self.time_embedding(temb.to(features.dtype))
        x = self.proj_in(features) + temb[:, None]
        latents = self.latents.repeat(features.shape[0], 1, 1)
        for block in self.layers:
            latents = block(x, latents, temb)
        return self.norm_out(self.proj_out(latents)), temb


class IPJointAttention(nn.Module):
    """One joint block's image attention (diffusers' SD3IPAdapterJointAttnProcessor2_0's weights): the block's image
    queries over their own keys and the image tokens', returned (B, Li, H * D) for the block to add at ``scale``."""

    def __init__(self, hidden_size, ip_dim, head_dim, temb_dim, scale=0.5):
        from .sd3_transformer import RMSNorm

        super().__init__()
        self.head_dim, self.scale = head_dim, scale
        self.norm_ip = nn.Module()
        self.norm_ip.linear = nn.Linear(temb_dim, 2 * ip_dim)
        self.to_k_ip = nn.Linear(ip_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(ip_dim, hidden_size, bias=False)
        self.norm_q, self.norm_k, self.norm_ip_k = RMSNorm(head_dim), RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, q, k, v, tokens, temb):
        """``q``, ``k``, ``v``: the block's image queries, keys (both before its own norms) and values, (B, Li, H,
        D); ``tokens``: (B, Lip, ip_dim); ``temb``: (B, temb_dim)."""
        b, _, heads, d = q.shape
        shift, scale = self.norm_ip.linear(F.silu(temb)).chunk(2, dim=1)
        tokens = F.layer_norm(tokens, (tokens.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        ip_k = self.norm_ip_k(self.to_k_ip(tokens).view(b, -1, heads, d))
        ip_v = self.to_v_ip(tokens).view(b, -1, heads, d)
        keys, values = torch.cat([self.norm_k(k), ip_k], dim=1), torch.cat([v, ip_v], dim=1)
        out = ops._attention(self.norm_q(q).transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), d**-0.5)
        return out.transpose(1, 2).reshape(b, -1, heads * d)


_INSTANTX_NAMES = (("0.norm1", "ln0"), ("0.norm2", "ln1"), ("0.to_q", "attn.to_q"), ("0.to_kv", "attn.to_kv"),
                   ("0.to_out", "attn.to_out.0"), ("1.0", "adaln_norm"), ("1.1", "ff.net.0.proj"),
                   ("1.3", "ff.net.2"), ("2.1", "adaln_proj"))


def _projection_state(state):
    """The image projection's weights under diffusers' names (InstantX's "layers.i.0.norm1" ... renamed)."""
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "layers" and len(parts) > 3:
            rest = ".".join(parts[2:])
            for old, new in _INSTANTX_NAMES:
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            key = f"layers.{parts[1]}.{rest}"
        renamed[key] = value
    return renamed


def attach(transformer, state):
    """Build an SD3 IP-Adapter from ``state`` ({"image_proj": ..., "ip_adapter": {"i.norm_ip.linear.weight", ...}})
    on ``transformer``: ``transformer.image_proj`` and each joint attention's ``ip_adapter``, on its device and in its
    dtype. The shapes come from the weights (as diffusers reads them); missing, unexpected or mis-shaped weights are
    one error listing them all, raised before the transformer changes."""
    c = transformer.config
    if c.dual_attention_layers:
        raise ValueError("SD3 IP-Adapters (InstantX's, for SD3.5 Large) attach to a transformer without SD3.5 "
                         "Medium's second attention; this one has dual_attention_layers "
                         f"{tuple(c.dual_attention_layers)}")
    proj_state = _projection_state(state["image_proj"])
    try:
        embed_dim = proj_state["proj_in.weight"].shape[1]
        hidden_dim = proj_state["proj_in.weight"].shape[0]
        output_dim = proj_state["proj_out.weight"].shape[0]
        heads = proj_state["layers.0.attn.to_q.weight"].shape[0] // 64
        num_queries = proj_state["latents"].shape[1]
        timestep_in_dim = proj_state["time_embedding.linear_1.weight"].shape[1]
        temb_dim = state["ip_adapter"]["0.norm_ip.linear.weight"].shape[1]
    except (KeyError, IndexError) as exc:
        raise ValueError(f"not an SD3 IP-Adapter state dict: {exc} is missing (InstantX's SD3.5-Large-IP-Adapter "
                         "holds image_proj.proj_in, .latents, .layers.*, .time_embedding.* and ip_adapter.0.norm_ip.* "
                         "...)") from None
    width = c.num_attention_heads * c.attention_head_dim
    with torch.device("meta"):
        projection = TimeImageProjection(embed_dim, output_dim, hidden_dim, heads, num_queries, timestep_in_dim)
        blocks = [IPJointAttention(width, width, c.attention_head_dim, temb_dim)
                  for _ in transformer.transformer_blocks]
    per_block = [{} for _ in blocks]
    unexpected = []
    for key, value in state["ip_adapter"].items():
        index, _, name = key.partition(".")
        if index.isdigit() and int(index) < len(blocks):
            per_block[int(index)][name] = value
        else:
            unexpected.append(f"ip_adapter.{key}")
    problems = [f"image_proj: {p}" for p in state_problems(projection, proj_state)]
    for i, (block, weights) in enumerate(zip(blocks, per_block)):
        problems += [f"ip_adapter.{i} (transformer_blocks.{i}): {p}" for p in state_problems(block, weights)]
    if unexpected:
        problems.append(f"ip_adapter: unexpected, no such joint block ({len(unexpected)}): "
                        f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if problems:
        raise ValueError("the SD3 IP-Adapter's weights do not fit this transformer:\n  " + "\n  ".join(problems))
    param = next(transformer.parameters())
    projection.load_state_dict(proj_state, strict=True, assign=True)
    transformer.image_proj = projection.to(device=param.device, dtype=param.dtype).eval()
    for module, weights, block in zip(blocks, per_block, transformer.transformer_blocks):
        module.load_state_dict(weights, strict=True, assign=True)
        block.attn.ip_adapter = module.to(device=param.device, dtype=param.dtype).eval()


def detach(transformer):
    transformer.image_proj = None
    for block in transformer.transformer_blocks:
        block.attn.ip_adapter = None
