"""A CPU stand-in for CUDA graph capture, so GraphedCallable's bookkeeping can be tested without a GPU."""
import types

import numpy as np
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


def assert_graphed_as_eager(pipe, call, mode, graphs):
    """The GPU tests' check of a pipeline's CUDA graphs: ``call(pipe)`` eager, then graphed twice (the capture, then
    a replay) on the fast path; the capture within fp16's 2e-3 of eager, the replay bit for bit, and ``graphs``
    graphs of ``mode`` ("step" or "unet"; None: an SD3 pipeline's transformer call) held. Returns the eager
    output."""
    import diffusion_fast

    outs = []
    for graph in (False, "auto", "auto"):  # eager, capture, replay
        pipe.cuda_graph = graph
        with diffusion_fast.backend("fast"):
            outs.append(call(pipe))
    assert len(pipe._graph if mode is None else pipe._graphs[mode]) == graphs
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(outs[2], outs[1], rtol=0, atol=0)
    return outs[0]


def fake_graphed(pipe, mode, monkeypatch):
    """The pipeline's graphed callable for ``mode`` ("step" or "unet"; None: an SD3 pipeline's transformer call),
    turned on and with capture stood in for (use_fake_graphs)."""
    if mode is None:
        monkeypatch.setattr(pipe, "_graphs_on", lambda device: True)
        return use_fake_graphs(pipe._model(pipe.device))
    monkeypatch.setattr(pipe, "_graph_mode", lambda device, eta: mode)
    return use_fake_graphs(pipe._graphs_for_components()[mode])


def assert_one_capture_for_new_inputs(pipe, mode, run, calls, monkeypatch):
    """The CPU check of a pipeline's graphed loop: ``run(pipe, **kwargs)`` for each of ``calls`` eagerly, then with
    the loop in ``mode`` ("step" or "unet"; None: an SD3 pipeline's transformer call) and capture stood in for;
    every graphed image equals its eager one bit for bit, and the calls (new inputs of the same shapes) share one
    capture."""
    eager = [run(pipe, **kwargs) for kwargs in calls]
    try:
        graphed = fake_graphed(pipe, mode, monkeypatch)
        for kwargs, image in zip(calls, eager):
            assert np.array_equal(run(pipe, **kwargs), image), kwargs
        assert graphed.captures == 1
    finally:
        if mode is None:
            pipe._graph = None
        else:
            pipe._graphs = None
