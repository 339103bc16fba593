"""The CLI's ``generate`` for a Stable Diffusion 3 / 3.5 folder: text-to-image, its flags checked.

Our SD3 pipeline takes a prompt (for all three text encoders), a negative prompt, steps (28 by default, as
diffusers), guidance (7.0), size (the transformer's default: 1024 for SD3), batch, seed, clip skip and LoRAs
(diffusers' format); with --image it runs image-to-image at --strength, and with --mask too inpainting (an
inpainting folder's transformer, or SD3's own, blended), with --padding-mask-crop if asked; with --controlnet (SD3
ControlNets) and --control-image, text-to-image guided by them; with --pag-scale (or a folder diffusers saved its SD3
PAG pipeline in) text-to-image or image-to-image with perturbed-attention guidance; with --ip-adapter (InstantX's
SD3.5 Large kind) and --ip-adapter-image, prompted by the image too. The UNet models' extras (T2I-Adapters,
embeddings, a refiner, other schedulers, eta) are refused by name, not ignored.
"""
from __future__ import annotations

import numpy as np
import torch

from .cli import UsageError
from .generate_model import load_loras, pag_options


def _with_sd3_controlnets(args, pipe, images):
    """The SD3 ControlNet pipeline on ``pipe``'s components with the --controlnet folders (or the model folder's own
    net); ``images``: one --control-image per net."""
    from .models.controlnet_sd3 import SD3ControlNetModel
    from .models.loading import read_config
    from .pipeline_sd3_controlnet import StableDiffusion3ControlNetPipeline

    if args.controlnet:
        nets = []
        for path in args.controlnet:
            kind = read_config(path).get("_class_name")
            if kind != "SD3ControlNetModel":
                raise UsageError(f"--controlnet {path} holds a {kind}, not an SD3 ControlNet (SD3ControlNetModel): "
                                 f"{args.model} is a Stable Diffusion 3 model")
            nets.append(SD3ControlNetModel.from_pretrained(path, dtype=pipe.dtype, device=pipe.device))
        try:
            pipe = StableDiffusion3ControlNetPipeline.from_pipe(pipe, controlnet=nets[0] if len(nets) == 1 else nets)
        except ValueError as err:
            raise UsageError(f"--controlnet: {err}") from None
    elif not isinstance(pipe, StableDiffusion3ControlNetPipeline):
        raise UsageError("--control-image is for ControlNet: give --controlnet too (or a --model folder diffusers "
                         "saved an SD3 ControlNet pipeline in)")
    if len(images) != len(pipe._nets):
        raise UsageError(f"--control-image: give one per ControlNet ({len(pipe._nets)}), got {len(images)}")
    if len(args.controlnet_scale) not in (0, 1, len(pipe._nets)):
        raise UsageError(f"--controlnet-scale: one for all or one per ControlNet ({len(pipe._nets)}), got "
                         f"{len(args.controlnet_scale)}")
    return pipe


def _with_sd3_ip_adapter(args, pipe):
    """The --ip-adapter file (InstantX's SD3.5-Large-IP-Adapter kind) loaded into ``pipe``, its SigLIP image encoder
    from --image-encoder, else image_encoder/ beside the file, else the model folder's own; at --ip-adapter-scale
    (the adapter's 0.5 by default, as diffusers')."""
    import os

    from transformers import SiglipImageProcessor, SiglipVisionModel

    from .pipeline_sd3_controlnet import StableDiffusion3ControlNetPipeline

    if len(args.ip_adapter) > 1 or len(args.ip_adapter_scale) > 1:
        raise UsageError("--ip-adapter: an SD3 model takes one IP-Adapter (and one --ip-adapter-scale)")
    if isinstance(pipe, StableDiffusion3ControlNetPipeline) or args.pag_scale is not None:
        raise UsageError("--ip-adapter: with an SD3 model it prompts text-to-image, image-to-image and inpainting, "
                         "not with --controlnet or --pag-scale (neither does diffusers)")
    path = os.path.abspath(args.ip_adapter[0])
    encoder = args.image_encoder or os.path.join(os.path.dirname(path), "image_encoder")
    if os.path.isfile(os.path.join(encoder, "config.json")):
        pipe.image_encoder = SiglipVisionModel.from_pretrained(encoder).to(pipe.device, pipe.dtype).eval()
        # the folder's processor, else one sized from the encoder's config (load_ip_adapter makes it)
        pipe.feature_extractor = (SiglipImageProcessor.from_pretrained(encoder) if os.path.isfile(
            os.path.join(encoder, "preprocessor_config.json")) else None)
    try:
        pipe.load_ip_adapter(os.path.dirname(path), weight_name=os.path.basename(path), image_encoder_folder=None)
    except ValueError as exc:
        raise UsageError(f"--ip-adapter: {exc}") from None
    if args.ip_adapter_scale:
        pipe.set_ip_adapter_scale(args.ip_adapter_scale[0])
    print(f"loaded the IP-Adapter {args.ip_adapter[0]}")


