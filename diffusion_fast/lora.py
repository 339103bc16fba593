"""LoRA weights merged into our pipelines' models: diffusers/PEFT, older diffusers and kohya files, SD and SDXL;
diffusers/PEFT files for SD3's transformer and text encoders.

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
Refused, with every offending key named: DoRA, LoHa, LoKr, full-weight diffs and keys that match no module. The
files are read in ``lora_files``; this module merges them.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from .lora_files import COMPONENTS, lora_factors, read_lora
from .models.attention import Attention

def lora_call_scale(call=None, *, name="cross_attention_kwargs"):
    """A pipeline ``__call__`` that takes diffusers' ``cross_attention_kwargs={"scale": s}`` (SD3's pipeline:
    ``joint_attention_kwargs``, as ``name``): the active LoRAs run at ``s`` times their weights for this call (the
    UNet or transformer and the text encoders, as in diffusers), and are put back after it."""
    if call is None:
        return functools.partial(lora_call_scale, name=name)

    @functools.wraps(call)
    def with_scale(self, *args, **kwargs):
        with self._lora_call_scale(kwargs.pop(name, None), name):
            return call(self, *args, **kwargs)

    signature = inspect.signature(call)
    extra = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
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
        """Merge a LoRA (a file, a folder or a state dict) into the UNet (or transformer) and text encoders, at
        ``scale``.

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
    def _lora_call_scale(self, call_kwargs, name="cross_attention_kwargs"):
        if call_kwargs is None:
            yield
            return
        if not isinstance(call_kwargs, dict):
            raise TypeError(f"{name} must be a dict, got {type(call_kwargs).__name__}")
        unknown = sorted(set(call_kwargs) - {"scale"})
        if unknown:
            raise ValueError(f"{name}: only 'scale' (the LoRA scale) is taken here, got {unknown}")
        scale = _check_weight(f"{name}['scale']", call_kwargs.get("scale", 1.0))
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
