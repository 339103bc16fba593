"""AutoencoderKL (the SD VAE) with diffusers' parameter names; legacy attention key names are converted on load."""
from __future__ import annotations

import torch
from torch import nn

from ..schedulers.common import randn_tensor
from . import loading
from .attention import Attention, fuse_qkv_projections
from .layers import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D

DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
    block_out_channels=[64], layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=32, scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True,
    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
)
UNSUPPORTED = dict(act_fn="silu")
EPS = 1e-6  # the VAE's GroupNorms all use 1e-6
_LEGACY = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


class DiagonalGaussianDistribution:
    """The encoder's posterior: mean and log-variance split on channels (log-variance clamped to [-30, 20])."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.parameters.device,
                             dtype=self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    @property
    def latent_dist(self):  # so `vae.encode(x).latent_dist.sample()` (diffusers' spelling) works too
        return self


class MidBlock(nn.Module):
    def __init__(self, ch, groups, attention=True):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, None, groups, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([Attention(ch, 1, ch, bias=True, group_norm=GroupNorm(groups, ch, EPS),
                                                   residual_connection=True)]) if attention else None

    def forward(self, h):
        h = self.resnets[0](h)
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self.resnets[1](h)


class EncoderBlock(nn.Module):
    def __init__(self, in_ch, out_ch, layers, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, EPS)
                                     for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)]) if downsample else None

    def forward(self, h):
        for resnet in self.resnets:
            h = resnet(h)
        return self.downsamplers[0](h) if self.downsamplers is not None else h


class DecoderBlock(nn.Module):
    def __init__(self, in_ch, out_ch, layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, EPS)
                                     for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, h):
        for resnet in self.resnets:
            h = resnet(h)
        return self.upsamplers[0](h) if self.upsamplers is not None else h


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        chans, groups = list(c.block_out_channels), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(EncoderBlock(chans[max(i - 1, 0)], chans[i], c.layers_per_block, groups,
                                                      i < len(chans) - 1) for i in range(len(chans)))
        self.mid_block = MidBlock(chans[-1], groups, c.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, chans[-1], EPS, silu=True)
        self.conv_out = nn.Conv2d(chans[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(self.conv_norm_out(self.mid_block(h)))


class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        rchans, groups = list(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, rchans[0], 3, padding=1)
        self.mid_block = MidBlock(rchans[0], groups, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(DecoderBlock(rchans[max(i - 1, 0)], rchans[i], c.layers_per_block + 1, groups,
                                                    i < len(rchans) - 1) for i in range(len(rchans)))
        self.conv_norm_out = GroupNorm(groups, rchans[-1], EPS, silu=True)
        self.conv_out = nn.Conv2d(rchans[-1], c.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_norm_out(h))


class VaeSwitches:
    """diffusers' VAE memory savers, off by default (``use_slicing``, ``use_tiling``), and the input check, shared
    by both VAEs."""

    def enable_slicing(self):
        """Encode and decode a batch one image at a time (diffusers' VAE slicing): less memory, the same result."""
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    def enable_tiling(self, use_tiling=True):
        """Encode and decode in overlapping, blended tiles (diffusers' VAE tiling; each VAE blends its own way):
        memory that does not grow with the image; the result differs slightly from the untiled one, as in
        diffusers, and equals diffusers' tiled result."""
        self.use_tiling = bool(use_tiling)

    def disable_tiling(self):
        self.use_tiling = False

    def _check(self, name, x, channels):
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != channels:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} must be a (B, {channels}, H, W) tensor, got {got}")


