"""SD3Transformer2DModel (Stable Diffusion 3 and 3.5's MMDiT) with diffusers' parameter names, on our attention op.

The latents are cut into patch_size x patch_size patches (a strided conv) plus a fixed 2-d sin-cos position table
cropped to the image's centre; the text's tokens are projected to the same width. Each joint block modulates both
streams by the time + pooled-text embedding (adaLN-Zero: shift, scale, gate), lets every image and text token attend
to all of them at once (one attention over the concatenated sequence, image tokens first, as diffusers orders them),
and runs a tanh-GELU feed-forward per stream. SD3.5 adds RMSNorm on each head's queries and keys (``qk_norm``) and,
in its Medium model, a second self-attention over the image tokens (``dual_attention_layers``). The last block
updates the image stream only. ``model(hidden_states, encoder_hidden_states, pooled_projections, timestep)`` returns
the velocity prediction tensor; nothing reads a device value on the host, so the forward can be captured in a CUDA
graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import loading
from .layers import TimestepEmbedding, timestep_embedding
from .time_conditioning import broadcast_timestep

DEFAULTS = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=18, attention_head_dim=64, num_attention_heads=18,
    joint_attention_dim=4096, caption_projection_dim=1152, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None,
)


def _layer_norm(x):
    """The blocks' LayerNorm: no affine parameters, eps 1e-6."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.Module):
    """Per-head RMSNorm of queries and keys (SD3.5's qk_norm), in fp32, as diffusers computes it."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class AdaNorm(nn.Module):
    """LayerNorm modulated by the conditioning: ``linear(silu(temb))`` split into ``chunks`` vectors (diffusers'
    AdaLayerNormZero: 6; SD35AdaLayerNormZeroX: 9; AdaLayerNormContinuous: 2, scale before shift)."""

    def __init__(self, dim, chunks):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, x, temb):
        emb = self.linear(F.silu(temb).to(x.dtype)).chunk(self.chunks, dim=1)
        normed = _layer_norm(x)
        if self.chunks == 2:  # (continuous: the final norm, and the last block's text stream)
            scale, shift = emb
            return _modulate(normed, shift, scale)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb[:6]
        out = (_modulate(normed, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp)
        if self.chunks == 9:  # (the second attention's input and gate)
            out += (_modulate(normed, emb[6], emb[7]), emb[8])
        return out


class FeedForward(nn.Module):
    """Linear -> tanh-GELU -> Linear, 4x wide (diffusers' FeedForward with activation_fn='gelu-approximate')."""

    def __init__(self, dim):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, 4 * dim)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class JointAttention(nn.Module):
    """Attention over the image tokens and (``joint``) the text tokens at once: each stream has its own q/k/v and
    output projections, the attention itself is one ``ops._attention`` over the concatenated sequence."""
    is_cross = False  # (a self-attention for perturbed-attention guidance, pipeline_sd3_pag.py: diffusers' rule)

    def __init__(self, dim, heads, dim_head, qk_norm, joint=True, context_out=True):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.norm_q = RMSNorm(dim_head) if qk_norm else None
        self.norm_k = RMSNorm(dim_head) if qk_norm else None
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.to_add_out = nn.Linear(inner, dim) if context_out else None
            self.norm_added_q = RMSNorm(dim_head) if qk_norm else None
            self.norm_added_k = RMSNorm(dim_head) if qk_norm else None
        # perturbed-attention guidance: the batch's last ``perturbed_rows`` samples attend as ``_perturbed`` says
        self.perturbed_rows = 0
        self.ip_adapter = None  # an SD3 IP-Adapter's image attention (ip_adapter_sd3.IPJointAttention), if loaded

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        """(B, L, H, D) queries, keys and values of one stream, queries and keys normed per head; and the queries
        and keys before the norms (an IP-Adapter's attention norms them its own way)."""
        b, length, _ = x.shape
        q, k, v = (proj(x).view(b, length, self.heads, self.dim_head) for proj in (to_q, to_k, to_v))
        return ((norm_q(q) if norm_q is not None else q), (norm_k(k) if norm_k is not None else k), v), (q, k)

    def _attend(self, q, k, v):
        """(B, Lq, H, D) from (B, L, H, D) queries, keys and values: every query over every key."""
        return ops._attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              self.dim_head**-0.5).transpose(1, 2)

    def _perturbed(self, image, text):
        """PAG's perturbed attention, as diffusers' PAG joint processors mask it: each image token attends to itself
        and to the text tokens only (no other image token), each text token to every token. ``image``, ``text``:
        (q, k, v) of each stream, (B, L, H, D); with no text stream (SD3.5 Medium's second attention) each image
        token's output is its own value (diffusers' identity self-attention). The image queries' scores over their
        own key and the text's keys are formed and softmaxed in fp32 at least (B x H x Li x (1 + Lt), never Li x
        Li); the text queries run the attention op."""
        q, k, v = image
        if text is None:
            return v
        cq, ck, cv = text
        scale, acc = self.dim_head**-0.5, torch.promote_types(q.dtype, torch.float32)
        own = (q.to(acc) * k.to(acc)).sum(-1, keepdim=True) * scale  # (B, Li, H, 1)
        to_text = torch.einsum("bihd,bjhd->bihj", q.to(acc), ck.to(acc)) * scale  # (B, Li, H, Lt)
        weights = torch.softmax(torch.cat([own, to_text], dim=-1), dim=-1)
        out = weights[..., :1] * v.to(acc) + torch.einsum("bihj,bjhd->bihd", weights[..., 1:], cv.to(acc))
        return torch.cat([out.to(v.dtype), self._attend(cq, torch.cat([k, ck], dim=1), torch.cat([v, cv], dim=1))],
                         dim=1)

    def forward(self, x, context=None, ip=None):
        """``ip``: an IP-Adapter's (image tokens, timestep embedding), which the loaded adapter's attention adds to
        the image stream at its scale."""
        image, (q_raw, k_raw) = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        text = None if context is None else self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                                      self.norm_added_q, self.norm_added_k)[0]
        streams = [image] if text is None else [image, text]
        b, n = x.shape[0], min(self.perturbed_rows, x.shape[0])
        outs = []
        if n < b:  # (the rows that attend as usual: all of them but under PAG)
            outs.append(self._attend(*(torch.cat([s[j][:b - n] for s in streams], dim=1) for j in range(3))))
        if n:
            outs.append(self._perturbed(tuple(t[b - n:] for t in image),
                                        None if text is None else tuple(t[b - n:] for t in text)))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        out = out.reshape(b, -1, self.heads * self.dim_head).to(image[0].dtype)
        image_out = out[:, :x.shape[1]]
        if ip is not None and self.ip_adapter is not None and self.ip_adapter.scale != 0:
            image_out = image_out + self.ip_adapter(q_raw, k_raw, image[2], *ip) * self.ip_adapter.scale
        image_out = self.to_out[0](image_out)
        if context is None:
            return image_out
        text_out = out[:, x.shape[1]:]
        return image_out, (self.to_add_out(text_out) if self.to_add_out is not None else text_out)


