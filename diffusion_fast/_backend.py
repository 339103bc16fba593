"""Which implementation the ops run: the process-wide backend switch.

``with diffusion_fast.backend("reference"):`` makes every op inside use the plain PyTorch reference, so the same
weights can run both ways. ``"fast"`` (the default) lets each op pick its fastest implementation for the tensors'
device (Triton on CUDA, the C++ extension on CPU). ``"triton"`` and ``"cpp"`` force one implementation everywhere
(``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import contextlib
import contextvars

BACKENDS = ("fast", "reference", "triton", "cpp")
_current = contextvars.ContextVar("diffusion_fast_backend", default="fast")


def current_backend() -> str:
    """The backend selected by the innermost ``backend(...)`` block ("fast" outside any)."""
    return _current.get()


@contextlib.contextmanager
def backend(name: str):
    """Select the implementation of every diffusion_fast op run inside the block."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend: name must be one of {BACKENDS}, got {name!r}")
    token = _current.set(name)
    try:
        yield name
    finally:
        _current.reset(token)
