"""Build and install diffusion_fast.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already installed (an isolated
build environment would pull the multi-GB CUDA build of torch). The C++ extension ``diffusion_fast._C`` is built
with CUDAExtension when this torch has CUDA and nvcc is found, otherwise with CppExtension. ``kernels/`` installs as
``diffusion_fast.kernels`` (never as a top-level ``kernels`` module: a Hugging Face package has that name).
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise SystemExit(
        "diffusion_fast builds a torch extension: install torch first (pip install torch==2.13.0), "
        "then pip install --no-build-isolation -e ."
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def native_vector_flags():
    """-mavx2 -mfma when the building machine has them (the extension is built where it runs), so the step and
    GroupNorm loops vectorise 8 floats wide; nothing otherwise. DIFFUSION_FAST_PORTABLE=1 turns this off."""
    if os.environ.get("DIFFUSION_FAST_PORTABLE"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else []


def extensions():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources:
        return []
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # no -std: BuildExtension adds the standard its torch wants (C++20 in torch 2.13 and 2.14). A fixed -std=c++17
    # overrode it, and torch 2.14's headers refuse C++17 ("C++20 or later compatible compiler is required").
    cxx_flags = ["-O3", "-fno-trapping-math"] + native_vector_flags()
    if not os.environ.get("DIFFUSION_FAST_NO_OPENMP"):
        cxx_flags.append("-fopenmp")
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("DIFFUSION_FAST_NO_CUDA"):
        use_cuda = False
    if use_cuda:
        return [CUDAExtension(
            "diffusion_fast._C",
            cpp_sources + cuda_sources,
            define_macros=[("DIFFUSION_FAST_WITH_CUDA", "1")],
            # no --use_fast_math: a_t / a_prev must be exactly 1 when they are equal (no noise at the last step)
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
        )]
    return [CppExtension(
        "diffusion_fast._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
    )]


setup(
    name="diffusion_fast",
    version="0.1.0",
    description="Fused Triton and C++ kernels for diffusion-model sampling, checked against a PyTorch reference",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "diffusion_fast",
        "diffusion_fast.models",
        "diffusion_fast.schedulers",
        "diffusion_fast.kernels",
    ],
    package_dir={"diffusion_fast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "numpy",
        "safetensors",
        "transformers>=4.40",
        "Pillow",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "diffusers>=0.30", "accelerate"],
        "diffusers": ["diffusers>=0.30"],
    },
    entry_points={"console_scripts": ["diffusion-fast=diffusion_fast.cli:main"]},
)
