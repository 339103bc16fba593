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


def read_state_dict(folder, subfolder=None, variant=None) -> dict:
    from safetensors.torch import load_file

    path = os.path.join(os.fspath(folder), subfolder) if subfolder else os.fspath(folder)
    stem = f"{WEIGHTS}.{variant}" if variant else WEIGHTS
    single, index, pickle = (os.path.join(path, stem + ext) for ext in (".safetensors", ".safetensors.index.json", ".bin"))
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return state
    if os.path.isfile(pickle):
        return torch.load(pickle, map_location="cpu", weights_only=True)
    looked = ", ".join(os.path.basename(p) for p in (single, index, pickle))
    raise FileNotFoundError(f"no weights in {path!r} (looked for {looked})")


def load_strict(model: torch.nn.Module, state: dict, name: str) -> None:
    """Load ``state`` into ``model`` (built on the meta device) or raise one ValueError listing every problem."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        parts = [f"{label} ({len(items)}): {', '.join(items[:50])}{' ...' if len(items) > 50 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
                 if items]
        raise ValueError(f"{name}: the checkpoint does not match the config; " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=True)


def from_pretrained(cls, folder, subfolder=None, dtype=None, device=None, variant=None, convert=None):
    """Shared by the models: config -> meta-device model -> strict assign-load -> cast and move."""
    config = read_config(folder, subfolder)
    with torch.device("meta"):
        model = cls.from_config(config)
    state = read_state_dict(folder, subfolder, variant)
    if convert is not None:
        state = convert(state)
    load_strict(model, state, cls.__name__)
    for name, buf in list(model.named_buffers()):  # non-persistent buffers are recomputed on the real device
        if buf.is_meta:
            raise ValueError(f"{cls.__name__}: buffer {name} was not loaded")
    return model.to(device=device, dtype=dtype).eval()