class JointTransformerBlock(nn.Module):
    """One MMDiT block (diffusers' JointTransformerBlock); ``context_pre_only``: the last block, whose text stream
    only feeds the attention."""

    def __init__(self, dim, heads, dim_head, context_pre_only, qk_norm, dual_attention):
        super().__init__()
        self.context_pre_only, self.dual_attention = context_pre_only, dual_attention
        self.norm1 = AdaNorm(dim, 9 if dual_attention else 6)
        self.norm1_context = AdaNorm(dim, 2 if context_pre_only else 6)
        self.attn = JointAttention(dim, heads, dim_head, qk_norm, context_out=not context_pre_only)
        self.attn2 = JointAttention(dim, heads, dim_head, qk_norm, joint=False) if dual_attention else None
        self.ff = FeedForward(dim)
        self.ff_context = None if context_pre_only else FeedForward(dim)

    def forward(self, x, context, temb, ip=None):
        if self.dual_attention:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp, normed2, gate_msa2 = self.norm1(x, temb)
        else:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        if self.context_pre_only:
            context_normed = self.norm1_context(context, temb)
        else:
            context_normed, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, temb)
        attn_out, context_attn_out = self.attn(normed, context_normed, ip)
        x = x + gate_msa.unsqueeze(1) * attn_out
        if self.dual_attention:
            x = x + gate_msa2.unsqueeze(1) * self.attn2(normed2)
        x = x + gate_mlp.unsqueeze(1) * self.ff(_modulate(_layer_norm(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return None, x
        context = context + c_gate_msa.unsqueeze(1) * context_attn_out
        ff = self.ff_context(_modulate(_layer_norm(context), c_shift_mlp, c_scale_mlp))
        return context + c_gate_mlp.unsqueeze(1) * ff, x


class PatchEmbed(nn.Module):
    """Patches (a strided conv) plus the checkpoint's sin-cos position table, cropped to the latent's centre."""

    def __init__(self, in_channels, dim, patch_size, max_size):
        super().__init__()
        self.patch_size, self.max_size = patch_size, max_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", torch.zeros(1, max_size * max_size, dim))

    def forward(self, latent):
        h, w = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"hidden_states: {h}x{w} patches exceed the position table's {self.max_size}x"
                             f"{self.max_size} (pos_embed_max_size): the image is too large for this model")
        x = self.proj(latent).flatten(2).transpose(1, 2)
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)[:, top:top + h, left:left + w, :]
        return (x + table.reshape(1, h * w, -1)).to(x.dtype)


class TimeTextEmbedding(nn.Module):
    """The timestep's sinusoidal embedding through an MLP plus the pooled text embedding through another (diffusers'
    CombinedTimestepTextProjEmbeddings)."""

    def __init__(self, dim, pooled_dim):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # (the same shape: linear_1, SiLU, linear_2)

    def forward(self, timestep, pooled):
        t = timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.timestep_embedder(t.to(pooled.dtype)) + self.text_embedder(pooled)


def check_inputs(c, hidden_states, encoder_hidden_states, pooled_projections):
    """A transformer's (or SD3 ControlNet's) inputs against its config ``c``, by shape only (no value is read on the
    host: the forward can be captured in a CUDA graph); no text to check where ``c.joint_attention_dim`` is None."""
    p = c.patch_size
    b = hidden_states.shape[0] if torch.is_tensor(hidden_states) else None
    for name, value, shape, what in (
            ("hidden_states", hidden_states, (None, c.in_channels, None, None),
             f"(B, {c.in_channels}, H, W) tensor, H and W multiples of {p}"),
            ("encoder_hidden_states", encoder_hidden_states, (b, None, c.joint_attention_dim),
             f"({b}, L, {c.joint_attention_dim}) tensor"),
            ("pooled_projections", pooled_projections, (b, c.pooled_projection_dim),
             f"({b}, {c.pooled_projection_dim}) tensor")):
        if name == "encoder_hidden_states" and c.joint_attention_dim is None:
            continue
        fits = torch.is_tensor(value) and value.dim() == len(shape) and all(
            want is None or got == want for got, want in zip(value.shape, shape))
        if fits and name == "hidden_states":
            fits = value.shape[-2] % p == 0 and value.shape[-1] % p == 0
        if not fits:
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"{name} must be a {what}, got {got}")


