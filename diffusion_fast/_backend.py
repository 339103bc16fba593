"""Which implementation the ops run: the process-wide backend switch.

``with diffusion_fast.backend("reference"):`` makes every op inside use the plain PyTorch reference, so the same
weights can run both ways. ``"fast"`` (the default) lets each op pick its fastest implementation for the tensors'
device (Triton on CUDA, the C++ extension on CPU). ``"triton"`` and ``"cpp"`` force one implementation everywhere
(``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

BACKENDS = ("fast", "reference", "triton", "cpp")
_current = contextvars.ContextVar("diffusion_fast_backend", default="fast")
# The same selection as a module global, which torch.compile can read and guard on (it cannot trace a ContextVar).
_traced = {"backend": "fast"}


def current_backend() -> str:
    """The backend selected by the innermost ``backend(...)`` block ("fast" outside any).

    Inside torch.compile'd code the selection is read from a process-wide copy instead, and the compiled graph is
    guarded on it: a function compiled under one backend is recompiled when it runs under another."""
    if torch.compiler.is_compiling():
        return _traced["backend"]
    return _current.get()


@contextlib.contextmanager
def backend(name: str):
    """Select the implementation of every diffusion_fast op run inside the block."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend: name must be one of {BACKENDS}, got {name!r}")
    token = _current.set(name)
    outer, _traced["backend"] = _traced["backend"], name
    try:
        yield name
    finally:
        _current.reset(token)
        _traced["backend"] = outer
