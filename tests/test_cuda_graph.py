"""GraphedCallable: eager on CPU, capture + replay per signature on a GPU, loud fallback when capture fails, and
recapture when the model's weights or adapters change (ModuleState)."""
import pytest
import torch
from conftest import ON_GPU

import _tiny_diffusers
from _fake_graphs import use_fake_graphs
from diffusion_fast.cuda_graph import GraphedCallable, ModuleState, _signature


def test_signature_keys_shapes_dtypes_strides_and_values():
    a, b = torch.randn(2, 3), torch.randn(3, 2).t()
    assert _signature((a, 1.5)) != _signature((b, 1.5))  # same shape, different strides
    assert _signature((a, 1.5)) != _signature((a, 2.0))
    assert _signature((a, 1.5)) == _signature((torch.randn(2, 3), 1.5))
    assert _signature((a,)) != _signature((a.half(),))


def test_cpu_inputs_run_eagerly():
    calls = []
    fn = GraphedCallable(lambda x, s: calls.append(1) or x * s)
    x = torch.randn(4)
    torch.testing.assert_close(fn(x, 2.0), x * 2)
    fn(x, 2.0)
    assert len(calls) == 2 and len(fn) == 0


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_replay_matches_eager_for_two_shapes_and_a_failed_capture_warns():
    weight = torch.randn(16, 16, device="cuda")
    fn = GraphedCallable(lambda x, t: torch.relu(x @ weight) * t)
    for shape in ((4, 16), (7, 16)):
        for _ in range(3):
            x, t = torch.randn(shape, device="cuda"), torch.rand((), device="cuda")
            torch.testing.assert_close(fn(x, t), torch.relu(x @ weight) * t)
    assert len(fn) == 2
    weight.mul_(2)  # in-place weight changes are seen by replays
    x, t = torch.randn(4, 16, device="cuda"), torch.rand((), device="cuda")
    torch.testing.assert_close(fn(x, t), torch.relu(x @ weight) * t)

    bad = GraphedCallable(lambda x: x.sum().item() * x)  # .item() syncs: not capturable
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        out = bad(torch.ones(3, device="cuda"))
    torch.testing.assert_close(out, torch.full((3,), 3.0, device="cuda"))


def test_graphs_are_recaptured_when_the_weights_are_replaced_not_when_changed_in_place():
    lin = torch.nn.Linear(4, 3)
    fn = use_fake_graphs(GraphedCallable(lambda x: lin(x), state=ModuleState(lin)))
    x = torch.randn(2, 4)
    fn(x), fn(x)
    assert fn.captures == 1
    with torch.no_grad():
        lin.weight.mul_(2)  # in place: a real graph reads the new values at the old address
    torch.testing.assert_close(fn(x), lin(x))
    assert fn.captures == 1
    lin.weight = torch.nn.Parameter(torch.randn(3, 4))  # a new tensor: a real graph would read the old (freed) one
    torch.testing.assert_close(fn(x), lin(x))
    assert fn.captures == 2 and len(fn) == 1  # the stale graph was dropped, not kept beside the new one
    lin.to(torch.float64)
    x = x.double()
    torch.testing.assert_close(fn(x), lin(x))
    assert fn.captures == 3
    plain = use_fake_graphs(GraphedCallable(lambda x: lin(x)))  # no state: graphs kept whatever the weights do
    plain(x)
    lin.weight = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    plain(x)
    assert plain.captures == 1


def test_weights_moved_by_the_captured_call_itself_are_no_change():
    """An offload hook moves the weights onto the GPU inside the first call: the key is read again after capture, so
    the next call replays instead of capturing again."""
    lin = torch.nn.Linear(4, 3)

    def call(x):
        if lin.weight.dtype != torch.float64:  # the first call moves the weights, as an offload hook's pre-forward does
            lin.to(torch.float64)
        return lin(x)

    fn = use_fake_graphs(GraphedCallable(call, state=ModuleState(lin)))
    x = torch.randn(2, 4, dtype=torch.float64)
    fn(x), fn(x)
    assert fn.captures == 1