class SD3Transformer2DModel(loading.PretrainedMixin, nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        c = self.config = loading.make_config("SD3Transformer2DModel", DEFAULTS, {}, config)
        for field in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                      "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                      "pos_embed_max_size"):
            if isinstance(c[field], bool) or not isinstance(c[field], int) or c[field] <= 0:
                raise ValueError(f"SD3Transformer2DModel: config field {field} must be a positive int, got "
                                 f"{c[field]!r}")
        if c.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"SD3Transformer2DModel: config field qk_norm={c.qk_norm!r} is not supported "
                             "(None or 'rms_norm', SD3.5's)")
        dim = c.num_attention_heads * c.attention_head_dim
        if c.caption_projection_dim != dim:
            raise ValueError(f"SD3Transformer2DModel: caption_projection_dim ({c.caption_projection_dim}) must equal "
                             f"num_attention_heads * attention_head_dim ({dim}): the text stream runs at that width")
        self.out_channels = c.out_channels if c.out_channels is not None else c.in_channels
        self.pos_embed = PatchEmbed(c.in_channels, dim, c.patch_size, c.pos_embed_max_size)
        self.time_text_embed = TimeTextEmbedding(dim, c.pooled_projection_dim)
        self.context_embedder = nn.Linear(c.joint_attention_dim, c.caption_projection_dim)
        dual = set(c.dual_attention_layers or ())
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(dim, c.num_attention_heads, c.attention_head_dim, i == c.num_layers - 1,
                                  c.qk_norm, i in dual)
            for i in range(c.num_layers))
        self.norm_out = AdaNorm(dim, 2)
        self.proj_out = nn.Linear(dim, c.patch_size * c.patch_size * self.out_channels)
        self.image_proj = None  # an SD3 IP-Adapter's time-conditioned image projection (ip_adapter_sd3), if loaded

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                skip_layers=None, block_controlnet_hidden_states=None, ip_adapter_image_embeds=None):
        """The velocity prediction (B, out_channels, H, W) as a tensor (diffusers' output's ``sample``).
        ``skip_layers``: block indices to skip (SD3.5's skip-layer guidance). ``block_controlnet_hidden_states``: an
        SD3 ControlNet's residuals, added to the image stream after each block but the last (skipped ones too), the
        residual of block i the one at ``int(i / (blocks / residuals))``, as diffusers spreads fewer over more.
        ``ip_adapter_image_embeds``: (B, N, E) image features for the loaded IP-Adapter (SigLIP's penultimate hidden
        states), projected at this timestep and attended to by every joint block."""
        check_inputs(self.config, hidden_states, encoder_hidden_states, pooled_projections)
        height, width = hidden_states.shape[-2:]
        skip = set(skip_layers or ())
        residuals = block_controlnet_hidden_states
        if residuals is not None:
            p, c = self.config.patch_size, self.config
            want = (hidden_states.shape[0], (height // p) * (width // p), c.num_attention_heads * c.attention_head_dim)
            if not isinstance(residuals, (list, tuple)) or not residuals or not all(
                    torch.is_tensor(r) and tuple(r.shape) == want for r in residuals):
                got = ([tuple(r.shape) if torch.is_tensor(r) else type(r).__name__ for r in residuals]
                       if isinstance(residuals, (list, tuple)) else type(residuals).__name__)
                raise ValueError(f"block_controlnet_hidden_states must be a non-empty list of {want} tensors (B, "
                                 f"tokens, width: an SD3ControlNetModel's output), got {got}")
        x = self.pos_embed(hidden_states).contiguous()
        timesteps = broadcast_timestep(timestep, hidden_states)
        temb = self.time_text_embed(timesteps, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        ip = self._ip_inputs(ip_adapter_image_embeds, timesteps, hidden_states.shape[0])
        for i, block in enumerate(self.transformer_blocks):
            if i not in skip:
                context, x = block(x, context, temb, ip)
            if residuals is not None and not block.context_pre_only:
                x = x + residuals[int(i / (len(self.transformer_blocks) / len(residuals)))]
        x = self.proj_out(self.norm_out(x, temb))
        p, c = self.config.patch_size, self.out_channels
        x = x.reshape(x.shape[0], height // p, width // p, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, height, width)

    def _ip_inputs(self, embeds, timesteps, batch):
        """The IP-Adapter's (image tokens, timestep embedding) for ``embeds`` at ``timesteps``, or None."""
        if embeds is None:
            return None
        if self.image_proj is None:
            raise ValueError("ip_adapter_image_embeds: this transformer has no IP-Adapter loaded "
                             "(pipe.load_ip_adapter(...))")
        dim = self.image_proj.proj_in.in_features
        if not torch.is_tensor(embeds) or embeds.dim() != 3 or embeds.shape[0] != batch or embeds.shape[2] != dim:
            got = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
            raise ValueError(f"ip_adapter_image_embeds must be a ({batch}, N, {dim}) tensor (the image encoder's "
                             f"features for each sample), got {got}")
        return self.image_proj(embeds, timesteps)
