"""AutoencoderTiny: TAESD, madebyollin's tiny autoencoder for SD's and SDXL's latents (taesd, taesdxl), with
diffusers' parameter names and semantics.

About 2.4M parameters against AutoencoderKL's 84M: plain 3x3 convolutions and ReLUs, no normalization and no
attention, so it decodes many times faster (a preview, or the final image of a few-step LCM run) at a small loss of
detail. Its latents are the KL VAE's own (scaling factor 1: the pipelines divide by 1), so it is swapped in for a
pipeline's ``vae``, as diffusers does. The encoder is deterministic: ``encode(x).latent_dist.sample(generator)``
returns the latents and draws nothing, as diffusers' pipelines read a tiny VAE's ``latents``, so the generator's
later draws (the img2img noise) are the same as diffusers'.
"""
from __future__ import annotations

import torch
from torch import nn

from . import loading
from .vae import VaeSwitches

DEFAULTS = dict(
    in_channels=3, out_channels=3, encoder_block_out_channels=[64, 64, 64, 64],
    decoder_block_out_channels=[64, 64, 64, 64], latent_channels=4, upsampling_scaling_factor=2,
    num_encoder_blocks=[1, 3, 3, 3], num_decoder_blocks=[3, 3, 3, 1], latent_magnitude=3, latent_shift=0.5,
    force_upcast=False, scaling_factor=1.0, shift_factor=0.0,
    block_out_channels=None,  # (diffusers registers the decoder's widths under this name; pipelines read its length)
    latents_mean=None, latents_std=None,  # (not TAESD fields: the pipelines' SDXL encode reads them, as None)
)
UNSUPPORTED = dict(act_fn="relu", upsample_fn="nearest")


class TinyLatents:
    """The encoder's output, read the ways diffusers' pipelines read an encoder's: ``.latents``, and
    ``.latent_dist.sample(generator)`` / ``.mode()``, which return the latents (nothing is drawn)."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    @property
    def latent_dist(self):
        return self

    def sample(self, generator=None):
        return self.latents

    def mode(self):
        return self.latents


class AutoencoderTinyBlock(nn.Module):
    """ReLU(conv(ReLU(conv(ReLU(conv(x))))) + skip(x)), the skip a 1x1 convolution only where the width changes."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False) if in_ch != out_ch else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


