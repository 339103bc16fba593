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
