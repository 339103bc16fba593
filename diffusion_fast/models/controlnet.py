"""ControlNetModel (SD 1.x/2.x, and SDXL's text-time conditioning) with diffusers' parameter names, and
MultiControlNetModel, which sums several.

A ControlNet is a copy of the UNet's encoder (``down_blocks``, ``mid_block``) whose input gets an embedding of a
conditioning image (an edge map, a depth map, a pose...) added after ``conv_in``; a 1x1 "zero" convolution on each
of its skip states and on the mid block's output gives the residuals the UNet adds to its own
(``UNet2DConditionModel.forward``'s ``down_block_additional_residuals`` and ``mid_block_additional_residual``).
``controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale)`` returns
``(down_block_res_samples, mid_block_res_sample)``, as diffusers' ``return_dict=False``. Its blocks are the UNet's,
so its GroupNorm+SiLU pairs and attention run our fused ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import loading
from .layers import TimestepEmbedding
from .time_conditioning import embed_time
from .unet import DOWN_BLOCKS, DownBlock, MidBlock, _per_block, check_inputs

DEFAULTS = dict(
    in_channels=4, conditioning_channels=3, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False, block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1.0, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1, attention_head_dim=8,
    num_attention_heads=None, use_linear_projection=False, addition_embed_type=None, addition_time_embed_dim=None,
    upcast_attention=False, projection_class_embeddings_input_dim=None, controlnet_conditioning_channel_order="rgb",
    conditioning_embedding_out_channels=[16, 32, 96, 256], global_pool_conditions=False,
)
# Fields we accept only at diffusers' default (anything else is a clear error naming the field).
UNSUPPORTED = dict(encoder_hid_dim=None, encoder_hid_dim_type=None, class_embed_type=None, num_class_embeds=None,
                   resnet_time_scale_shift="default", addition_embed_type_num_heads=64)


class ControlNetConditioningEmbedding(nn.Module):
    """The conditioning image to the UNet's first feature width: 3x3 convolutions with SiLU, each width after the
    first reached by a stride-2 one (so the image is ``2 ** (len(channels) - 1)`` times the latents' size)."""

    def __init__(self, out_channels, in_channels, channels):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for ch_in, ch_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(ch_in, ch_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(ch_in, ch_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, image):
        h = F.silu(self.conv_in(image))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNetModel(loading.PretrainedMixin, nn.Module):
    _defaults = DEFAULTS  # (the union model's adds its own fields)

    def __init__(self, config: dict):
        super().__init__()
        c = self.config = loading.make_config(type(self).__name__, self._defaults, UNSUPPORTED, config)
        for field, allowed in (("mid_block_type", ("UNetMidBlock2DCrossAttn",)), ("act_fn", ("silu",)),
                               ("addition_embed_type", (None, "text_time")),
                               ("controlnet_conditioning_channel_order", ("rgb", "bgr"))):
            if c[field] not in allowed:
                raise ValueError(f"ControlNetModel: config field {field}={c[field]!r} is not supported ({allowed})")
        flags = c.only_cross_attention
        flags = flags if isinstance(flags, (list, tuple)) else [flags]
        if any(flags):
            raise ValueError(f"ControlNetModel: config field only_cross_attention={c.only_cross_attention!r} is not "
                             "supported (only False)")
        for kind in c.down_block_types:
            if kind not in DOWN_BLOCKS:
                raise ValueError(f"ControlNetModel: unknown down block type {kind!r} (supported: {DOWN_BLOCKS})")
        chans, n = list(c.block_out_channels), len(c.block_out_channels)
        if len(c.down_block_types) != n:
            raise ValueError(f"ControlNetModel: {len(c.down_block_types)} down_block_types for {n} "
                             "block_out_channels")
        heads = _per_block(c.num_attention_heads or c.attention_head_dim, n, "attention heads")  # legacy name
        depth = _per_block(c.transformer_layers_per_block, n, "transformer_layers_per_block")
        if not all(isinstance(d, int) and d > 0 for d in depth):
            raise ValueError(f"ControlNetModel: config field transformer_layers_per_block="
                             f"{c.transformer_layers_per_block!r} is not supported (an int or one int per block)")
        if not isinstance(c.layers_per_block, int) or not isinstance(c.cross_attention_dim, int):
            raise ValueError("ControlNetModel: layers_per_block and cross_attention_dim must be ints (as diffusers "
                             f"builds it), got {c.layers_per_block!r} and {c.cross_attention_dim!r}")
        if c.addition_embed_type == "text_time":
            for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if not isinstance(c[field], int) or c[field] <= 0:
                    raise ValueError(f"ControlNetModel: addition_embed_type='text_time' needs config field {field} "
                                     f"(a positive int), got {c[field]!r}")
        groups, eps, temb, layers = c.norm_num_groups, c.norm_eps, chans[0] * 4, c.layers_per_block

        self.conv_in = nn.Conv2d(c.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], temb)
        if c.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            chans[0], c.conditioning_channels, list(c.conditioning_embedding_out_channels))
        self.down_blocks = nn.ModuleList(
            DownBlock(kind, chans[max(i - 1, 0)], chans[i], temb, layers, groups, eps, i < n - 1,
                      c.downsample_padding, heads[i], depth[i], c.cross_attention_dim, c.use_linear_projection,
                      c.upcast_attention)
            for i, kind in enumerate(c.down_block_types))
        # one 1x1 "zero" convolution per skip state: conv_in's, each resnet's, each downsampler's
        skip_chans = [chans[0]] + [ch for i, ch in enumerate(chans) for _ in range(layers + (i < n - 1))]
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(ch, ch, 1) for ch in skip_chans)
        self.mid_block = MidBlock(chans[-1], temb, groups, eps, heads[-1], depth[-1], c.cross_attention_dim,
                                  c.use_linear_projection, c.upcast_attention, c.mid_block_scale_factor)
        self.controlnet_mid_block = nn.Conv2d(chans[-1], chans[-1], 1)

    @property
    def image_scale(self) -> int:
        """How many times the latents' size the conditioning image is (the embedding's stride-2 convolutions)."""
        return 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)

    def _check_cond(self, sample, controlnet_cond):
        c, f = self.config, self.image_scale
        want = (sample.shape[0], c.conditioning_channels, sample.shape[2] * f, sample.shape[3] * f)
        if not torch.is_tensor(controlnet_cond) or tuple(controlnet_cond.shape) != want:
            got = tuple(controlnet_cond.shape) if torch.is_tensor(controlnet_cond) else type(controlnet_cond).__name__
            raise ValueError(f"controlnet_cond must be a {want} tensor for this sample (the conditioning image is "
                             f"{f}x the latents' size), got {got}")

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                guess_mode=False, added_cond_kwargs=None):
        """(down_block_res_samples, mid_block_res_sample): the residuals for the UNet, times ``conditioning_scale``
        (in ``guess_mode``, times 10^-1 for the first rising to 10^0 for the mid block's, as diffusers scales them);
        with ``global_pool_conditions``, their spatial means."""
        c = self.config
        check_inputs(c, sample, encoder_hidden_states)
        self._check_cond(sample, controlnet_cond)
        if isinstance(conditioning_scale, bool) or not isinstance(conditioning_scale, (int, float)):
            raise TypeError(f"conditioning_scale must be a number, got {type(conditioning_scale).__name__}")
        if not isinstance(guess_mode, bool):
            raise TypeError(f"guess_mode must be a bool, got {type(guess_mode).__name__}")
        if c.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        emb = embed_time(self, sample, timestep, added_cond_kwargs)
        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        return self._residuals(h, emb, encoder_hidden_states, conditioning_scale, guess_mode)

    def _residuals(self, h, emb, encoder_hidden_states, conditioning_scale, guess_mode):
        """The down and mid blocks on the conditioned input ``h``, their zero convolutions, and the scaling."""
        c = self.config
        skips = (h,)
        for block in self.down_blocks:
            h, states = block(h, emb, encoder_hidden_states)
            skips += states
        h = self.mid_block(h, emb, encoder_hidden_states)
        down = [conv(s) for s, conv in zip(skips, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(h)
        if guess_mode and not c.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=h.device) * conditioning_scale  # 0.1 to 1
            down = [s * scale for s, scale in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [s * conditioning_scale for s in down]
            mid = mid * conditioning_scale
        if c.global_pool_conditions:
            down = [torch.mean(s, dim=(2, 3), keepdim=True) for s in down]
            mid = torch.mean(mid, dim=(2, 3), keepdim=True)
        return down, mid


class NetList(nn.Module):
    """Several nets of one class (``net_class``) as diffusers' Multi...Model wrappers hold them, in ``nets``: their
    dtype and device, and the check of the per-net lists a call takes."""
    net_class = None  # (each subclass's)

    def __init__(self, nets):
        super().__init__()
        nets = list(nets)
        if not nets or not all(isinstance(net, self.net_class) for net in nets):
            raise TypeError(f"{type(self).__name__} takes a non-empty list of diffusion_fast "
                            f"{self.net_class.__name__}s, got {[type(net).__name__ for net in nets]}")
        self.nets = nn.ModuleList(nets)

    @property
    def dtype(self):
        return self.nets[0].dtype

    @property
    def device(self):
        return self.nets[0].device

    def _check_per_net(self, controlnet_cond, conditioning_scale):
        for name, value in (("controlnet_cond", controlnet_cond), ("conditioning_scale", conditioning_scale)):
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"{type(self).__name__}: {name} must be a list (one per net), got "
                                f"{type(value).__name__}")
        if len(controlnet_cond) != len(self.nets) or len(conditioning_scale) != len(self.nets):
            raise ValueError(f"{type(self).__name__}: {len(self.nets)} nets, {len(controlnet_cond)} conditioning "
                             f"images and {len(conditioning_scale)} scales (one of each per net)")


class MultiControlNetModel(NetList):
    """Several ControlNets whose residuals add up (diffusers' MultiControlNetModel): one conditioning image and one
    scale per net."""
    net_class = ControlNetModel

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, guess_mode=False,
                added_cond_kwargs=None):
        self._check_per_net(controlnet_cond, conditioning_scale)
        down = mid = None
        for net, image, scale in zip(self.nets, controlnet_cond, conditioning_scale):
            d, m = net(sample, timestep, encoder_hidden_states, image, scale, guess_mode, added_cond_kwargs)
            down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
        return down, mid
