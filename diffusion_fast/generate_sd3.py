"""The CLI's ``generate`` for a Stable Diffusion 3 / 3.5 folder: text-to-image, its flags checked.

Our SD3 pipeline takes a prompt (for all three text encoders), a negative prompt, steps (28 by default, as
diffusers), guidance (7.0), size (the transformer's default: 1024 for SD3), batch, seed, clip skip and LoRAs
(diffusers' format); with --image it runs image-to-image at --strength, and with --mask too inpainting (an
inpainting folder's transformer, or SD3's own, blended), with --padding-mask-crop if asked. The UNet models' extras
(ControlNets, adapters, embeddings, a refiner, PAG, other schedulers, eta) are refused by name, not ignored.
"""
from __future__ import annotations

import numpy as np
import torch

from .cli import UsageError
from .generate_model import load_loras


def sd3_run(args, pipe, init_image=None, mask_image=None):
    """(run(path_name, num_steps) -> the pipeline's output, the number of steps that run) for ``generate``: text to
    image, or with ``init_image`` (--image) image to image at --strength (0.6 by default, as diffusers), and with
    ``mask_image`` (--mask) inpainting at --strength (0.6 too); the output the image's size cut to a multiple of what
    the model takes (with --padding-mask-crop the model's size or --height/--width, pasted into the image)."""
    from .pipeline_sd3 import StableDiffusion3Pipeline
    from .pipeline_sd3_img2img import StableDiffusion3Img2ImgPipeline
    from .pipeline_sd3_inpaint import StableDiffusion3InpaintPipeline

    flags = (("--control-image", args.control_image),
             ("--controlnet", args.controlnet), ("--t2i-adapter", args.t2i_adapter),
             ("--adapter-image", args.adapter_image), ("--ip-adapter", args.ip_adapter),
             ("--ip-adapter-image", args.ip_adapter_image), ("--embedding", args.embedding),
             ("--refiner", args.refiner), ("--pag-scale", args.pag_scale),
             ("--image-guidance-scale", args.image_guidance_scale), ("--noise-level", args.noise_level),
             ("--depth-map", args.depth_map),
             ("--no-safety-checker", args.no_safety_checker or None), ("--karras", args.karras or None),
             ("--eta", args.eta or None), ("--scheduler", None if args.scheduler == "model" else args.scheduler))
    refused = [flag for flag, value in flags if value not in (None, [])]
    if refused:
        raise UsageError(f"{args.model} is a Stable Diffusion 3 model (diffusers' StableDiffusion3Pipeline): it "
                         f"takes no {', '.join(refused)}")
    inpainting_model = pipe.transformer.config.in_channels != pipe.vae.config.latent_channels
    if inpainting_model and mask_image is None:
        raise UsageError(f"{args.model} is an inpainting model (its transformer takes the mask): give --image and "
                         "--mask")
    load_loras(args, pipe)  # (diffusers' SD3 LoRAs: the transformer's and the CLIP encoders')
    steps = args.steps or (50 if init_image is not None else 28)  # (diffusers' defaults)
    options = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                   num_images_per_prompt=args.batch, clip_skip=args.clip_skip, output_type="np")
    if args.guidance is not None:
        options["guidance_scale"] = args.guidance
    denoised = steps
    if init_image is None and type(pipe) is not StableDiffusion3Pipeline:  # (an image-to-image or inpainting folder)
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
    pipe.set_progress_bar_config(disable=args.no_progress)

    def run(path_name, num_steps=steps):
        from . import backend

        with backend(path_name):
            output = pipe(args.prompt, num_inference_steps=num_steps,
                          generator=torch.Generator("cpu").manual_seed(args.seed), **options)
        if options["output_type"] == "pil":  # (pasted into the image, which diffusers does as PIL only)
            output.images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in output.images])
        return output

    return run, denoised
