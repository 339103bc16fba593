"""LoRA weights merged into our pipelines' models: diffusers/PEFT, older diffusers and kohya files, SD and SDXL.

A LoRA adds ``scale * up @ down`` to a weight (a Linear's, or a Conv2d's with the kernel in ``down``: LoCon). diffusers
keeps the factors beside the weight and adds their product's output at every call, until ``fuse_lora``; here the
product is merged into the weight when the LoRA is loaded, as ``fuse_lora`` does, so a LoRA costs nothing per step and
the fused kernels and CUDA graphs run unchanged (a graph reads the weights by address, and the merge writes in place).
The weights before any merge are kept (on the CPU), so ``set_adapters`` re-merges from them and
``unload_lora_weights`` gives back the exact original weights.

Formats read (what ``StableDiffusionPipeline.load_lora_weights`` in diffusers reads for SD and SDXL):
- diffusers/PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (and ``text_encoder.``, ``text_encoder_2.``),
  with the adapter's ``lora_alpha``, ``alpha_pattern`` and ``use_rslora`` from the file's ``lora_adapter_metadata``;
- older diffusers: ``<module>.lora.down.weight`` / ``.lora.up.weight``, attention processors' ``to_q_lora.down``,
  text encoders' ``lora_linear_layer``, with ``<module>.alpha`` entries;
- kohya (sd-scripts, most LoRAs shared as one .safetensors): ``lora_unet_*``, ``lora_te_*`` (``lora_te1_*``,
  ``lora_te2_*`` for SDXL's encoders), ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, with the UNet named
  as diffusers names it (SD 1.x/2.x) or as SGM's ``input_blocks`` / ``middle_block`` / ``output_blocks`` (SDXL).
Refused, with every offending key named: DoRA, LoHa, LoKr, full-weight diffs and keys that match no module.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
from dataclasses import dataclass

import torch

from .models.attention import Attention

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights name
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
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
    component: str  # "unet", "text_encoder" or "text_encoder_2"
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
    component = "unet"  # diffusers reads unprefixed keys as the UNet's
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
            kind = "unet" if component == "unet" else "text"
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


def lora_call_scale(call):
    """A pipeline ``__call__`` that takes diffusers' ``cross_attention_kwargs={"scale": s}``: the active LoRAs run at
    ``s`` times their weights for this call (UNet and text encoders, as in diffusers), and are put back after it."""
    @functools.wraps(call)
    def with_scale(self, *args, cross_attention_kwargs=None, **kwargs):
        with self._lora_call_scale(cross_attention_kwargs):
            return call(self, *args, **kwargs)

    signature = inspect.signature(call)
    extra = inspect.Parameter("cross_attention_kwargs", inspect.Parameter.KEYWORD_ONLY, default=None)
    with_scale.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
    return with_scale


class LoraLoaderMixin:
    """``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ``delete_adapters``, ``unload_lora_weights``,
    ``disable_lora`` / ``enable_lora`` for our pipelines.

    Every LoRA is merged into the weights; ``set_adapters`` re-merges from the kept original weights, so weights never
    drift however often it is called, and ``unload_lora_weights`` restores them bit for bit.
    """

    def _lora_models(self) -> dict:
        return {c: getattr(self, c, None) for c in COMPONENTS if getattr(self, c, None) is not None}

    def _lora_state(self):
        if not hasattr(self, "_lora"):
            # name -> factors, name -> weight, kept weights; whether fuse_lora ran since the last unfuse_lora; whether
            # disable_lora holds every adapter off
            self._lora = {"adapters": {}, "weights": {}, "originals": {}, "fused": False, "disabled": False}
        return self._lora

    def load_lora_weights(self, lora, adapter_name=None, *, weight_name=None, scale=1.0):
        """Merge a LoRA (a file, a folder or a state dict) into the UNet and text encoders, at ``scale``.

        The image is diffusers' after its ``load_lora_weights`` (then ``fuse_lora(lora_scale=scale)``), within the fp32
        pipeline tolerance. As in diffusers, the LoRA just loaded is the active one: earlier ones stay loaded, inactive,
        until ``set_adapters`` names several. ``adapter_name`` defaults to ``default_0``, ``default_1``, ...
        """
        state = self._lora_state()
        if adapter_name is None:
            adapter_name = f"default_{len(state['adapters'])}"
        if not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name must be a str, got {type(adapter_name).__name__}")
        if adapter_name in state["adapters"]:
            raise ValueError(f"adapter_name {adapter_name!r} is already loaded: delete_adapters it first, or pick "
                             "another name")
        scale = _check_weight("scale", scale)
        tensors, metadata = read_lora(lora, weight_name)
        factors = lora_factors(tensors, metadata, self._lora_models())
        state["adapters"][adapter_name] = factors
        state["weights"] = {adapter_name: scale}
        self._merge_loras()

    def set_adapters(self, adapter_names, adapter_weights=None):
        """Keep only ``adapter_names`` active, at ``adapter_weights`` (one float for all, or one each)."""
        state = self._lora_state()
        names = _adapter_names(adapter_names)
        unknown = [n for n in names if n not in state["adapters"]]
        if unknown:
            raise ValueError(f"adapter_names: {unknown} are not loaded (loaded: {list(state['adapters'])})")
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"adapter_weights has {len(weights)} entries for {len(names)} adapter_names")
        state["weights"] = {n: _check_weight("adapter_weights", 1.0 if w is None else w) for n, w in zip(names, weights)}
        self._merge_loras()

    def fuse_lora(self, lora_scale=1.0, adapter_names=None):
        """diffusers' ``fuse_lora``. LoRAs here are merged already, so this gives the images diffusers' fusing gives:
        the active adapters (or those of ``adapter_names``) from now on at ``lora_scale`` times their weights, and
        ``unfuse_lora`` keeps that scale. Fusing again before ``unfuse_lora`` changes nothing here (diffusers' state
        after a repeated fuse is its own, not mirrored)."""
        state = self._lora_state()
        lora_scale = _check_weight("lora_scale", lora_scale)
        names = list(state["weights"]) if adapter_names is None else _adapter_names(adapter_names)
        inactive = [n for n in names if n not in state["weights"]]
        if inactive:
            raise ValueError(f"adapter_names: {inactive} are not active (active: {list(state['weights'])})")
        if state["fused"]:
            return
        state["weights"] = {n: w * lora_scale if n in names else w for n, w in state["weights"].items()}
        state["fused"] = True
        self._merge_loras()

    def unfuse_lora(self):
        """diffusers' ``unfuse_lora``: the image stays as it is (diffusers' layers keep the fused scale after it); a
        later ``fuse_lora`` scales again."""
        self._lora_state()["fused"] = False

    def get_active_adapters(self) -> list:
        return list(self._lora_state()["weights"])

    def delete_adapters(self, adapter_names):
        state = self._lora_state()
        for name in _adapter_names(adapter_names):
            if name not in state["adapters"]:
                raise ValueError(f"adapter_names: {name!r} is not loaded (loaded: {list(state['adapters'])})")
            del state["adapters"][name]
            state["weights"].pop(name, None)
        self._merge_loras()

    def unload_lora_weights(self):
        """Forget every LoRA and put back the weights as they were before the first one."""
        state = self._lora_state()
        state["adapters"].clear()
        state["weights"].clear()
        state["disabled"] = False
        self._merge_loras()

    def disable_lora(self):
        """diffusers' ``disable_lora``: the images of the model without its LoRAs (the original weights, put back
        exactly), the adapters kept. As in diffusers, ``set_adapters`` and ``load_lora_weights`` keep them off
        until ``enable_lora``."""
        self._lora_state()["disabled"] = True
        self._merge_loras()

    def enable_lora(self):
        """diffusers' ``enable_lora``: the active adapters (as ``set_adapters`` or the last load left them) back."""
        self._lora_state()["disabled"] = False
        self._merge_loras()

    @contextlib.contextmanager
    def _lora_call_scale(self, cross_attention_kwargs):
        if cross_attention_kwargs is None:
            yield
            return
        if not isinstance(cross_attention_kwargs, dict):
            raise TypeError(f"cross_attention_kwargs must be a dict, got {type(cross_attention_kwargs).__name__}")
        unknown = sorted(set(cross_attention_kwargs) - {"scale"})
        if unknown:
            raise ValueError(f"cross_attention_kwargs: only 'scale' (the LoRA scale) is taken here, got {unknown}")
        scale = _check_weight("cross_attention_kwargs['scale']", cross_attention_kwargs.get("scale", 1.0))
        state = self._lora_state()
        if scale == 1.0 or not state["weights"]:  # (diffusers ignores the scale without a LoRA)
            yield
            return
        weights = dict(state["weights"])
        state["weights"] = {name: weight * scale for name, weight in weights.items()}
        self._merge_loras()
        try:
            yield
        finally:
            state["weights"] = weights
            self._merge_loras()

    @torch.no_grad()
    def _merge_loras(self):
        """weight = original + sum over active adapters of weight * scale * up @ down, computed in fp32."""
        state, models = self._lora_state(), self._lora_models()
        deltas = {}
        for name, adapter_weight in ({} if state["disabled"] else state["weights"]).items():
            for f in state["adapters"][name]:
                deltas.setdefault((f.component, f.module), []).append((adapter_weight * f.scale, f))
        for key in sorted(set(deltas) | set(state["originals"])):
            weight = models[key[0]].get_parameter(key[1] + ".weight")
            if key not in state["originals"]:
                state["originals"][key] = weight.detach().to("cpu", copy=True)
            merged = state["originals"][key].to(weight.device, torch.float32, copy=True)  # (never the kept one)
            for coefficient, f in deltas.get(key, []):
                up = f.up.to(weight.device, torch.float32).flatten(1)
                down = f.down.to(weight.device, torch.float32).flatten(1)
                merged += coefficient * (up @ down).reshape(merged.shape)
            weight.copy_(merged)
            if key not in deltas:
                del state["originals"][key]
        for model in models.values():  # a fused q/k/v projection is a copy of the weights: refresh it in place
            for module in model.modules():
                if isinstance(module, Attention) and module.fused_qkv_weight is not None:
                    module.fuse_qkv()


def _adapter_names(value) -> list:
    """``adapter_names`` as diffusers takes it: one name or a list of names."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
        raise TypeError(f"adapter_names must be a str or a list of str, got {value!r}")
    return list(value)


def _check_weight(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    return float(value)
