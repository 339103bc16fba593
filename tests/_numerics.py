"""Numerics helpers shared by the kernel and op tests: poisoned outputs and flash-attention's 2x rule."""
import contextlib

import torch


@contextlib.contextmanager
def poisoned_allocations():
    """Make torch.empty / empty_like / empty_strided return NaN-filled floating tensors inside the block.

    Kernels allocate their outputs with these, so an element the kernel fails to write stays NaN and fails the test.
    """
    originals = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}

    def wrap(fn):
        def poisoned(*args, **kwargs):
            t = fn(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            return t

        return poisoned

    try:
        for name, fn in originals.items():
            setattr(torch, name, wrap(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


from diffusion_fast.numerics import max_abs_err  # noqa: E402  (one definition, shared with `check`)


def assert_2x_rule(out, ref64, torch_out, *, floor, what=""):
    """flash-attention's rule: |out - ref64| <= 2 * |torch_out - ref64| + floor, and every element finite.

    ``ref64`` is the reference run in float64; ``torch_out`` is plain PyTorch run in the same dtype as ``out``.
    """
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    n_bad = (~torch.isfinite(out)).sum().item()
    assert n_bad == 0, f"{what}: {n_bad} non-finite elements (unwritten output or overflow)"
    err = max_abs_err(out, ref64)
    base = max_abs_err(torch_out, ref64)
    assert err <= 2 * base + floor, f"{what}: error {err:.3e} > 2 x PyTorch's {base:.3e} + {floor:.1e}"
    return err, base


# The scheduler-step kernels' 2x-rule floors (each step's few roundings, relative to max(|x|, 1)), and the dtypes
# their tests run: bf16 only on a GPU (the interpreter has no bf16 arithmetic)
STEP_FLOOR = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
STEP_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