def sd3_run(args, pipe, init_image=None, mask_image=None, control_images=None, ip_images=None):
    """(run(path_name, num_steps) -> the pipeline's output, the number of steps that run) for ``generate``: text to
    image, or with ``init_image`` (--image) image to image at --strength (0.6 by default, as diffusers), and with
    ``mask_image`` (--mask) inpainting at --strength (0.6 too); the output the image's size cut to a multiple of what
    the model takes (with --padding-mask-crop the model's size or --height/--width, pasted into the image)."""
    from .pipeline_sd3 import StableDiffusion3Pipeline
    from .pipeline_sd3_controlnet import StableDiffusion3ControlNetPipeline
    from .pipeline_sd3_controlnet_inpaint import StableDiffusion3ControlNetInpaintingPipeline
    from .pipeline_sd3_img2img import StableDiffusion3Img2ImgPipeline
    from .pipeline_sd3_inpaint import StableDiffusion3InpaintPipeline

    flags = (("--control-mode", args.control_mode), ("--t2i-adapter", args.t2i_adapter),
             ("--adapter-image", args.adapter_image), ("--embedding", args.embedding),
             ("--refiner", args.refiner),
             ("--image-guidance-scale", args.image_guidance_scale), ("--noise-level", args.noise_level),
             ("--depth-map", args.depth_map),
             ("--no-safety-checker", args.no_safety_checker or None), ("--karras", args.karras or None),
             ("--eta", args.eta or None), ("--scheduler", None if args.scheduler == "model" else args.scheduler))
    refused = [flag for flag, value in flags if value not in (None, [])]
    if refused:
        raise UsageError(f"{args.model} is a Stable Diffusion 3 model (diffusers' StableDiffusion3Pipeline): it "
                         f"takes no {', '.join(refused)}")
    loaded = pipe  # (the folder's pipeline: a PAG one's layers and scale carry over to the run's)
    inpainting_model = pipe.transformer.config.in_channels != pipe.vae.config.latent_channels
    if inpainting_model and mask_image is None:
        raise UsageError(f"{args.model} is an inpainting model (its transformer takes the mask): give --image and "
                         "--mask")
    net_inpainting = isinstance(pipe, StableDiffusion3ControlNetInpaintingPipeline)  # (a folder of that pipeline)
    if net_inpainting and (init_image is None or mask_image is None or control_images is not None or args.controlnet
                           or args.strength is not None or args.padding_mask_crop is not None):
        raise UsageError(f"{args.model} is an SD3 ControlNet inpainting pipeline: give --image and --mask (the image "
                         "its nets inpaint and the mask), and no --control-image, --controlnet, --strength or "
                         "--padding-mask-crop")
    load_loras(args, pipe)  # (diffusers' SD3 LoRAs: the transformer's and the CLIP encoders')
    steps = args.steps or (50 if init_image is not None and not net_inpainting else 28)  # (diffusers' defaults)
    options = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                   num_images_per_prompt=args.batch, clip_skip=args.clip_skip, output_type="np")
    if args.guidance is not None:
        options["guidance_scale"] = args.guidance
    denoised = steps
    if net_inpainting:  # (the image and mask go to the nets; the transformer samples from noise)
        control_images, options["control_mask"], init_image = [init_image], mask_image, None
    if control_images is not None:  # (the first image sets the size, unless --height/--width do)
        if init_image is not None:
            raise UsageError("--controlnet with an SD3 model guides text-to-image only here: leave out --image")
        pipe = _with_sd3_controlnets(args, pipe, control_images)
        multiple = pipe.vae_scale_factor * pipe.transformer.config.patch_size
        size = control_images[0].size
        width, height = (given or x - x % multiple for given, x in zip((args.width, args.height), size))
        scales = args.controlnet_scale or [1.0]
        options.update(control_image=control_images[0] if len(control_images) == 1 else control_images,
                       controlnet_conditioning_scale=scales[0] if len(scales) == 1 else scales, height=height,
                       width=width)
    elif isinstance(pipe, StableDiffusion3ControlNetPipeline):
        raise UsageError(f"{args.model} is an SD3 ControlNet pipeline: give --control-image")
    elif init_image is None and type(pipe) is not StableDiffusion3Pipeline:  # (image-to-image or inpainting folder)
        pipe = StableDiffusion3Pipeline.from_pipe(pipe)
    if init_image is not None:
        cls = StableDiffusion3Img2ImgPipeline if mask_image is None else StableDiffusion3InpaintPipeline
        if type(pipe) is not cls:
            pipe = cls.from_pipe(pipe)
        multiple = pipe.vae_scale_factor * pipe.transformer.config.patch_size
        width, height = (x - x % multiple for x in init_image.size)
        if width == 0 or height == 0:
            raise UsageError(f"--image is {init_image.size[0]}x{init_image.size[1]}: smaller than {multiple} pixels")
        if args.padding_mask_crop is not None:  # the box at the model's size (or --height/--width), pasted back
            width, height = args.width, args.height
            options.update(padding_mask_crop=args.padding_mask_crop, output_type="pil")
        if mask_image is not None:
            options.update(mask_image=mask_image)
        strength = 0.6 if args.strength is None else args.strength
        options.update(image=init_image, strength=strength, height=height, width=width)
        denoised = steps - int(max(steps - steps * strength, 0))  # (diffusers' SD3 tail: see pipeline_sd3_img2img)
    if ip_images is not None:
        _with_sd3_ip_adapter(args, pipe)
        options.update(ip_adapter_image=ip_images[0])
    pipe, pag = pag_options(args, loaded, pipe)  # (text-to-image and image-to-image: diffusers' SD3 PAG pipelines)
    options.update(pag)
    pipe.set_progress_bar_config(disable=args.no_progress)

    def run(path_name, num_steps=steps):
        from . import backend

        torch.manual_seed(args.seed)  # (the global generator too: an SD3 ControlNet's control image is sampled from it)
        with backend(path_name):
            output = pipe(args.prompt, num_inference_steps=num_steps,
                          generator=torch.Generator("cpu").manual_seed(args.seed), **options)
        if options["output_type"] == "pil":  # (pasted into the image, which diffusers does as PIL only)
            output.images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in output.images])
        return output

    return run, denoised
