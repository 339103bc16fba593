"""T2I-Adapters (TencentARC's full, light and SDXL adapters) with diffusers' parameter names and config, so its
``T2IAdapter`` folders load unchanged; and ``MultiAdapter``, several adapters summed with weights.

An adapter turns a conditioning image (a sketch, depth map, pose, ...) into one feature map per UNet level, once
per call; the UNet adds them inside its down blocks at every step (``down_intrablock_additional_residuals``). The
adapter is small (a few convolutions per level at 1/8 of the image size and below) and runs once, so it is plain
PyTorch: the per-step work is the UNet's, with our kernels.
"""
from __future__ import annotations

import torch
from torch import nn

from . import loading

DEFAULTS = dict(in_channels=3, channels=[320, 640, 1280, 1280], num_res_blocks=2, downscale_factor=8,
                adapter_type="full_adapter")
ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


class AdapterResnetBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(x))) (the light adapter's: two 3x3 convolutions)."""

    def __init__(self, channels, light=False):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 3 if light else 1, padding=1 if light else 0)

    def forward(self, x):
        return x + self.block2(self.act(self.block1(x)))


class AdapterBlock(nn.Module):
    """An optional 2x average-pool down (ceil mode, as the UNet's strided convolution rounds up), a 1x1 projection
    when the width changes, then resnets. The light adapter's block projects down to a quarter of the width, runs its
    resnets there and projects back up (``out_conv``)."""

    def __init__(self, in_channels, out_channels, num_res_blocks, down=False, light=False):
        super().__init__()
        self.downsample = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True) if down else None
        inner = out_channels // 4 if light else out_channels
        self.in_conv = nn.Conv2d(in_channels, inner, 1) if light or in_channels != out_channels else None
        self.resnets = nn.Sequential(*[AdapterResnetBlock(inner, light) for _ in range(num_res_blocks)])
        if light:
            self.out_conv = nn.Conv2d(inner, out_channels, 1)

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        x = self.resnets(x)
        return self.out_conv(x) if hasattr(self, "out_conv") else x


