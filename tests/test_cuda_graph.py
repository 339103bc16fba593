"""GraphedCallable: eager on CPU, capture + replay per signature on a GPU, loud fallback when capture fails."""
import pytest
import torch
from conftest import ON_GPU

from diffusion_fast.cuda_graph import GraphedCallable, _signature


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
