"""torch.compile composes with our models and with diffusers' models we touch: our fast path (C++ ops, or the Triton
kernels as opaque ops) traces as one graph with no breaks and gives eager's output; a function compiled under one
backend is recompiled when it runs under another; inductor compiles around our fused ops; a diffusers UNet compiles
once beside our CUDA graphs, and after accelerate(pipe).

The backend selection (diffusion_fast.backend) lives in a ContextVar, which dynamo cannot trace: before compiled code
read a traced copy of it, our tiny UNet compiled to 48 graphs with 47 breaks, one per op call."""
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import diffusion_fast
from conftest import DEVICE, ON_GPU
from diffusion_fast import tiny
from diffusion_fast.models import UNet2DConditionModel

CPU_PATH = pytest.mark.skipif(ON_GPU, reason="the CPU path (C++ ops) is what this traces; on a GPU, Triton's")


@pytest.fixture
def unet_and_inputs():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(tiny.unet_config("sd1")).eval()
    for p in unet.parameters():  # (fresh random weights: a zero-initialised output layer would compare nothing)
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(1)
    cross = tiny.unet_config("sd1")["cross_attention_dim"]
    return unet, (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20]), torch.randn(2, 77, cross, generator=g))


def _diffusers_inputs(unet, batch=1):
    """(sample, encoder hidden states) for a tiny diffusers-format UNet: fresh random values."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, 8, 8, generator=g),
            torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g))


@pytest.fixture
def diffusers_unet():
    import diffusers

    return diffusers.UNet2DConditionModel(**tiny.unet_config("sd1")).eval()


@CPU_PATH
def test_the_unet_traces_as_one_graph(unet_and_inputs):
    unet, inputs = unet_and_inputs
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(unet)(*inputs)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons[:3]]
    assert explained.graph_count == 1


@CPU_PATH
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


def test_the_triton_path_compiles_with_each_kernel_call_one_opaque_op(unet_and_inputs, monkeypatch):
    """The Triton kernels under torch.compile (interpreted here, compiled on a GPU): one graph, each GroupNorm and
    attention call an opaque op whose kernel really runs, eager's output bit for bit. Before, dynamo traced into the
    launchers and failed inside Triton's interpreter."""
    from diffusion_fast.kernels import attention as attention_kernel
    from diffusion_fast.kernels import group_norm_silu as group_norm_kernel

    unet, (sample, t, context) = unet_and_inputs
    unet.to(DEVICE)
    inputs = (sample[:1].to(DEVICE), t[:1].to(DEVICE), context[:1].to(DEVICE))  # (one sample: interpreted kernels)
    calls = []
    # the launchers' unchecked entries: eager ops call them directly, the opaque ops through the checked launchers
    for module, name in ((attention_kernel, "attention"), (group_norm_kernel, "group_norm_silu")):
        real = getattr(module, f"_{name}_unchecked")
        monkeypatch.setattr(module, f"_{name}_unchecked",
                            lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(unet, backend=counter, fullgraph=True)
    with torch.no_grad(), diffusion_fast.backend("triton"):
        eager = unet(*inputs)
        eager_calls = list(calls)
        got = compiled(*inputs)
    assert counter.frame_count == 1 and {"attention", "group_norm_silu"} <= set(eager_calls)
    assert calls == eager_calls * 2  # the compiled run launched every kernel the eager one did, in order
    torch.testing.assert_close(got, eager, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["NCHW", "channels_last", "permuted"])
def test_the_opaque_triton_ops_pass_opcheck(layout):
    """The fakes torch.compile plans with give the real outputs' shapes and strides (a permuted input is read as a
    contiguous copy, channels_last is kept), and the ops' schemas hold."""
    from diffusion_fast import _triton_compiled

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 3, generator=g).to(DEVICE)
    x = {"NCHW": x, "channels_last": x.to(memory_format=torch.channels_last),
         "permuted": x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)}[layout]
    weight, bias = torch.randn(6, generator=g).to(DEVICE), torch.randn(6, generator=g).to(DEVICE)
    torch.library.opcheck(_triton_compiled.group_norm_silu, (x, 3, weight, bias, 1e-5, True))
    q, k, v = (torch.randn(2, 3, n, 12, generator=g).to(DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
               for n in (7, 9, 9))  # (B, H, L, D) views of (B, L, H, D) storage, as the models pass them
    torch.library.opcheck(_triton_compiled.attention, (q, k, v, None))


def test_a_compiled_diffusers_unet_does_not_recompile_once_our_graphs_watch_modules(diffusers_unet):
    """Our CUDA graphs count module registrations process-wide (cuda_graph.ModuleState installs torch's global
    hooks). diffusers' mid block slices ``self.resnets[1:]`` in its forward, which registers modules into a new
    ModuleList: traced, the count became a guard that failed at every call, and on an H200 a diffusers UNet compiled
    in the same process as our pipeline recompiled to dynamo's limit and ran eagerly (1.02x eager)."""
    from diffusion_fast.cuda_graph import ModuleState

    unet = diffusers_unet
    ModuleState(unet)  # (what our pipeline and accelerate(pipe) create for their CUDA graphs: the hooks go in)
    sample, context = _diffusers_inputs(unet)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(unet, backend=counter)
    with torch.no_grad():
        for _ in range(3):
            compiled(sample, 10, context)
    assert counter.frame_count == 1


def test_an_accelerated_diffusers_unet_compiles_as_one_graph():
    """accelerate(pipe) then torch.compile(pipe.unet) (a CPU pipeline: the C++ ops): one graph, no breaks, our fused
    op in it, and the accelerated eager output bit for bit. (Where accelerate gave the UNet CUDA graphs, compiled code
    calls the model's own forward: the next test.)"""
    import _tiny_diffusers

    pipe = _tiny_diffusers.pipeline("sd1", seed=1)
    diffusion_fast.accelerate(pipe)
    unet = pipe.unet
    sample, context = _diffusers_inputs(unet, batch=2)
    graphs = []

    def keep(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(unet, backend=keep, fullgraph=True)
    with torch.no_grad():
        eager = unet(sample, 10, context).sample
        torch.testing.assert_close(compiled(sample, 10, context).sample, eager, rtol=0, atol=0)
    assert len(graphs) == 1
    targets = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
    ours = torch.ops.diffusion_fast.group_norm_silu
    assert {ours, ours.default} & targets  # our fused op, not F.group_norm + F.silu


def test_a_model_whose_forward_we_graph_compiles_as_the_model_itself(diffusers_unet, monkeypatch):
    """torch.compile on a model accelerate gave CUDA graphs (model_graphs.graph_forward): compiled code must not
    trace into our capture and replay (streams, torch.cuda.graph), so there the patched forward is the model's own.
    Here on CPU tensors, with the graphs made to believe the inputs capturable: before, dynamo traced into the
    capture and failed."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    from diffusion_fast.cuda_graph import GraphedCallable
    from diffusion_fast.model_graphs import graph_forward

    unet = diffusers_unet
    sample, context = _diffusers_inputs(unet)
    with torch.no_grad():
        expected = unet(sample, torch.tensor(10), context).sample
    graph_forward(unet, lambda out: UNet2DConditionOutput(sample=out[0]))
    monkeypatch.setattr(GraphedCallable, "_capturable", staticmethod(lambda tensors: True))
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(unet, backend=counter, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(sample, torch.tensor(10), context).sample, expected, rtol=0, atol=0)
    assert counter.frame_count == 1


def test_inductor_compiles_our_blocks_around_the_fused_ops(unet_and_inputs):
    """torch.compile's default backend (inductor, generating C++ here) on our UNet's mid block (two resnets and a
    transformer): our fused GroupNorm+SiLU stays one op call in the generated code (its fake tells inductor the
    output's layout) and the result is eager's within fp32 rounding. The whole tiny UNet takes ~90 s to compile on
    2 cores; the mid block holds every kind of call in it."""
    from torch._inductor.utils import run_and_get_code

    unet, inputs = unet_and_inputs
    seen = []
    hook = unet.mid_block.register_forward_pre_hook(lambda module, args: seen.append(args))
    with torch.no_grad():
        unet(*inputs)
    hook.remove()
    args = seen[0]  # (hidden states, time embedding, text context) as the UNet passes them
    torch._dynamo.reset()
    with torch.no_grad():
        eager = unet.mid_block(*args)
        got, code = run_and_get_code(torch.compile(unet.mid_block, fullgraph=True), *args)
    assert "diffusion_fast.group_norm_silu" in "\n".join(code)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


def test_bad_input_in_compiled_code_is_the_same_clear_error():
    """A public op's argument check inside compiled code: the same ValueError naming the argument as eager, not an
    error from dynamo's tracing."""
    compiled = torch.compile(lambda x: diffusion_fast.ops.group_norm_silu(x, 4), backend="eager")
    with pytest.raises(ValueError, match="num_groups=4 must be positive and divide the channel count 6 of x"):
        compiled(torch.randn(2, 6, 3, 3))
