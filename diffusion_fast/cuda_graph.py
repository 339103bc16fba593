"""Capture a function once per input signature as a CUDA graph and replay it: no per-launch CPU overhead.

``GraphedCallable(fn)(*args)``: for CUDA tensor inputs, the first call with a given signature (each tensor's shape,
dtype, device and strides, plus the values of the non-tensor arguments) warms ``fn`` up on a side stream, then
captures it into a graph whose input buffers are static; later calls copy the inputs into those buffers and replay.
All graphs of one GraphedCallable share one memory pool (the first graph's), so a graph per resolution costs little
extra memory; the pool lives exactly as long as its graphs (a process-wide pool outliving freed graphs trips an
allocator assert in torch 2.11).

What a replay returns is the graph's static output: valid until the next call with the same signature (callers
consume it immediately, or clone it). Weights are read by address: changing parameters in place (``.copy_()``, LoRA
fused in place) is picked up by the next replay; replacing parameter tensors needs ``reset()``. A signature whose
capture fails runs eagerly from then on, announced by one warning. Inputs not on CUDA run ``fn`` eagerly.
"""
from __future__ import annotations

import warnings

import torch


def _signature(args):
    parts = []
    for a in args:
        if torch.is_tensor(a):
            parts.append(("T", tuple(a.shape), a.dtype, str(a.device), tuple(a.stride())))
        else:
            parts.append(("V", a))
    return tuple(parts)


class GraphedCallable:
    def __init__(self, fn, *, num_warmup: int = 2):
        self.fn, self.num_warmup = fn, num_warmup
        self._graphs = {}  # signature -> (graph, static inputs, static output) or None (eager)
        self._pool = None  # the first graph's memory pool, shared by the later ones

    def reset(self):
        """Drop every captured graph (after replacing parameter tensors, or to free their memory)."""
        self._graphs.clear()
        self._pool = None

    def __len__(self):
        return sum(1 for g in self._graphs.values() if g is not None)

    def __call__(self, *args):
        tensors = [a for a in args if torch.is_tensor(a)]
        if not tensors or any(t.device.type != "cuda" for t in tensors) or torch.cuda.is_current_stream_capturing():
            return self.fn(*args)
        key = _signature(args)
        if key not in self._graphs:
            self._graphs[key] = self._capture(args)
        entry = self._graphs[key]
        if entry is None:
            return self.fn(*args)
        graph, static_args, static_out = entry
        for dst, src in zip(static_args, args):
            if torch.is_tensor(dst) and dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        graph.replay()
        return static_out

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
