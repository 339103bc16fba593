"""The launchers' plain integer helpers (kernels/_host.py) agree with Triton's own, which cost microseconds a call."""
import triton

from diffusion_fast.kernels._host import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_match_triton():
    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 128, 2048):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    big = 3 * 2**40 + 1  # past 32 bits: element counts of large tensors
    assert cdiv(big, 2048) == triton.cdiv(big, 2048) and next_power_of_2(big) == 2**42


def test_the_launchers_checks_run_once_per_public_call_and_not_for_the_models(monkeypatch):
    """ops.attention and ops.group_norm_silu validate their arguments once (ops, not again in the launcher); the
    internal entries our models call (ops._attention, ops._group_norm_silu) skip the checks, whose cost outside a
    CUDA graph was as much as the rest of the launcher's host code (benchmarks/launcher_host_cost.py)."""
    import torch

    from diffusion_fast import _validate, ops

    if not ops._triton_usable(torch.device("cpu")):
        import pytest

        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on CPU machines)")
    calls = []
    for name in ("attention_args", "group_norm_args"):
        real = getattr(_validate, name)
        monkeypatch.setattr(_validate, name, lambda *a, _real=real, _name=name: (calls.append(_name), _real(*a))[1])
    q = torch.randn(1, 2, 5, 16)
    x, w = torch.randn(1, 4, 3, 3), torch.randn(4)
    ops.attention(q, q, q, backend="triton")
    ops.group_norm_silu(x, 2, w, w, backend="triton")
    assert calls == ["attention_args", "group_norm_args"]
    calls.clear()
    ops._attention(q, q, q, None, "triton")
    ops._group_norm_silu(x, 2, w, w, 1e-5, True, "triton")
    assert calls == []
