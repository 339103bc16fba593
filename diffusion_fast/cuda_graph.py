"""Capture a function once per input signature as a CUDA graph and replay it: no per-launch CPU overhead.

``GraphedCallable(fn)(*args)``: for CUDA tensor inputs, the first call with a given signature (each tensor's shape,
dtype, device and strides, plus the values of the non-tensor arguments) warms ``fn`` up on a side stream, then
captures it into a graph whose input buffers are static; later calls copy the inputs into those buffers and replay.
All graphs of one GraphedCallable share one memory pool (the first graph's), so a graph per resolution costs little
extra memory; the pool lives exactly as long as its graphs (a process-wide pool outliving freed graphs trips an
allocator assert in torch 2.11).

What a replay returns is the graph's static output: valid until the next call with the same signature (callers
consume it immediately, or pass ``clone_output=True`` for a fresh copy of the output (a tensor, or tuples and lists
of them), as a drop-in must: some diffusers pipelines keep one UNet output while they call the UNet again).

Weights are read by address: changing parameters in place (``.copy_()``, LoRA fused in place) is picked up by the
next replay. ``state`` (e.g. a ``ModuleState`` of the model) is checked at every call: when its key changes (weights
replaced, a LoRA added or rescaled, a processor swapped), every graph is dropped and recaptured. A signature whose
capture fails runs eagerly from then on, announced by one warning. Past ``max_graphs`` signatures, new ones run
eagerly (one warning): a Python number that changes at every call would otherwise capture a graph per call. Inputs
not on CUDA run ``fn`` eagerly.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.modules.module as _module_hooks

log = logging.getLogger("diffusion_fast")
_registrations = [0]  # parameters, buffers and submodules registered on any module, since the first ModuleState


def _count_registration(module, name, value):
    # Inside code torch.compile traces, registrations are the forward's own temporary containers (diffusers' mid
    # block slices ``self.resnets[1:]``, a new ModuleList): counting them there made dynamo guard on the count, which
    # changes at every call, so a compiled diffusers UNet recompiled until its limit and then ran eagerly.
    if not torch.compiler.is_compiling():
        _registrations[0] += 1  # returns None: the registered value is kept as it is


class ModuleState:
    """A cheap key for what a graph of ``module`` reads besides its inputs; ``state()`` returns the current one.

    A graph replays the addresses it captured, so replaced weights (``module.to(dtype)``, ``load_state_dict(...,
    assign=True)``, ``fuse_qkv_projections()``) leave it reading stale or freed memory, and Python numbers read at
    capture (a PEFT LoRA layer's scale, its active adapters, an IP-Adapter processor's scale) are baked into its
    kernels. The key holds each parameter's and buffer's (address, dtype), each adapter layer's active adapters,
    scales, disabled flag and merged adapters, each attention module's processor (identity, type and plain
    settings: diffusers swaps processors with set_attn_processor, and set_ip_adapter_scale rewrites a list of
    floats on them), and the plain settings of the model and its blocks two levels down (enable_freeu's factors,
    the training flag). The lists behind it are walked again only after a parameter, buffer or submodule was registered
    anywhere (torch's global registration hooks count those: adding a LoRA, assigning a new Parameter), or at every
    call while torch is set to overwrite parameters on conversion (``module.to`` then replaces them in the module's
    dicts, which no hook sees). For SD1.5's UNet (686 tensors, 32 attention modules, 11 blocks), a median 0.47 ms a
    call on a 2-core VM (benchmarks/test_bench_cpu.py::test_graph_weights_key); a walk costs tens of ms. On the GPU
    the call overlaps the previous replay.
    """

    def __init__(self, module: torch.nn.Module):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not _registrations[1:]:  # install the counting hooks once, process-wide
            for register in (_module_hooks.register_module_parameter_registration_hook,
                             _module_hooks.register_module_buffer_registration_hook,
                             _module_hooks.register_module_module_registration_hook):
                register(_count_registration)
            _registrations.append(True)
        self.module = module
        self._walked_at = None  # _registrations[0] at the last walk
        self._tensors, self._adapters, self._attentions, self._blocks = [], [], [], []

    def _walk(self):
        self._walked_at = _registrations[0]
        self._tensors = [*self.module.parameters(), *self.module.buffers()]
        # PEFT's BaseTunerLayer (duck-typed: peft is optional): its forward reads these Python values
        self._adapters = [m for m in self.module.modules()
                          if hasattr(m, "active_adapters") and hasattr(m, "merged_adapters")]
        # diffusers' Attention (duck-typed): its processor is an attribute, often not a module, read at each call
        self._attentions = [m for m in self.module.modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]
        # the model and its blocks, two levels down: where diffusers keeps switches set after loading (enable_freeu
        # sets s1, s2, b1, b2 on each up block)
        children = list(self.module.children())
        self._blocks = [m for m in (self.module, *children, *(g for c in children for g in c.children()))
                        if next(m.children(), None) is not None  # leaves hold shapes, not switches
                        and not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential))]

    def __call__(self):
        if self._walked_at != _registrations[0] or torch.__future__.get_overwrite_module_params_on_conversion():
            self._walk()
        return (tuple([(t.data_ptr(), t.dtype) for t in self._tensors]),
                tuple([_adapter_state(m) for m in self._adapters]),
                tuple([_processor_state(m.processor) for m in self._attentions]),
                tuple([_plain_settings(m) for m in self._blocks]))


PLAIN_TYPES = (type(None), bool, int, float, str)  # values a key holds as they are


def _plain_settings(obj):
    """An object's attributes that are numbers, strings, None, or lists and tuples of them."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in vars(obj).items()
                 if isinstance(v, PLAIN_TYPES)
                 or isinstance(v, (list, tuple)) and all(isinstance(x, PLAIN_TYPES) for x in v))