class EncoderTiny(nn.Module):
    """[0, 1] pixels (the [-1, 1] input mapped) to latents: a convolution, then per stage a stride-2 one (after the
    first) and its blocks, then a convolution to the latent channels."""

    def __init__(self, c):
        super().__init__()
        widths, layers = c.encoder_block_out_channels, []
        for i, (width, blocks) in enumerate(zip(widths, c.num_encoder_blocks)):
            layers.append(nn.Conv2d(c.in_channels, width, 3, padding=1) if i == 0 else
                          nn.Conv2d(widths[i - 1], width, 3, padding=1, stride=2, bias=False))
            layers += [AutoencoderTinyBlock(width, width) for _ in range(blocks)]
        layers.append(nn.Conv2d(widths[-1], c.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x.add(1).div(2))


class DecoderTiny(nn.Module):
    """Latents, soft-clamped to (-3, 3) by 3 tanh(x / 3), to [-1, 1] pixels: a convolution and ReLU, then per stage
    its blocks, a nearest 2x upsample and a bias-free convolution (the last stage's convolution, with a bias, gives
    the image's channels and is not upsampled)."""

    def __init__(self, c):
        super().__init__()
        widths = c.decoder_block_out_channels
        layers = [nn.Conv2d(c.latent_channels, widths[0], 3, padding=1), nn.ReLU()]
        for i, (width, blocks) in enumerate(zip(widths, c.num_decoder_blocks)):
            last = i == len(widths) - 1
            layers += [AutoencoderTinyBlock(width, width) for _ in range(blocks)]
            if not last:
                layers.append(nn.Upsample(scale_factor=c.upsampling_scaling_factor, mode="nearest"))
            layers.append(nn.Conv2d(width, c.out_channels if last else width, 3, padding=1, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z):
        return self.layers(torch.tanh(z / 3) * 3).mul(2).sub(1)


class AutoencoderTiny(VaeSwitches, loading.PretrainedMixin, nn.Module):
    """Tiling (``enable_tiling``) is diffusers' TAESD tiling: tiles of 512 pixels (64 latents) a side, each blended
    over the ones above and to its left with linear ramps (``_tiled``), not the KL VAE's seams."""

    def __init__(self, config: dict):
        super().__init__()
        if config.get("_class_name") not in (None, "AutoencoderTiny"):
            raise ValueError(f"AutoencoderTiny: this config is an {config['_class_name']}'s: load it with its class "
                             "(diffusion_fast.AutoencoderKL for the SD VAE)")
        config = dict(config)
        config["block_out_channels"] = list(config.get("decoder_block_out_channels",
                                                       DEFAULTS["decoder_block_out_channels"]))
        c = self.config = loading.make_config("AutoencoderTiny", DEFAULTS, UNSUPPORTED, config)
        for side in ("encoder", "decoder"):
            widths, blocks = c[f"{side}_block_out_channels"], c[f"num_{side}_blocks"]
            if len(widths) != len(blocks) or not widths:
                raise ValueError(f"AutoencoderTiny: {side}_block_out_channels ({len(widths)} entries) and "
                                 f"num_{side}_blocks ({len(blocks)}) must have the same, non-zero length")
        if len(c.encoder_block_out_channels) != len(c.decoder_block_out_channels) or c.upsampling_scaling_factor != 2:
            raise ValueError("AutoencoderTiny: the encoder and decoder must have as many stages, and the decoder "
                             f"upsample by 2 (got upsampling_scaling_factor={c.upsampling_scaling_factor!r})")
        self.encoder, self.decoder = EncoderTiny(c), DecoderTiny(c)
        self.scale = 2 ** (len(c.encoder_block_out_channels) - 1)  # pixels per latent, each way
        # diffusers' memory savers, off by default: one image at a time (slicing), overlapping tiles (tiling)
        self.use_slicing = self.use_tiling = False
        self.tile_sample_min_size, self.tile_overlap_factor = 512, 0.125  # (diffusers' TAESD tiling sizes)
        self.tile_latent_min_size = self.tile_sample_min_size // self.scale

    def encode(self, x) -> TinyLatents:
        """The latents of images ``x`` in [-1, 1] (deterministic; see TinyLatents)."""
        self._check("x", x, self.config.in_channels)
        return TinyLatents(self._each(x, self.encoder, self.tile_sample_min_size, 1 / self.scale,
                                      self.config.latent_channels))

    def decode(self, z) -> torch.Tensor:
        """Images in [-1, 1] (B, out_channels, 8H, 8W for TAESD) from latents ``z`` (divided by the scaling
        factor, 1)."""
        self._check("z", z, self.config.latent_channels)
        return self._each(z, self.decoder, self.tile_latent_min_size, self.scale, self.config.out_channels)

    def _each(self, x, fn, tile, ratio, channels):
        slices = x.split(1) if self.use_slicing and x.shape[0] > 1 else [x]
        run = (lambda s: self._tiled(s, fn, tile, ratio, channels)) if self.use_tiling else fn  # noqa: E731
        return torch.cat([run(s) for s in slices])

    def _tiled(self, x, fn, tile, ratio, channels):
        """``fn`` over tiles of ``tile`` inputs a side, every ``tile - blend`` (blend = the overlap factor's share),
        each output tile written over what is there through a mask that ramps from 0 to 1 over the blend, along the
        rows below the first tile row and the columns right of the first tile column (diffusers' order and masks)."""
        blend = int(tile * self.tile_overlap_factor)
        stride = tile - blend
        ramp = (torch.arange(tile * ratio) / (blend * ratio - 1)).clamp(0, 1).to(x.device)
        out = x.new_zeros(x.shape[0], channels, int(x.shape[2] * ratio), int(x.shape[3] * ratio))
        for i in range(0, x.shape[2], stride):
            for j in range(0, x.shape[3], stride):
                result = fn(x[..., i:i + tile, j:j + tile])
                h, w = result.shape[-2:]
                rows = ramp[:h, None] if i > 0 else torch.ones_like(ramp[:h, None])
                cols = ramp[None, :w] if j > 0 else torch.ones_like(ramp[None, :w])
                mask = (rows * cols).to(result.dtype)
                top, left = int(i * ratio), int(j * ratio)
                region = out[..., top:top + h, left:left + w]
                region.copy_(mask * result + (1 - mask) * region)
        return out

    def forward(self, sample):
        """diffusers' round trip: encode, the latents stored as 8-bit values in [0, 1] and read back, decode."""
        latents = self.encode(sample).latents
        magnitude, shift = self.config.latent_magnitude, self.config.latent_shift
        stored = latents.div(2 * magnitude).add(shift).clamp(0, 1).mul(255).round().byte()
        return self.decode((stored / 255.0).sub(shift).mul(2 * magnitude))