class _Adapter(nn.Module):
    """diffusers' FullAdapter / FullAdapterXL / LightAdapter (the module under ``adapter.``): pixel-unshuffle by
    ``downscale_factor``, then one block per feature map. ``strides``: each feature map's downscale from the image."""

    def __init__(self, kind, in_channels, channels, num_res_blocks, downscale_factor):
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(downscale_factor)
        unshuffled, n = in_channels * downscale_factor ** 2, len(channels)
        if kind == "light_adapter":  # no conv_in; one more block than widths, the last at the last width, down
            widths = [unshuffled, *channels, channels[-1]]
            self.body = nn.ModuleList(AdapterBlock(widths[i], widths[i + 1], num_res_blocks, down=i > 0, light=True)
                                      for i in range(n + 1))
            self.strides = [downscale_factor * 2 ** i for i in range(n + 1)]
            return
        self.conv_in = nn.Conv2d(unshuffled, channels[0], 3, padding=1)
        if kind == "full_adapter":
            self.body = nn.ModuleList(AdapterBlock(channels[max(i - 1, 0)], channels[i], num_res_blocks, down=i > 0)
                                      for i in range(n))
            self.strides = [downscale_factor * 2 ** i for i in range(n)]
        else:  # full_adapter_xl: blocks 0 and 1 at the unshuffled size, block 2 down, the rest at that size
            self.body = nn.ModuleList(AdapterBlock(channels[i - 1] if i in (1, 2) else channels[i], channels[i],
                                                   num_res_blocks, down=i == 2) for i in range(n))
            self.strides = [downscale_factor * (2 if i >= 2 else 1) for i in range(n)]

    def forward(self, x):
        x = self.unshuffle(x)
        if hasattr(self, "conv_in"):
            x = self.conv_in(x)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(loading.PretrainedMixin, nn.Module):
    """diffusers' T2IAdapter: ``adapter(image)`` is the list of feature maps, image (B, in_channels, H, W) in
    [0, 1] with H and W multiples of ``downscale_factor``. ``feature_shapes`` says what each map is for the UNet."""

    def __init__(self, config: dict):
        super().__init__()
        c = self.config = loading.make_config("T2IAdapter", DEFAULTS, {}, config)
        if c.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"T2IAdapter: config field adapter_type={c.adapter_type!r} is not supported "
                             f"(supported: {ADAPTER_TYPES})")
        channels = list(c.channels)
        if not channels or not all(isinstance(w, int) and w > 0 for w in channels):
            raise ValueError(f"T2IAdapter: config field channels must be a list of positive ints, got {c.channels!r}")
        if c.adapter_type == "light_adapter" and any(w % 4 for w in channels):
            raise ValueError(f"T2IAdapter: a light adapter's channels must be multiples of 4, got {channels}")
        for field in ("in_channels", "num_res_blocks", "downscale_factor"):
            if isinstance(c[field], bool) or not isinstance(c[field], int) or c[field] <= 0:
                raise ValueError(f"T2IAdapter: config field {field} must be a positive int, got {c[field]!r}")
        self.adapter = _Adapter(c.adapter_type, c.in_channels, channels, c.num_res_blocks, c.downscale_factor)

    @property
    def downscale_factor(self) -> int:
        """What the image's height and width must be multiples of (the pixel-unshuffle's factor)."""
        return self.config.downscale_factor

    @property
    def total_downscale_factor(self) -> int:
        """diffusers' figure: the last feature map's downscale (twice the factor for the SDXL adapter)."""
        c = self.config
        return c.downscale_factor * 2 if c.adapter_type == "full_adapter_xl" else self.adapter.strides[-1]

    def feature_shapes(self):
        """[(channels, downscale from the image)] of each feature map, in order."""
        c = self.config
        widths = [*c.channels, c.channels[-1]] if c.adapter_type == "light_adapter" else list(c.channels)
        return list(zip(widths, self.adapter.strides))

    def forward(self, image: torch.Tensor) -> list:
        if not torch.is_tensor(image) or image.dim() != 4 or image.shape[1] != self.config.in_channels:
            got = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
            raise ValueError(f"image must be a (B, {self.config.in_channels}, H, W) tensor for this adapter, got {got}")
        factor = self.downscale_factor
        if image.shape[2] % factor or image.shape[3] % factor:
            raise ValueError(f"image is {image.shape[3]}x{image.shape[2]}: this adapter takes sizes that are "
                             f"multiples of its downscale_factor {factor}")
        return self.adapter(image)


class MultiAdapter(nn.Module):
    """diffusers' MultiAdapter: several T2IAdapters of the same downscaling, their feature maps summed with
    ``adapter_weights`` (equal weights 1/n by default, as diffusers has it)."""

    def __init__(self, adapters):
        super().__init__()
        adapters = list(adapters)
        if len(adapters) < 2:
            raise ValueError(f"MultiAdapter takes two or more T2IAdapters, got {len(adapters)} (use the T2IAdapter "
                             "itself for one)")
        for i, adapter in enumerate(adapters):
            if not isinstance(adapter, T2IAdapter):
                raise TypeError(f"MultiAdapter: adapter {i} must be a diffusion_fast T2IAdapter, got "
                                f"{type(adapter).__name__}")
            if adapter.feature_shapes() != adapters[0].feature_shapes():
                raise ValueError(f"MultiAdapter: adapter {i}'s feature maps {adapter.feature_shapes()} differ from "
                                 f"adapter 0's {adapters[0].feature_shapes()}: they are summed, so they must match")
        self.adapters = nn.ModuleList(adapters)

    @property
    def dtype(self):
        return self.adapters[0].dtype

    @property
    def downscale_factor(self) -> int:
        return self.adapters[0].downscale_factor

    def feature_shapes(self):
        return self.adapters[0].feature_shapes()

    def forward(self, images, adapter_weights=None):
        """``images``: one (B, C, H, W) tensor per adapter; ``adapter_weights``: one number per adapter."""
        n = len(self.adapters)
        weights = [1.0 / n] * n if adapter_weights is None else list(adapter_weights)
        if len(images) != n or len(weights) != n:
            raise ValueError(f"MultiAdapter of {n} adapters: got {len(images)} images and {len(weights)} weights")
        total = None
        for image, weight, adapter in zip(images, weights, self.adapters):
            features = [weight * f for f in adapter(image)]
            total = features if total is None else [a + b for a, b in zip(total, features)]
        return total
