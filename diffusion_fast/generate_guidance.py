"""``diffusion-fast generate``'s guidance inputs: the conditioning images of ControlNets and T2I-Adapters and the
image prompts of IP-Adapters, read and checked against the flags before anything loads, and the adapters loaded
into the pipeline. Bad values raise UsageError, which ``cli.main`` prints as one line."""
from __future__ import annotations

import os

from .cli import UsageError


def open_image(flag, path):
    """The image file given to ``flag``, read (a missing or unreadable file is a UsageError naming the flag)."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: no such file: {path}")
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"{flag}: {path} is not an image PIL can read ({exc})") from None
    return image


def read_control_images(args):
    """--control-image files (one per --controlnet, when given, or per --control-mode of a ControlNet-Union net),
    checked and read before anything loads."""
    if not args.control_image:
        if args.controlnet or args.controlnet_scale or args.control_mode:
            raise UsageError("--controlnet, --controlnet-scale and --control-mode need --control-image (one per "
                             "ControlNet, or per control mode of a ControlNet-Union net)")
        return None
    if args.control_mode:
        if len(args.control_mode) != len(args.control_image):
            raise UsageError(f"--control-mode: give one per --control-image ({len(args.control_image)}), in order; "
                             f"got {len(args.control_mode)}")
    elif args.controlnet and len(args.control_image) != len(args.controlnet):
        raise UsageError(f"--control-image: give one per --controlnet ({len(args.controlnet)}), in order; got "
                         f"{len(args.control_image)}")
    if args.refiner is not None:
        raise UsageError("--controlnet: leave out --refiner (the refiner takes no ControlNet)")
    return [open_image("--control-image", path) for path in args.control_image]


def _has_image_encoder(model):
    """Whether the --model folder holds an image encoder of its own (a folder diffusers saved an SD3 pipeline with an
    IP-Adapter's SigLIP in)."""
    import json

    index = os.path.join(model, "model_index.json") if model else ""
    if not os.path.isfile(index):
        return False
    with open(index) as f:
        entry = json.load(f).get("image_encoder")
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and os.path.isdir(
        os.path.join(model, "image_encoder"))


def read_ip_adapter_images(args):
    """--ip-adapter-image files (one per --ip-adapter), checked and read before anything loads; None without any."""
    if not args.ip_adapter:
        if args.ip_adapter_image or args.ip_adapter_scale or args.image_encoder:
            raise UsageError("--ip-adapter-image, --ip-adapter-scale and --image-encoder are for IP-Adapters: give "
                             "--ip-adapter too")
        return None
    if len(args.ip_adapter_image) != len(args.ip_adapter):
        raise UsageError(f"--ip-adapter-image: give one per --ip-adapter ({len(args.ip_adapter)}), in order; got "
                         f"{len(args.ip_adapter_image)}")
    if len(args.ip_adapter_scale) not in (0, 1, len(args.ip_adapter)):
        raise UsageError(f"--ip-adapter-scale: give one for all IP-Adapters or one per --ip-adapter "
                         f"({len(args.ip_adapter)}); got {len(args.ip_adapter_scale)}")
    if args.refiner is not None:
        raise UsageError("--ip-adapter: leave out --refiner (the refiner takes no image prompt)")
    encoder = args.image_encoder or os.path.join(os.path.dirname(os.path.abspath(args.ip_adapter[0])), "image_encoder")
    if not os.path.isfile(os.path.join(encoder, "config.json")) and not _has_image_encoder(args.model):
        raise UsageError(f"--ip-adapter: no image encoder at {encoder} (CLIP's for SD and SDXL, SigLIP's for SD3: give "
                         "its folder with --image-encoder)")
    return [open_image("--ip-adapter-image", path).convert("RGB") for path in args.ip_adapter_image]


def load_ip_adapters(args, pipe):
    """The --ip-adapter files into ``pipe`` (the image encoder from --image-encoder), at their scales."""
    from transformers import CLIPVisionModelWithProjection

    encoder = args.image_encoder or os.path.join(os.path.dirname(os.path.abspath(args.ip_adapter[0])), "image_encoder")
    pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(encoder).to(pipe.device, pipe.dtype).eval()
    try:
        pipe.load_ip_adapter([os.path.dirname(os.path.abspath(p)) for p in args.ip_adapter], "",
                             [os.path.basename(p) for p in args.ip_adapter])
    except ValueError as exc:
        raise UsageError(f"--ip-adapter: {exc}") from None
    if args.ip_adapter_scale:
        pipe.set_ip_adapter_scale(args.ip_adapter_scale)
    print(f"loaded {len(args.ip_adapter)} IP-Adapter{'s' if len(args.ip_adapter) > 1 else ''}: "
          + ", ".join(args.ip_adapter))


def read_adapter_images(args):
    """--adapter-image files (one per --t2i-adapter, or per adapter of a --model folder diffusers saved an adapter
    pipeline in), checked and read before anything loads; None without any. A T2I-Adapter guides text-to-image
    alone, as diffusers' adapter pipelines do."""
    if not args.adapter_image:
        if args.t2i_adapter or args.adapter_scale or args.adapter_factor is not None:
            raise UsageError("--t2i-adapter, --adapter-scale and --adapter-factor need --adapter-image (one per "
                             "T2I-Adapter)")
        return None
    if args.t2i_adapter and len(args.adapter_image) != len(args.t2i_adapter):
        raise UsageError(f"--adapter-image: give one per --t2i-adapter ({len(args.t2i_adapter)}), in order; got "
                         f"{len(args.adapter_image)}")
    if len(args.adapter_scale) not in (0, 1, len(args.adapter_image)):
        raise UsageError(f"--adapter-scale: give one for all T2I-Adapters or one per adapter "
                         f"({len(args.adapter_image)}); got {len(args.adapter_scale)}")
    if args.adapter_factor is not None and not 0 <= args.adapter_factor <= 1:
        raise UsageError(f"--adapter-factor must be a fraction in [0, 1], got {args.adapter_factor}")
    for flag, given in (("--image", args.image), ("--controlnet", args.controlnet), ("--refiner", args.refiner)):
        if given:
            raise UsageError(f"--adapter-image: leave out {flag} (a T2I-Adapter guides text-to-image alone)")
    return [open_image("--adapter-image", path) for path in args.adapter_image]


def with_t2i_adapters(args, pipe, images, dtype, device):
    """The adapter pipeline (SD or SDXL, by ``pipe``) on ``pipe``'s components with the --t2i-adapter folders, or
    ``pipe`` itself with its own adapters (a folder diffusers saved an adapter pipeline in); ``images``
    (--adapter-image) one per adapter."""
    from .models import T2IAdapter
    from .pipeline_t2i_adapter import (AdapterGuidance, StableDiffusionAdapterPipeline,
                                       StableDiffusionXLAdapterPipeline)

    if not args.t2i_adapter:
        if not isinstance(pipe, AdapterGuidance):
            raise UsageError("--adapter-image is for T2I-Adapters: give --t2i-adapter too (or a --model folder "
                             "diffusers saved an adapter pipeline in)")
        if images is None or len(images) != len(pipe._adapters):
            raise UsageError(f"{args.model} is a T2I-Adapter pipeline with {len(pipe._adapters)} adapter"
                             f"{'s' if len(pipe._adapters) > 1 else ''}: give --adapter-image for each")
        return pipe
    adapters = [T2IAdapter.from_pretrained(path, dtype=dtype, device=device) for path in args.t2i_adapter]
    cls = StableDiffusionXLAdapterPipeline if hasattr(pipe, "text_encoder_2") else StableDiffusionAdapterPipeline
    try:
        pipe = cls.from_pipeline(pipe, adapters[0] if len(adapters) == 1 else adapters, cuda_graph=pipe.cuda_graph,
                                 channels_last=pipe.channels_last)
    except ValueError as exc:
        raise UsageError(f"--t2i-adapter: {exc}") from None
    print(f"loaded {len(adapters)} T2I-Adapter{'s' if len(adapters) > 1 else ''}: " + ", ".join(args.t2i_adapter))
    return pipe
