"""torch.compile composes with our models: the fast path traces as one graph with no breaks and gives eager's output,
and a function compiled under one backend is recompiled when it runs under another.

The backend selection (diffusion_fast.backend) lives in a ContextVar, which dynamo cannot trace: before compiled code
read a traced copy of it, our tiny UNet compiled to 48 graphs with 47 breaks, one per op call."""
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import diffusion_fast
from conftest import ON_GPU
from diffusion_fast import tiny
from diffusion_fast.models import UNet2DConditionModel

pytestmark = pytest.mark.skipif(ON_GPU, reason="the CPU path (C++ ops) is what this traces; on a GPU, Triton's")


@pytest.fixture
def unet_and_inputs():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(tiny.unet_config("sd1")).eval()
    for p in unet.parameters():  # (fresh random weights: a zero-initialised output layer would compare nothing)
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(1)
    cross = tiny.unet_config("sd1")["cross_attention_dim"]
    return unet, (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20]), torch.randn(2, 77, cross, generator=g))


def test_the_unet_traces_as_one_graph(unet_and_inputs):
    unet, inputs = unet_and_inputs
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(unet)(*inputs)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons[:3]]
    assert explained.graph_count == 1


def test_compiled_unet_matches_eager_and_recompiles_for_another_backend(unet_and_inputs, monkeypatch):
    unet, inputs = unet_and_inputs
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(unet, backend=counter, fullgraph=True)
    with torch.no_grad():
        eager = unet(*inputs)
        torch.testing.assert_close(compiled(*inputs), eager, rtol=0, atol=0)  # the same ops, traced
        assert counter.frame_count == 1
        compiled(*inputs)
        assert counter.frame_count == 1  # (guarded, not retraced)
        # under another backend the compiled graph must not be reused: the reference path's ops are traced anew
        calls = []
        real = diffusion_fast.reference.group_norm_silu
        monkeypatch.setattr(diffusion_fast.reference, "group_norm_silu",
                            lambda *a, **k: (calls.append(1), real(*a, **k))[1])
        with diffusion_fast.backend("reference"):
            got = compiled(*inputs)
            expected = unet(*inputs)
        assert counter.frame_count == 2 and calls
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        compiled(*inputs)  # back outside the block: the first graph again, no third compile
        assert counter.frame_count == 2