def _processor_state(processor):
    """A processor's identity, type and plain settings (an IP-Adapter processor's list of scales)."""
    return id(processor), type(processor), (() if processor is None else _plain_settings(processor))


def _adapter_state(layer):
    scaling = getattr(layer, "scaling", None)
    return (tuple(layer.active_adapters), bool(getattr(layer, "disable_adapters", False)),
            tuple(layer.merged_adapters), tuple(sorted(scaling.items())) if isinstance(scaling, dict) else ())


def _clone(out):
    return out.clone() if torch.is_tensor(out) else type(out)(_clone(o) for o in out)


def _signature(args):
    parts = []
    for a in args:
        if torch.is_tensor(a):
            parts.append(("T", tuple(a.shape), a.dtype, str(a.device), tuple(a.stride())))
        else:
            parts.append(("V", a))
    return tuple(parts)


class GraphedCallable:
    def __init__(self, fn, *, num_warmup: int = 2, state=None, clone_output: bool = False, max_graphs: int = 16):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if state is not None and not callable(state):
            raise TypeError(f"state must be callable (e.g. a ModuleState), got {type(state).__name__}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
        self.fn, self.num_warmup, self.state, self.clone_output = fn, num_warmup, state, clone_output
        self.max_graphs, self._warned_full = max_graphs, False
        self._graphs = {}  # signature -> (graph, static inputs, static output) or None (eager)
        self._pool = None  # the first graph's memory pool, shared by the later ones
        self._state_key = None  # state() when the graphs in _graphs were captured

    def reset(self):
        """Drop every captured graph (after replacing parameter tensors, or to free their memory)."""
        self._graphs.clear()
        self._pool = None

    def __len__(self):
        return sum(1 for g in self._graphs.values() if g is not None)

    def __call__(self, *args):
        tensors = [a for a in args if torch.is_tensor(a)]
        if not self._capturable(tensors):
            return self.fn(*args)
        if self.state is not None:
            state_key = self.state()
            if state_key != self._state_key:
                if self._graphs:
                    log.info("diffusion_fast: the model's weights or adapters changed; its CUDA graphs are recaptured")
                    self.reset()
                self._state_key = state_key
        key = _signature(args)
        if key not in self._graphs:
            if len(self._graphs) >= self.max_graphs:
                if not self._warned_full:
                    self._warned_full = True
                    warnings.warn(f"diffusion_fast: more than {self.max_graphs} input signatures (shapes, dtypes or "
                                  "Python values); new ones run without a CUDA graph", RuntimeWarning, stacklevel=2)
                return self.fn(*args)
            self._graphs[key] = self._capture(args)
            if self.state is not None:  # the call may have moved the weights (an offload hook puts them on the GPU)
                self._state_key = self.state()
        entry = self._graphs[key]
        if entry is None:
            return self.fn(*args)
        graph, static_args, static_out = entry
        for dst, src in zip(static_args, args):
            if torch.is_tensor(dst) and dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        graph.replay()
        return _clone(static_out) if self.clone_output else static_out

    @staticmethod
    def _capturable(tensors):
        return (bool(tensors) and all(t.device.type == "cuda" for t in tensors)
                and not torch.cuda.is_current_stream_capturing())

    def _capture(self, args):
        try:
            static_args = tuple(a.clone() if torch.is_tensor(a) else a for a in args)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: Triton compilation, cuDNN/cuBLAS workspace, lazy init
                for _ in range(self.num_warmup):
                    self.fn(*static_args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = self.fn(*static_args)
            if self._pool is None:
                self._pool = graph.pool()
            return graph, static_args, static_out
        except Exception as exc:  # capture is an optimisation: fall back to eager, loudly
            warnings.warn(f"diffusion_fast: CUDA graph capture failed ({type(exc).__name__}: {exc}); running eagerly",
                          RuntimeWarning, stacklevel=3)
            return None
