"""ControlNet-Union (xinsir's controlnet-union-sdxl-1.0 and its "promax"): one SDXL ControlNet for several kinds of
conditioning image, with diffusers' ControlNetUnionModel parameter names and config, so its folders load unchanged.

It is our ControlNet (the UNet's blocks, our ops inside) with what the union adds before them: each conditioning
image is embedded, its spatial mean plus its control mode's learned task embedding becomes a token, a small
transformer mixes the tokens (with one for the latents), and each image's features plus a per-channel shift from its
token are added to the latents' convolution. The control modes also condition the time embedding (a one-hot vector
of ``num_control_type`` entries, embedded like SDXL's size ids).
"""
from __future__ import annotations

import torch
from torch import nn

from .controlnet import DEFAULTS, ControlNetModel
from .layers import TimestepEmbedding, timestep_embedding
from .time_conditioning import embed_time
from .unet import check_inputs

UNION_DEFAULTS = dict(DEFAULTS, num_control_type=6, num_trans_channel=320, num_trans_head=8, num_trans_layer=1,
                      num_proj_channel=320)


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _ResidualAttentionMlp(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = nn.Linear(width, width * 4), _QuickGELU(), nn.Linear(width * 4, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class _ResidualAttentionBlock(nn.Module):
    """A pre-norm transformer layer over the (batch, tokens, width) token tensor. As diffusers (and the original)
    build it, the attention is a sequence-first nn.MultiheadAttention given batch-first tokens: it attends across
    the batch, for each token position. Kept as it is, since the weights were trained that way."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.mlp, self.ln_2 = nn.LayerNorm(width), _ResidualAttentionMlp(width), nn.LayerNorm(width)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ControlNetUnionModel(ControlNetModel):
    _defaults = UNION_DEFAULTS

    def __init__(self, config: dict):
        super().__init__(config)
        c = self.config
        if c.addition_embed_type != "text_time":
            raise ValueError("ControlNetUnionModel: an SDXL ControlNet (addition_embed_type='text_time'), got "
                             f"addition_embed_type={c.addition_embed_type!r}")
        if c.controlnet_conditioning_channel_order != "rgb":
            raise ValueError("ControlNetUnionModel: controlnet_conditioning_channel_order must be 'rgb' (diffusers "
                             f"refuses {c.controlnet_conditioning_channel_order!r} too)")
        width = c.block_out_channels[0]
        if c.num_trans_channel != width or c.num_proj_channel != width:
            raise ValueError(f"ControlNetUnionModel: num_trans_channel ({c.num_trans_channel}) and num_proj_channel "
                             f"({c.num_proj_channel}) must be block_out_channels[0] ({width}), as diffusers adds them")
        self.task_embedding = nn.Parameter(torch.zeros(c.num_control_type, c.num_trans_channel))
        self.transformer_layes = nn.ModuleList(_ResidualAttentionBlock(c.num_trans_channel, c.num_trans_head)
                                               for _ in range(c.num_trans_layer))  # (diffusers' spelling)
        self.spatial_ch_projs = nn.Linear(c.num_trans_channel, c.num_proj_channel)
        self.control_add_embedding = TimestepEmbedding(c.addition_time_embed_dim * c.num_control_type, width * 4)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, control_type, control_type_idx,
                conditioning_scale, guess_mode=False, added_cond_kwargs=None):
        """(down_block_res_samples, mid_block_res_sample) as diffusers' ControlNetUnionModel gives them:
        ``controlnet_cond`` one image per control mode in ``control_type_idx``, ``control_type`` the (batch,
        num_control_type) one-hot of the modes, ``conditioning_scale`` one per mode. With one mode its scale
        multiplies the residuals, as a ControlNet's does; with several, each scales its image's features and token,
        and the residuals are not scaled again."""
        c = self.config
        check_inputs(c, sample, encoder_hidden_states)
        images, modes, scales = list(controlnet_cond), list(control_type_idx), list(conditioning_scale)
        if not images or len(images) != len(modes) or len(scales) != len(modes):
            raise ValueError(f"ControlNetUnionModel: {len(images)} conditioning images, {len(modes)} control modes "
                             f"and {len(scales)} scales: give one of each per mode")
        if any(not isinstance(m, int) or not 0 <= m < c.num_control_type for m in modes):
            raise ValueError(f"control_type_idx must be control modes in [0, {c.num_control_type}), got {modes}")
        for image in images:
            self._check_cond(sample, image)
        if not torch.is_tensor(control_type) or tuple(control_type.shape) != (sample.shape[0], c.num_control_type):
            got = tuple(control_type.shape) if torch.is_tensor(control_type) else type(control_type).__name__
            raise ValueError(f"control_type must be a ({sample.shape[0]}, {c.num_control_type}) one-hot tensor, got "
                             f"{got}")
        emb = embed_time(self, sample, timestep, added_cond_kwargs)
        modes_emb = timestep_embedding(control_type.flatten(), c.addition_time_embed_dim, c.flip_sin_to_cos,
                                       c.freq_shift).reshape(sample.shape[0], -1).to(emb.dtype)
        emb = emb + self.control_add_embedding(modes_emb)
        h = self.conv_in(sample)
        one = len(modes) == 1
        tokens, features = [], []
        for image, mode, scale in zip(images, modes, scales):
            feature = self.controlnet_cond_embedding(image)
            token = (feature.mean(dim=(2, 3)) + self.task_embedding[mode]).unsqueeze(1)
            tokens.append(token if one else token * scale)
            features.append(feature if one else feature * scale)
        tokens = torch.cat([*tokens, h.mean(dim=(2, 3)).unsqueeze(1)], dim=1)
        for layer in self.transformer_layes:
            tokens = layer(tokens)
        fused = None  # (diffusers starts from h * 0, one multiply more for the same sum)
        for i, (feature, scale) in enumerate(zip(features, scales)):
            shift = self.spatial_ch_projs(tokens[:, i])[:, :, None, None]
            part = feature + shift if one else feature + shift * scale
            fused = part if fused is None else fused + part
        return self._residuals(h + fused, emb, encoder_hidden_states, scales[0] if one else 1.0, guess_mode)
