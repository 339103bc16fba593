"""model_graphs: every argument of a model call flattened into graph inputs (tensors) and a hashable spec (the rest),
and the calls that must stay eager."""
import warnings

import pytest
import torch
from _fake_graphs import use_fake_graphs

from diffusion_fast.model_graphs import _flatten, _unflatten, graph_forward


def test_flatten_round_trips_nested_arguments_and_keys_python_values_by_type():
    image_embeds = [torch.randn(2, 4)]  # IP-Adapter's: a list of tensors inside added_cond_kwargs
    call = ((torch.randn(2, 3), torch.tensor(5)),
            {"added_cond_kwargs": {"time_ids": torch.randn(2, 6), "image_embeds": image_embeds},
             "down_block_additional_residuals": (torch.randn(1), torch.randn(2)), "conditioning_scale": 0.5,
             "guess_mode": False, "cross_attention_kwargs": {"scale": 0.8}, "class_labels": None})
    tensors = []
    spec = _flatten(call, tensors, "the call")
    assert len(tensors) == 6 and hash(spec) is not None
    args, kwargs = _unflatten(spec, iter(tensors))
    assert args[0] is call[0][0] and kwargs["added_cond_kwargs"]["image_embeds"][0] is image_embeds[0]
    assert isinstance(kwargs["added_cond_kwargs"]["image_embeds"], list)
    assert isinstance(kwargs["down_block_additional_residuals"], tuple)
    assert {k: v for k, v in kwargs.items() if not isinstance(v, (dict, tuple))} == {
        "conditioning_scale": 0.5, "guess_mode": False, "class_labels": None}
    assert kwargs["cross_attention_kwargs"] == {"scale": 0.8}
    # True == 1 == 1.0 in Python, but a model may branch on the type: each gets its own graph
    assert len({_flatten(value, [], "v") for value in (True, 1, 1.0)}) == 3


class _Scaled(torch.nn.Module):
    """A stand-in model with diffusers' calling convention: (sample, timestep, ...) and return_dict."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3))

    def forward(self, sample, timestep, scale=1.0, extra=None, return_dict=True):
        out = sample * self.weight * scale + timestep
        return (out,) if not return_dict else {"sample": out}


@torch.no_grad()
def test_python_values_are_part_of_the_key_and_odd_arguments_run_eagerly():
    model = _Scaled()
    graph_forward(model, lambda out: {"sample": out[0]})
    graphed = use_fake_graphs(model.forward.graphed)
    x, t = torch.randn(2, 3), torch.tensor([7.0])
    for scale in (1.0, 0.5, 1.0):
        torch.testing.assert_close(model(x, t, scale=scale)["sample"], x * model.weight * scale + 7)
    assert graphed.captures == 2  # one graph per scale, replayed for the repeat
    assert model(x, torch.tensor(7.0), scale=0.5, return_dict=False)[0] is not None and graphed.captures == 2  # 0-d t
    with pytest.warns(RuntimeWarning, match=r"_Scaled call has an argument the graph cannot take \(the call\[1\]"
                                            r"\['extra'\]: object\)"):
        model(x, t, extra=object())
    with pytest.warns(RuntimeWarning, match="timestep that is not a tensor"):
        model(x, 7)
    with torch.enable_grad(), pytest.warns(RuntimeWarning, match="autograd enabled"):
        assert model(x, t)["sample"].requires_grad
    assert graphed.captures == 2


def test_past_max_graphs_new_signatures_run_eagerly_with_one_warning():
    from diffusion_fast.cuda_graph import GraphedCallable

    fn = use_fake_graphs(GraphedCallable(lambda x, s: x * s, max_graphs=2))
    x = torch.ones(2)
    fn(x, 1.0), fn(x, 2.0)
    with pytest.warns(RuntimeWarning, match="more than 2 input signatures"):
        torch.testing.assert_close(fn(x, 3.0), x * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # announced once
        torch.testing.assert_close(fn(x, 4.0), x * 4)
    assert fn.captures == 2 and len(fn) == 2
    torch.testing.assert_close(fn(x, 2.0), x * 2)  # a captured signature still replays
