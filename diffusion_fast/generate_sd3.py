"""The CLI's ``generate`` for a Stable Diffusion 3 / 3.5 folder: text-to-image, its flags checked.

Our SD3 pipeline takes a prompt (for all three text encoders), a negative prompt, steps (28 by default, as
diffusers), guidance (7.0), size (the transformer's default: 1024 for SD3), batch, seed, clip skip and LoRAs
(diffusers' format). The UNet models' extras (image inputs, ControlNets, adapters, embeddings, a refiner, PAG, other
schedulers, eta) are refused by name, not ignored.
"""
from __future__ import annotations

import torch

from .cli import UsageError
from .generate_model import load_loras


def sd3_run(args, pipe):
    """(run(path_name, num_steps) -> the pipeline's output, the number of steps) for ``generate``."""
    flags = (("--image", args.image), ("--mask", args.mask), ("--control-image", args.control_image),
             ("--controlnet", args.controlnet), ("--t2i-adapter", args.t2i_adapter),
             ("--adapter-image", args.adapter_image), ("--ip-adapter", args.ip_adapter),
             ("--ip-adapter-image", args.ip_adapter_image), ("--embedding", args.embedding),
             ("--refiner", args.refiner), ("--pag-scale", args.pag_scale), ("--strength", args.strength),
             ("--image-guidance-scale", args.image_guidance_scale), ("--noise-level", args.noise_level),
             ("--depth-map", args.depth_map), ("--padding-mask-crop", args.padding_mask_crop),
             ("--no-safety-checker", args.no_safety_checker or None), ("--karras", args.karras or None),
             ("--eta", args.eta or None), ("--scheduler", None if args.scheduler == "model" else args.scheduler))
    refused = [flag for flag, value in flags if value not in (None, [])]
    if refused:
        raise UsageError(f"{args.model} is a Stable Diffusion 3 model (diffusers' StableDiffusion3Pipeline): its "
                         f"text-to-image run takes no {', '.join(refused)}")
    load_loras(args, pipe)  # (diffusers' SD3 LoRAs: the transformer's and the CLIP encoders')
    steps = args.steps or 28
    options = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                   num_images_per_prompt=args.batch, clip_skip=args.clip_skip, output_type="np")
    if args.guidance is not None:
        options["guidance_scale"] = args.guidance

    def run(path_name, num_steps=steps):
        from . import backend

        with backend(path_name):
            return pipe(args.prompt, num_inference_steps=num_steps,
                        generator=torch.Generator("cpu").manual_seed(args.seed), **options)

    return run, steps
