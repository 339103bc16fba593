"""Reading LoRA files: the formats diffusers reads for SD and SDXL (diffusers/PEFT, older diffusers, kohya with
diffusers' or SGM's UNet names) and SD3's diffusers/PEFT files, each key mapped to the module it adapts, and each module's (down, up, scale) checked
against the module's weight; what cannot be merged refused with every offending key named. ``lora`` merges them."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights name
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")  # (transformer: SD3's, diffusers' format)
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LoHa", "lokr_": "LoKr",
                "lora_mid": "LoCon's Tucker decomposition", ".diff": "a full-weight diff", ".diff_b": "a bias diff"}
# older diffusers attention-processor names -> the module they adapt, in the UNet and in a CLIP text encoder
_PROCESSOR_NAMES = {"unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
                    "text": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj",
                             "to_out_lora": "out_proj"}}
# a resnet's modules in SGM's (kohya's SDXL) UNet
_SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
               "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


@dataclass(frozen=True)
class LoraFactor:
    component: str  # "unet" (or SD3's "transformer"), "text_encoder" or "text_encoder_2"
    module: str  # the adapted module's name in that component, e.g. "down_blocks.0.attentions.0.proj_in"
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    scale: float  # alpha / r (alpha / sqrt(r) with rsLoRA); 1 when the file gives no alpha


def read_lora(lora, weight_name=None) -> tuple[dict, dict | None]:
    """(state dict, diffusers' adapter metadata or None) from a .safetensors file, a folder holding one, or a dict."""
    if isinstance(lora, dict):
        bad = [k for k, v in lora.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"lora: a state dict maps names to tensors; these entries do not: {bad[:5]}")
        return dict(lora), None
    if not isinstance(lora, (str, os.PathLike)):
        raise TypeError(f"lora must be a path (a .safetensors file or a folder) or a state dict, got "
                        f"{type(lora).__name__}")
    path = os.fspath(lora)
    if os.path.isdir(path):
        if weight_name is None:
            found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            weight_name = LORA_FILE if LORA_FILE in found else (found[0] if len(found) == 1 else None)
            if weight_name is None:
                raise ValueError(f"lora: {path!r} holds {len(found)} .safetensors files and none is {LORA_FILE}: "
                                 f"name one with weight_name= ({found[:5]})")
        path = os.path.join(path, weight_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lora: {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        return load_file(path), (json.loads(raw) if raw else None)
    try:  # a pickle only through weights_only: tensors and plain containers, never code to run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"lora: {path!r} is neither safetensors nor a weights-only torch file: {error}") from None
    if not isinstance(state, dict):
        raise ValueError(f"lora: {path!r} holds a {type(state).__name__}, not a state dict")
    return read_lora(state)  # (its entries checked as a dict's are)


def lora_factors(state: dict, metadata: dict | None, models: dict) -> list[LoraFactor]:
    """Each adapted weight's factors and scale; one ValueError lists every key that is unsupported, matches no
    module of ``models`` ({component: module}) or does not fit its weight."""
    unsupported = sorted(f"{k} ({kind})" for k in state for mark, kind in _UNSUPPORTED.items() if mark in k)
    if unsupported:
        raise ValueError(f"lora: only plain LoRA (and LoCon) is supported; these keys are not: {unsupported[:8]}"
                         + (f" and {len(unsupported) - 8} more" if len(unsupported) > 8 else ""))
    pairs, alphas, unmatched, names = {}, {}, [], {}
    for key in state:
        parsed = _parse_key(key)
        if parsed is None:
            unmatched.append(key)
            continue
        component, name, role = parsed
        if component == "denoiser":
            component = "transformer" if "transformer" in models else "unet"
        if component not in models or models[component] is None:
            unmatched.append(f"{key} (this pipeline has no {component})")
            continue
        if component not in names:
            names[component] = _module_names(models[component])
        modules, kohya = names[component]
        module = kohya.get(name) if key.startswith("lora_") else (name if name in modules else None)
        if module is None:
            unmatched.append(key)
        elif role == "alpha" and state[key].numel() != 1:
            unmatched.append(f"{key} (an alpha of shape {tuple(state[key].shape)})")
        elif role == "alpha":
            alphas[(component, module)] = float(state[key])
        else:
            pairs.setdefault((component, module), {})[role] = state[key]
    factors, misfit = [], []
    for (component, module), found in pairs.items():
        if set(found) != {"up", "down"}:
            misfit.append(f"{component}.{module} (has only lora {'/'.join(found)})")
            continue
        weight = models[component].get_parameter(module + ".weight")
        up, down = found["up"], found["down"]
        problem = _shape_problem(weight.shape, up.shape, down.shape)
        if problem:
            misfit.append(f"{component}.{module}: {problem}")
            continue
        rank = down.shape[0]
        alpha, rslora = _metadata_alpha(metadata, component, module, rank)
        alpha = alphas.get((component, module), alpha)
        factors.append(LoraFactor(component, module, up, down, alpha / (rank ** 0.5 if rslora else rank)))
    orphans = sorted(f"{c}.{m}" for c, m in set(alphas) - set(pairs))
    problems = ([f"keys matching no module: {unmatched[:8]}" + (f" and {len(unmatched) - 8} more"
                                                                  if len(unmatched) > 8 else "")] if unmatched else [])
    problems += [f"factors that do not fit: {misfit}"] if misfit else []
    problems += [f"alphas without factors: {orphans}"] if orphans else []
    if problems:
        raise ValueError("lora: " + "; ".join(problems))
    if not factors:
        raise ValueError("lora: the state dict holds no LoRA factors")
    return factors


def _parse_key(key):
    """(component, module name as written, "up" | "down" | "alpha") or None."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name, _, suffix = key[len(prefix):].partition(".")
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
            return (component, name, role) if role else None
    component = "denoiser"  # diffusers reads unprefixed keys as the UNet's (SD3's: the transformer's)
    for c in COMPONENTS:
        if key.startswith(c + "."):
            component, key = c, key[len(c) + 1:]
            break
    for suffix, role in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                         (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
                         (".lora_linear_layer.up.weight", "up"), (".down.weight", "down"), (".up.weight", "up"),
                         (".alpha", "alpha")):
        if key.endswith(suffix):
            name = key[:-len(suffix)]
            kind = "text" if component.startswith("text_encoder") else "unet"
            head, _, last = name.rpartition(".")
            if last in _PROCESSOR_NAMES[kind]:  # an older attention-processor LoRA
                name = head.removesuffix(".processor") + "." + _PROCESSOR_NAMES[kind][last]
            elif suffix in (".down.weight", ".up.weight"):
                return None
            return component, name, role
    return None


def _module_names(model):
    """(the names of ``model``'s modules with a weight of 2 or 4 dims, {kohya name: module name}). kohya names replace
    the dots by underscores, and name a UNet as diffusers does (SD 1.x/2.x) or as SGM does (SDXL)."""
    modules = {n.removesuffix(".weight") for n, p in model.named_parameters()
               if n.endswith(".weight") and p.dim() in (2, 4)}
    kohya = {m.replace(".", "_"): m for m in modules}
    if hasattr(model.config, "down_block_types"):
        kohya.update({sgm.replace(".", "_"): m for m in modules if (sgm := _sgm_name(model.config, m)) is not None})
    return modules, kohya


def _sgm_name(config, name):
    """diffusers' UNet module name -> SGM's (the UNet kohya trains SDXL on), or None where SGM has no such module."""
    if name in _SGM_TOP:
        return _SGM_TOP[name]
    layers, parts = config.layers_per_block, name.split(".")
    if not isinstance(layers, int) or len(parts) < 4:
        return None

    def inner(kind, rest):  # a resnet's modules are renamed, an attention block's are not
        head, *tail = rest
        return ".".join([_SGM_RESNET.get(head, head) if kind == "resnets" else head, *tail])

    if parts[0] == "mid_block" and parts[2].isdigit():  # resnet 0, attention, resnet 1
        index = 1 if parts[1] == "attentions" else 2 * int(parts[2])
        return f"middle_block.{index}.{inner(parts[1], parts[3:])}"
    if parts[0] not in ("down_blocks", "up_blocks") or len(parts) < 5 or not (parts[1] + parts[3]).isdigit():
        return None
    i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":  # input_blocks.0 is conv_in; each down block has layers + 1 entries
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * (layers + 1)}.0.op" if rest == ["conv"] else None
        return f"input_blocks.{1 + i * (layers + 1) + j}.{int(kind == 'attentions')}.{inner(kind, rest)}"
    if kind == "upsamplers":  # after the last layer's resnet (and attention, if the block has them)
        with_attention = "CrossAttn" in config.up_block_types[i]
        return f"output_blocks.{i * (layers + 1) + layers}.{2 if with_attention else 1}.{'.'.join(rest)}"
    return f"output_blocks.{i * (layers + 1) + j}.{int(kind == 'attentions')}.{inner(kind, rest)}"


def _shape_problem(weight, up, down):
    if len(up) not in (2, 4) or len(down) not in (2, 4) or (len(up) == 4 and tuple(up[2:]) != (1, 1)):
        return f"up {tuple(up)} and down {tuple(down)} are not LoRA factors"
    if up[1] != down[0]:
        return f"up {tuple(up)} and down {tuple(down)} have different ranks"
    expected = (up[0], *down[1:]) if len(down) == 4 else (up[0], down[1], *([1, 1] if len(weight) == 4 else []))
    if tuple(expected) != tuple(weight):
        return f"up {tuple(up)} @ down {tuple(down)} does not make the weight's {tuple(weight)}"
    return None


def _metadata_alpha(metadata, component, module, rank):
    """diffusers' adapter metadata (a PEFT LoraConfig per component): lora_alpha, alpha_pattern, use_rslora."""
    if not metadata:
        return float(rank), False
    config = {k.removeprefix(component + "."): v for k, v in metadata.items() if k.startswith(component + ".")}
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):  # PEFT's rule: the pattern matches the name's tail
            alpha = value
            break
    return float(alpha), bool(config.get("use_rslora", False))
