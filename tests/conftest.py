"""Test setup shared by every test file.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before triton is first
imported: this file is loaded by pytest before any test module, so it sets TRITON_INTERPRET=1 here. With a GPU the
same tests run the compiled kernels on CUDA tensors.
"""
import os

# One intra-op thread per pytest-xdist worker: the suite runs two workers on two cores, and with PyTorch's default (a
# thread per core in each worker) OpenMP's waiting threads spin on the cores the other worker needs. Measured on the
# 2-core machine: tests/test_pipeline.py under -n 2 took 5.6 min, and 47 s with one thread each. Tests of paths that
# depend on the thread count ask for the machine's count with the `all_threads` fixture.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

MACHINE_THREADS = os.cpu_count() or 1
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from diffusion_fast._source_tree import unshadow_hf_kernels  # noqa: E402

unshadow_hf_kernels()  # (before anything imports diffusers: from the source tree, Hugging Face's `kernels` first)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
# diffusers' LMSDiscreteScheduler (the reference for ours) integrates with scipy: the test extra installs it; the GPU
# machine's image may not have it, and there those comparisons are skipped, saying why
try:
    import scipy  # noqa: F401

    HAS_SCIPY = True
except ImportError:
    HAS_SCIPY = False
NEEDS_SCIPY = pytest.mark.skipif(not HAS_SCIPY, reason="diffusers' LMSDiscreteScheduler needs scipy")


@pytest.fixture
def all_threads():
    """PyTorch's intra-op threads set to the machine's core count for one test (the C++ ops' parallel paths depend
    on it), then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(MACHINE_THREADS)
    yield MACHINE_THREADS
    torch.set_num_threads(before)


def pytest_sessionstart(session):
    """Triton 3.6's interpreter (torch 2.11's) reads a runtime loop bound with int() of a 1-element array, which
    numpy 2.4 refuses (2.3 warns); Triton 3.8 squeezes it first. Our kernels loop to runtime bounds, so that pairing
    fails ~90 kernel tests with one cryptic TypeError each: say so once instead."""
    if ON_GPU:
        return
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_to_a_runtime_bound(out_ptr, n):
        total = 0
        for _ in range(0, n, 1):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_to_a_runtime_bound[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - reported whole, below
        pytest.exit(f"Triton {triton.__version__}'s interpreter cannot run a loop to a runtime bound with numpy "
                    f"{numpy.__version__} ({type(exc).__name__}: {exc}); install numpy<2.4 or a newer Triton "
                    "(3.8 works)", returncode=3)


def _patch_language_once_per_launch():
    """Triton's interpreter patches triton.language for the interpreter at each kernel launch (undone after it), and
    again at every call of a @triton.jit helper inside the kernel: inspect.getmembers over the language modules,
    thousands of times a launch, where the launch's patch is already in place and a repeat changes nothing (a
    patched builtin is no longer a builtin). Profiled on GroupNorm's split path: half the time of an interpreted
    launch. A helper's call now skips the repeat when every language module its globals hold is patched already:
    the GroupNorm, attention and DDIM kernel tests took 63 s instead of 110 s under -n 2. Applied only to an
    interpreter with these internals (Triton 3.9's); another runs as it ships, slower."""
    from triton.runtime import interpreter
    import triton.language as tl

    real = getattr(interpreter, "_patch_lang", None)
    scope = getattr(interpreter, "_LangPatchScope", None)
    if real is None or scope is None or not callable(getattr(tl.core, "is_builtin", None)):
        return

    def patch_lang(fn):
        langs = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
        if langs and all(not tl.core.is_builtin(getattr(lang, "load", None)) for lang in langs):
            return scope()  # patched by the running launch: nothing to add, nothing to undo
        return real(fn)

    interpreter._patch_lang = patch_lang


if not ON_GPU:
    _patch_language_once_per_launch()


@pytest.fixture
def device():
    return DEVICE


def pytest_configure(config):
    config.addinivalue_line("markers", "cli_on_gpu: the CLI's --device auto keeps its meaning (cuda on a GPU machine)")


@pytest.fixture(autouse=True)
def _cli_auto_device_is_the_cpu(request, monkeypatch):
    """The CLI's ``--device auto`` means the CPU in tests, on a GPU machine too, unless a test is marked cli_on_gpu.

    The CLI tests hold its images to diffusers' made in float32 on the CPU, within one 8-bit level. On the H200 auto
    picked cuda in float16, where the noise is drawn in float16 (as diffusers draws it there): another image, off by
    up to 255 levels in 40 tests. The CLI's own GPU runs are the tests marked cli_on_gpu (check's fp16 rules against
    the fp32 reference)."""
    if not ON_GPU or request.node.get_closest_marker("cli_on_gpu"):
        return
    from diffusion_fast import cli, generate

    real = cli._device
    monkeypatch.setattr(cli, "_device", lambda name: real("cpu" if name == "auto" else name))
    monkeypatch.setattr(generate, "_device", cli._device)


def pytest_report_header(config):
    import triton

    return (
        f"diffusion_fast tests on {DEVICE} ({torch.cuda.get_device_name() if ON_GPU else 'CPU, Triton interpreter'}), "
        f"torch {torch.__version__}, triton {triton.__version__}"
    )
