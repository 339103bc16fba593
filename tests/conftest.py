"""Test setup shared by every test file.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before triton is first
imported: this file is loaded by pytest before any test module, so it sets TRITON_INTERPRET=1 here. With a GPU the
same tests run the compiled kernels on CUDA tensors.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


@pytest.fixture
def device():
    return DEVICE


def pytest_report_header(config):
    import triton

    return (
        f"diffusion_fast tests on {DEVICE} ({torch.cuda.get_device_name() if ON_GPU else 'CPU, Triton interpreter'}), "
        f"torch {torch.__version__}, triton {triton.__version__}"
    )
