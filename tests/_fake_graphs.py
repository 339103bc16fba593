"""A CPU stand-in for CUDA graph capture, so GraphedCallable's bookkeeping can be tested without a GPU."""
import types

import torch


def _fake_capture(self, args):
    """GraphedCallable._capture's stand-in: counts the capture and returns a "graph" whose replay runs the call on
    the static inputs and writes the result into the static output, as a real replay overwrites it."""
    self.captures = getattr(self, "captures", 0) + 1
    static_args = tuple(a.clone() if torch.is_tensor(a) else a for a in args)
    static_out = self.fn(*static_args)
    return types.SimpleNamespace(replay=lambda: _copy_into(static_out, self.fn(*static_args))), static_args, static_out


def _copy_into(dst, src):
    """Copy ``src`` into ``dst``: a tensor, or tuples and lists of them (a ControlNet returns both)."""
    if torch.is_tensor(dst):
        dst.copy_(src)
    else:
        for d, s in zip(dst, src, strict=True):
            _copy_into(d, s)


def use_fake_graphs(graphed):
    """Make every call of the GraphedCallable ``graphed`` capturable, with captures done by _fake_capture."""
    graphed._capturable = lambda tensors: True
    graphed._capture = types.MethodType(_fake_capture, graphed)
    graphed.captures = 0
    return graphed
