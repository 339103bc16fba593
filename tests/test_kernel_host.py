"""The launchers' host code: plain integer helpers (kernels/_host.py) that agree with Triton's own, which cost
microseconds a call; argument checks once per public call; the public step launchers' checks."""
import pytest
import torch
import triton
from conftest import DEVICE

from diffusion_fast import ops
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
    from diffusion_fast import _validate

    if not ops._triton_usable(torch.device("cpu")):
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


def _step_launcher_calls():
    from diffusion_fast.kernels import ddim, ddpm, euler, linear_step

    return {  # launcher: (a call with `bad` in one tensor's place, the argument its error must name)
        "ddim_step": (lambda x, bad: ddim.ddim_step(bad, x, 0.3, 0.4), "model_output"),
        "cfg_ddim_step": (lambda x, bad: ddim.cfg_ddim_step(x, bad, 7.5, x, 0.3, 0.4), "noise_pred_text"),
        "ddpm_step": (lambda x, bad: ddpm.ddpm_step(x, x, 0.3, 0.4, 0.1, bad), "variance_noise"),
        "euler_step": (lambda x, bad: euler.euler_step(bad, x, 1.0, 0.5), "model_output"),
        "euler_ancestral_step": (lambda x, bad: euler.euler_ancestral_step(x, x, 1.0, 0.5, bad), "noise"),
        "linear_step": (lambda x, bad: linear_step.linear_step(x, x, bad, cx=1.0, cm=0.0, p0=1.0, px=0.0), "extra"),
    }


@pytest.mark.parametrize("launcher", ["ddim_step", "cfg_ddim_step", "ddpm_step", "euler_step", "euler_ancestral_step",
                                      "linear_step"])
def test_step_launchers_called_directly_name_the_bad_argument(launcher):
    """The scheduler-step launchers in diffusion_fast.kernels check their arguments as ops does: before, a tensor of
    another batch size was read past its end (silent garbage) and a float alpha failed deep inside Triton."""
    call, name = _step_launcher_calls()[launcher]
    x = torch.randn(2, 4, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match=name):
        call(x, x[:1])


def test_step_launchers_take_the_coefficients_ops_takes():
    """A float, a 0-d or a (1,) alpha means every sample's (a (1,) tensor was read past its end for sample 1)."""
    from diffusion_fast.kernels import ddim

    gen = torch.Generator().manual_seed(3)
    u, t, x = (torch.randn(2, 4, 8, 8, generator=gen).to(DEVICE) for _ in range(3))
    want = ops.cfg_ddim_step(u, t, 7.5, x, torch.full((2,), 0.3, device=DEVICE), torch.full((2,), 0.4, device=DEVICE),
                             backend="triton")
    for a_t, a_prev in ((0.3, 0.4), (torch.tensor(0.3), torch.tensor([0.4], device=DEVICE))):
        got = ddim.cfg_ddim_step(u, t, 7.5, x, a_t, a_prev)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
