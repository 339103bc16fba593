"""Reading a diffusers pipeline folder: its model_index.json, its components (ours for the UNet, VAE and scheduler;
transformers' for the text encoders and tokenizers), dtype names. Shared by the SD and SDXL pipelines."""
from __future__ import annotations

import json
import os

import torch

from .models import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from .models.loading import read_config
from .schedulers import load_scheduler


def resolve_dtype(dtype):
    """A torch.dtype from itself or its name ("fp16", "float16", ...); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}


def vae_class(folder, subfolder=None):
    """Our VAE class for a diffusers VAE folder, by its config's ``_class_name`` (AutoencoderKL without one); another
    diffusers VAE (an asymmetric or consistency decoder, a video VAE) is refused by name."""
    name = read_config(folder, subfolder).get("_class_name") or "AutoencoderKL"
    if name not in VAE_CLASSES:
        where = os.path.join(os.fspath(folder), subfolder) if subfolder else os.fspath(folder)
        raise ValueError(f"{where!r} holds a {name}, which is not supported (VAEs: {sorted(VAE_CLASSES)})")
    return VAE_CLASSES[name]


class ComponentLoader:
    """Loads a pipeline folder's components by name: the UNet (or SD3's transformer) and VAE as ours, text encoders as the given
    transformers class, tokenizers as CLIPTokenizer, the scheduler as ours. Checked up front: a required component
    neither passed (``given``) nor in the folder, and a passed name the pipeline does not take, are one error each.
    ``optional`` components may be null in model_index.json (an SDXL refiner's first text encoder) and load as None."""

    def __init__(self, folder, index, names, optional, given, dtype, device, variant):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise TypeError(f"from_pretrained got components it does not take: {unknown} (it takes {list(names)})")
        def listed(c):  # model_index.json names it as [library, class], not [null, null]
            entry = index.get(c)
            return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None

        self.absent = {c for c in optional if c not in given and not listed(c)}
        missing = [c for c in names if c not in given and c not in self.absent
                   and (not listed(c) or not os.path.isdir(os.path.join(folder, c)))]
        if missing:
            raise FileNotFoundError(f"{folder!r} lacks the pipeline components {missing}")
        self.folder, self.index, self.given, self.variant = folder, index, given, variant
        self.dtype, self.device = resolve_dtype(dtype), device

    def __call__(self, name, text_model_cls=None):
        """The component ``name``; ``text_model_cls``: the transformers class of a text encoder, a depth estimator
        or a feature extractor."""
        if name in self.given:
            return self.given[name]
        if name in self.absent:
            return None
        path = os.path.join(self.folder, name)
        if name == "transformer":  # (SD3's MMDiT)
            from .models.sd3_transformer import SD3Transformer2DModel

            return SD3Transformer2DModel.from_pretrained(self.folder, subfolder=name, dtype=self.dtype,
                                                         device=self.device, variant=self.variant)
        if name.startswith("unet") or name.startswith("vae"):
            model_cls = UNet2DConditionModel if name.startswith("unet") else vae_class(self.folder, name)
            return model_cls.from_pretrained(self.folder, subfolder=name, dtype=self.dtype, device=self.device,
                                             variant=self.variant)
        if name.startswith("tokenizer"):  # (CLIP's, or the class given: SD3's T5 tokenizer)
            from transformers import CLIPTokenizer

            return (text_model_cls or CLIPTokenizer).from_pretrained(path)
        if name in ("scheduler", "low_res_scheduler"):  # (the x4 upscaler's noises its image)
            # (a flow model's scheduler we don't mirror falls back to flow-matching Euler, with a warning)
            flow = "transformer" in self.index
            return load_scheduler(path, "FlowMatchEulerDiscreteScheduler" if flow else "DDIMScheduler")
        if name == "safety_checker":
            from .safety_checker import StableDiffusionSafetyChecker

            return StableDiffusionSafetyChecker.from_pretrained(path, dtype=self.dtype, device=self.device,
                                                                variant=self.variant)
        if name == "feature_extractor":  # (the safety checker's CLIP processor, or the class given: a depth
            from transformers import CLIPImageProcessor  # estimator's)

            return (text_model_cls or CLIPImageProcessor).from_pretrained(path)
        encoder = text_model_cls.from_pretrained(path)
        return encoder.to(device=self.device, dtype=self.dtype or encoder.dtype).eval()


def read_model_index(folder):
    """(the folder as a str, its model_index.json as a dict): a missing folder or index is a clear error."""
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path (str or os.PathLike), got {type(folder).__name__}")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder {folder!r} does not exist")
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{folder!r} is not a diffusers pipeline folder: no model_index.json")
    with open(index) as f:
        return folder, json.load(f)


def check_model_config(name, model, field, what):
    """A component passed in must be a model with ``config.<field>`` (what the pipeline reads from it)."""
    if not hasattr(getattr(model, "config", None), field):
        raise TypeError(f"{name} must be a model with config.{field} ({what}), got {type(model).__name__}")
