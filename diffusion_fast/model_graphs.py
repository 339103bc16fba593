"""A diffusers model's forward (UNet, ControlNet) replayed from CUDA graphs: ``graph_forward(model)``.

A pipeline calls its UNet with a few tensors and, depending on the pipeline, more: SDXL's ``added_cond_kwargs``
(a dict of tensors), a ControlNet's residuals (a tuple of tensors and a tensor), a LoRA scale in
``cross_attention_kwargs`` (a float), IP-Adapter image embeds (a list of tensors in a dict). Every argument is
flattened into its tensors, which become the graph's inputs, and a hashable spec of everything else (containers,
keys, numbers, strings), which is part of the graph's key: a call with other Python values gets its own graph, so
no value is baked in by mistake. What cannot be a graph input runs eagerly, announced once per reason: a call with
autograd on (a replay records no gradients), a timestep given as a Python number (one graph per step would be
captured), an argument of another type.
"""
from __future__ import annotations

import warnings

import torch

from .cuda_graph import PLAIN_TYPES, GraphedCallable, ModuleState


class _NotGraphable(Exception):
    pass


def _flatten(value, tensors: list, where: str):
    """The spec of ``value`` (hashable; rebuilds it with _unflatten), appending its tensors to ``tensors``."""
    if torch.is_tensor(value):
        tensors.append(value)
        return "T"
    if isinstance(value, PLAIN_TYPES):
        return ("V", (type(value), value))  # the type too: True == 1 == 1.0, but a model may tell them apart
    if isinstance(value, (tuple, list)):
        return ("L" if isinstance(value, list) else "U",
                tuple(_flatten(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)))
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return ("D", tuple((k, _flatten(value[k], tensors, f"{where}[{k!r}]")) for k in sorted(value)))
    raise _NotGraphable(f"an argument the graph cannot take ({where}: {type(value).__name__})")


def _unflatten(spec, tensors):
    """Rebuild a value from its spec, taking its tensors from the iterator ``tensors``."""
    if spec == "T":
        return next(tensors)
    kind, body = spec
    if kind == "V":
        return body[1]
    if kind in ("L", "U"):
        items = [_unflatten(s, tensors) for s in body]
        return items if kind == "L" else tuple(items)
    return {k: _unflatten(s, tensors) for k, s in body}


def _zero_dim(timestep):
    return timestep.reshape(()) if torch.is_tensor(timestep) and timestep.numel() == 1 else timestep


def graph_forward(model, make_output):
    """Replace ``model.forward`` by per-signature CUDA graphs of its call with ``return_dict=False``.

    ``make_output(out)`` builds what the model returns with ``return_dict=True`` from that tuple. Returns the original
    forward; ``model.forward.graphed`` is the GraphedCallable. The graphs are recaptured when the model's weights or
    adapters change (ModuleState), and each call gets a copy of the graph's output (``clone_output``): some
    pipelines keep one output while calling the model again at the same shape.
    """
    original = model.forward
    announced = set()

    def tensor_forward(spec, *tensors):
        args, kwargs = _unflatten(spec, iter(tensors))
        return original(*args, return_dict=False, **kwargs)

    graphed = GraphedCallable(tensor_forward, state=ModuleState(model), clone_output=True)

    def forward(*args, return_dict=True, **kwargs):
        if torch.compiler.is_compiling():  # torch.compile(model): traced as the model itself (our ops, no replay);
            return original(*args, return_dict=return_dict, **kwargs)  # mode="reduce-overhead" brings its own graphs
        if len(args) > 1:  # pipelines pass t as 0-d or (1,): one graph for both
            args = (args[0], _zero_dim(args[1]), *args[2:])
        elif "timestep" in kwargs:  # diffusers' MultiControlNetModel calls its nets with keywords only
            kwargs = {**kwargs, "timestep": _zero_dim(kwargs["timestep"])}
        tensors = []
        reason = _eager_reason(args, kwargs)
        if not reason:
            try:
                spec = _flatten((args, kwargs), tensors, "the call")
            except _NotGraphable as exc:
                reason = str(exc)
        if reason:
            if reason not in announced:
                announced.add(reason)
                warnings.warn(f"diffusion_fast: this {type(model).__name__} call has {reason}; it runs without the "
                              "CUDA graph", RuntimeWarning, stacklevel=2)
            return original(*args, return_dict=return_dict, **kwargs)
        out = graphed(spec, *tensors)
        return make_output(out) if return_dict else out

    forward.graphed = graphed  # for tests, and for reset()
    model.forward = forward
    return original


def _eager_reason(args, kwargs):
    """Why a call cannot be replayed from a graph, or "" when it can (its arguments are checked by _flatten)."""
    if torch.is_grad_enabled():
        return "autograd enabled (a replay records no gradients; diffusers' pipelines call models without)"
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    if not torch.is_tensor(timestep):
        return "a timestep that is not a tensor (each value would need its own graph)"
    return ""