def test_clone_output_hands_out_copies_that_the_next_replay_leaves_alone():
    shared = use_fake_graphs(GraphedCallable(lambda x: x * 2))
    copies = use_fake_graphs(GraphedCallable(lambda x: x * 2, clone_output=True))
    for fn, kept in ((shared, False), (copies, True)):
        first = fn(torch.ones(3))
        fn(torch.full((3,), 5.0))  # same signature: the same graph replays into its static output
        assert torch.equal(first, torch.full((3,), 2.0)) == kept


def test_module_state_key_changes_with_replaced_tensors_only():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    state = ModuleState(model)
    key = state()
    assert state() == key
    with torch.no_grad():
        model[0].weight.add_(1)
    model.load_state_dict(model.state_dict())  # copies into the existing tensors
    assert state() == key
    changes = {
        "channels_last": lambda: model.to(memory_format=torch.channels_last),  # every 4-d weight is a new tensor
        "dtype": lambda: model.to(torch.float64),
        "assign": lambda: model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True),
        "new buffer": lambda: model[1].register_buffer("extra", torch.zeros(1)),
        "new submodule": lambda: model.append(torch.nn.ReLU()),  # no tensors: the walk is redone, nothing changes
    }
    for name, change in changes.items():
        change()
        new = state()
        assert (new == key) == (name == "new submodule"), name
        key = new
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # .to() then swaps the dicts' entries: no hook
    try:
        model.to(torch.float32)
        assert state() != key
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # the second adapter, on purpose
def test_module_state_key_follows_lora_adapters():
    """A PEFT LoRA layer's forward reads Python numbers (its scale, which adapters are active, whether it is merged)
    that a captured graph bakes in: each change must change the key, so the graph is recaptured."""
    # CI installs peft (the test extra); the offline GPU image may lack it or its dependencies: skip there, said so
    peft = pytest.importorskip("peft", reason="peft is not installed") if ON_GPU else __import__("peft")
    pipe = _tiny_diffusers.pipeline("sd1", seed=2)
    state = ModuleState(pipe.unet)
    keys = [state()]
    config = dict(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "conv1"])
    pipe.unet.add_adapter(peft.LoraConfig(**config), adapter_name="a")
    keys.append(state())
    pipe.set_adapters(["a"], adapter_weights=[0.5])
    keys.append(state())
    pipe.unet.add_adapter(peft.LoraConfig(**config), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.0])
    keys.append(state())
    pipe.disable_lora()
    keys.append(state())
    pipe.enable_lora()
    assert state() == keys[-2]  # back to both adapters at the same scales
    pipe.fuse_lora(adapter_names=["a"])
    keys.append(state())
    assert len(set(keys)) == len(keys)


def test_module_state_key_follows_attention_processors_and_block_settings():
    """diffusers swaps processors (set_attn_processor; the PAG pipeline at every call), rewrites their settings
    (set_ip_adapter_scale sets a list of floats) and the blocks' (enable_freeu): a graph would replay the captured
    ones."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe = _tiny_diffusers.pipeline("sd1", seed=2)
    state = ModuleState(pipe.unet)
    keys = [state()]
    pipe.unet.set_attn_processor(AttnProcessor())
    keys.append(state())
    processor = next(iter(pipe.unet.attn_processors.values()))
    processor.scale = [1.0]
    keys.append(state())
    processor.scale = [0.5]
    keys.append(state())
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)  # plain numbers on the up blocks, read by their forward
    keys.append(state())
    pipe.disable_freeu()
    keys.append(state())
    assert len(set(keys)) == len(keys) and state() == keys[-1]


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got dict"):
        ModuleState({})
    with pytest.raises(TypeError, match="fn must be callable, got NoneType"):
        GraphedCallable(None)
    with pytest.raises(TypeError, match=r"state must be callable \(e.g. a ModuleState\), got tuple"):
        GraphedCallable(torch.relu, state=ModuleState(torch.nn.Linear(2, 2))())  # the key, not the state
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_graphs must be a positive int"):
            GraphedCallable(torch.relu, max_graphs=bad)