class AutoencoderKL(VaeSwitches, loading.PretrainedMixin, nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        if config.get("_class_name") == "AutoencoderTiny":
            raise ValueError("AutoencoderKL: this config is an AutoencoderTiny's (TAESD): load it with "
                             "diffusion_fast.AutoencoderTiny")
        c = self.config = loading.make_config("AutoencoderKL", DEFAULTS, UNSUPPORTED, config)
        for field, kinds, allowed in (("down_block_types", c.down_block_types, "DownEncoderBlock2D"),
                                      ("up_block_types", c.up_block_types, "UpDecoderBlock2D")):
            if len(kinds) != len(c.block_out_channels):
                raise ValueError(f"AutoencoderKL: {field} has {len(kinds)} entries for {len(c.block_out_channels)} blocks")
            for kind in kinds:
                if kind != allowed:
                    raise ValueError(f"AutoencoderKL: unknown block type {kind!r} in {field} (supported: {allowed})")
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        latent = c.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if c.use_post_quant_conv else None
        # diffusers' memory savers, off by default: one image at a time (slicing), overlapping tiles (tiling)
        self.use_slicing = self.use_tiling = False
        size = c.sample_size[0] if isinstance(c.sample_size, (list, tuple)) else c.sample_size
        self.tile_sample_min_size = size  # (diffusers' names and sizes: the VAE's sample size, and in latents)
        self.tile_latent_min_size = int(size / 2 ** (len(c.block_out_channels) - 1))
        self.tile_overlap_factor = 0.25

    @staticmethod
    def convert_state_dict(state):
        return convert_legacy_keys(state)

    def fuse_qkv_projections(self):
        """One q/k/v GEMM per self-attention (weights concatenated into non-persistent buffers; names unchanged).
        Call again after loading new weights (a pipeline's load_lora_weights refreshes it), or call
        unfuse_qkv_projections()."""
        return fuse_qkv_projections(self, True)

    def unfuse_qkv_projections(self):
        return fuse_qkv_projections(self, False)

    @property
    def dtype(self):
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self):
        return self.decoder.conv_in.weight.device

    def encode(self, x) -> DiagonalGaussianDistribution:
        """The posterior over latents for images ``x`` in [-1, 1]; ``.latent_dist`` returns itself (diffusers' spelling)."""
        self._check("x", x, self.config.in_channels)
        slices = x.split(1) if self.use_slicing and x.shape[0] > 1 else [x]
        return DiagonalGaussianDistribution(torch.cat([self._moments(s) for s in slices]))

    def _moments(self, x):
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._tiled(x, self._moments_untiled, self.tile_sample_min_size, self.tile_latent_min_size)
        return self._moments_untiled(x)

    def _moments_untiled(self, x):
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def decode(self, z) -> torch.Tensor:
        """Images (B, out_channels, 8H, 8W for SD) from latents ``z`` (already divided by config.scaling_factor)."""
        self._check("z", z, self.config.latent_channels)
        slices = z.split(1) if self.use_slicing and z.shape[0] > 1 else [z]
        return torch.cat([self._decoded(s) for s in slices])

    def _decoded(self, z):
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self._tiled(z, self._decoded_untiled, self.tile_latent_min_size, self.tile_sample_min_size)
        return self._decoded_untiled(z)

    def _decoded_untiled(self, z):
        return self.decoder(self.post_quant_conv(z) if self.post_quant_conv is not None else z)

    def _tiled(self, x, fn, tile_in, tile_out):
        """``fn`` (the encoder or decoder) over tiles of ``x`` of ``tile_in`` pixels a side, starting every
        (1 - overlap) tile: each output tile (``tile_out`` a side) blended linearly over its first overlap rows and
        columns with the tiles above and to the left, then cut to its stride and concatenated (diffusers' tiling)."""
        stride = int(tile_in * (1 - self.tile_overlap_factor))
        blend = int(tile_out * self.tile_overlap_factor)
        keep = tile_out - blend
        rows = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
                for i in range(0, x.shape[2], stride)]
        out_rows = []
        for i, row in enumerate(rows):
            kept = []
            for j, tile in enumerate(row):
                if i > 0:
                    tile = _blended(rows[i - 1][j], tile, blend, dim=2)
                if j > 0:
                    tile = _blended(row[j - 1], tile, blend, dim=3)
                row[j] = tile  # (the blended tile is the left neighbour of the next, as in diffusers)
                kept.append(tile[:, :, :keep, :keep])
            out_rows.append(torch.cat(kept, dim=3))
        return torch.cat(out_rows, dim=2)

    def forward(self, x, sample_posterior=False, generator=None):
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())


def _blended(a, b, extent, dim):
    """``b`` with its first ``extent`` rows (dim 2) or columns (dim 3) a linear ramp from ``a``'s last ones to its
    own: weight k / extent on b's at position k, the weights rounded from float64 as diffusers' Python floats are."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    w = torch.tensor([k / extent for k in range(extent)], dtype=torch.float64)
    one_minus = torch.tensor([1 - k / extent for k in range(extent)], dtype=torch.float64)
    w, one_minus = (t.to(b.device, b.dtype).view(shape) for t in (w, one_minus))
    head = a.narrow(dim, a.shape[dim] - extent, extent) * one_minus + b.narrow(dim, 0, extent) * w
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)


def convert_legacy_keys(state: dict) -> dict:
    """Old SD VAE files name the mid-block attention query/key/value/proj_attn, some with 1x1-conv shaped weights."""
    out = {}
    for key, value in state.items():
        if ".attentions." in key:
            for old, new in _LEGACY.items():
                if f".{old}" in key:
                    key = key.replace(f".{old}", f".{new}")
                    if value.dim() == 4:
                        value = value[:, :, 0, 0]
        out[key] = value
    return out
