"""Configs and weights from a diffusers folder: config.json plus safetensors, loaded strictly.

Weights: ``diffusion_pytorch_model[.variant].safetensors``, or a sharded ``*.safetensors.index.json``; a pickle
``.bin`` only through ``torch.load(weights_only=True)``. Missing, unexpected and mis-shaped weights are reported in
one error listing all of them: a layer is never left randomly initialised in silence.
"""
from __future__ import annotations

import json
import os

import torch

from .._config import FrozenConfig

WEIGHTS = "diffusion_pytorch_model"


def make_config(cls_name: str, defaults: dict, unsupported: dict, given: dict) -> FrozenConfig:
    """diffusers' defaults filled in; a field we don't implement at a non-default value is a ValueError naming it."""
    given = {k: v for k, v in given.items() if not k.startswith("_")}
    for field, allowed in unsupported.items():
        if field in given and given[field] != allowed and not (isinstance(allowed, tuple) and given[field] in allowed):
            raise ValueError(f"{cls_name}: config field {field}={given[field]!r} is not supported "
                             f"(supported: {allowed!r})")
    known = set(defaults) | set(unsupported)
    return FrozenConfig({**defaults, **{k: v for k, v in given.items() if k in known}})


def read_config(folder, subfolder=None) -> dict:
    path = os.path.join(os.fspath(folder), subfolder) if subfolder else os.fspath(folder)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path!r} has no config.json")
    with open(config_path) as f:
        return json.load(f)


def weight_files(path, variant=None) -> tuple:
    """The weight files we look for, in order: one safetensors, a sharded safetensors index, a pickle ``.bin``.

    Variant names follow diffusers' ``_add_variant`` (the variant goes before the last suffix:
    ``diffusion_pytorch_model.fp16.safetensors``, ``diffusion_pytorch_model.safetensors.index.fp16.json``).
    """
    def named(name):
        if not variant:
            return os.path.join(path, name)
        parts = name.split(".")
        return os.path.join(path, ".".join(parts[:-1] + [variant] + parts[-1:]))

    return named(f"{WEIGHTS}.safetensors"), named(f"{WEIGHTS}.safetensors.index.json"), named(f"{WEIGHTS}.bin")


def read_state_dict(folder, subfolder=None, variant=None, device=None) -> dict:
    from safetensors.torch import load_file

    path = os.path.join(os.fspath(folder), subfolder) if subfolder else os.fspath(folder)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    target = str(device) if device is not None else "cpu"
    single, index, pickle = weight_files(path, variant)
    if os.path.isfile(single):
        return load_file(single, device=target)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index!r} has no 'weight_map' (expected a sharded safetensors index)")
        state = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{index!r} names shard {shard!r}, which is not in {path!r}")
            state.update(load_file(shard_path, device=target))
        return state
    if os.path.isfile(pickle):
        try:  # weights_only: a pickle may hold only tensors and plain containers, never code to run
            state = torch.load(pickle, map_location=target, weights_only=True)
        except Exception as err:  # noqa: BLE001  (UnpicklingError and friends: report which file, why)
            raise ValueError(f"{pickle!r} could not be loaded with torch.load(weights_only=True): {err}") from None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{pickle!r} does not hold a state dict (a dict of name -> tensor)")
        return state
    looked = ", ".join(os.path.basename(p) for p in (single, index, pickle))
    raise FileNotFoundError(f"no weights in {path!r} (looked for {looked})")


def state_problems(model: torch.nn.Module, state: dict) -> list:
    """What keeps ``state`` from loading into ``model``: its missing, unexpected and mis-shaped weights, one line
    per kind (none: it loads)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    return [f"{label} ({len(items)}): {', '.join(items[:50])}{' ...' if len(items) > 50 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
            if items]


def load_strict(model: torch.nn.Module, state: dict, name: str) -> None:
    """Load ``state`` into ``model`` (built on the meta device) or raise one ValueError listing every problem."""
    problems = state_problems(model, state)
    if problems:
        raise ValueError(f"{name}: the checkpoint does not match the config; " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)


def from_pretrained(cls, folder, dtype=None, device=None, subfolder=None, variant=None, convert=None):
    """Shared by the models: config -> meta-device model -> strict assign-load -> cast and move."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device {device!r} is not a valid torch device: {err}") from None
    config = read_config(folder, subfolder)
    with torch.device("meta"):  # no random init of hundreds of millions of parameters that are overwritten anyway
        model = cls.from_config(config)
    state = read_state_dict(folder, subfolder, variant, device)
    if convert is not None:
        state = convert(state)
    load_strict(model, state, cls.__name__)
    for name, buf in list(model.named_buffers()):  # non-persistent buffers are recomputed on the real device
        if buf.is_meta:
            raise ValueError(f"{cls.__name__}: buffer {name} was not loaded")
    return model.to(device=device, dtype=dtype).eval()


class PretrainedMixin:
    """``from_config`` and ``from_pretrained`` for the models (a subclass may override ``convert_state_dict``), and
    their ``dtype`` and ``device``: their first weight's."""

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @property
    def device(self):
        return next(self.parameters()).device

    @staticmethod
    def convert_state_dict(state: dict) -> dict:
        """Rename or reshape checkpoint keys before the strict load (identity unless overridden)."""
        return state

    @classmethod
    def from_config(cls, config, **changes):
        """A randomly initialised model from a config dict or a folder holding config.json (``changes`` override)."""
        if isinstance(config, (str, os.PathLike)):
            config = read_config(config)
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict or a folder path, got {type(config).__name__}")
        return cls({**config, **changes})

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None, subfolder=None, variant=None):
        """Load a diffusers folder unchanged: config.json + weights, strictly (every key present, none extra)."""
        return from_pretrained(cls, folder, dtype, device, subfolder, variant, convert=cls.convert_state_dict)
