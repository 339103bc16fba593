"""Build and install diffusion_fast.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already installed (an isolated
build environment would pull the multi-GB CUDA build of torch). The C++ extension ``diffusion_fast._C`` is built
with CUDAExtension when this torch has CUDA and nvcc is found, otherwise with CppExtension. ``kernels/`` installs as
``diffusion_fast.kernels`` (never as a top-level ``kernels`` module: a Hugging Face package has that name).
"""
import glob
import os
import runpy

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


# the flags live in the package so that the just-in-time build (diffusion_fast/_cpp.py) uses the same ones; loaded by
# path because the package itself cannot be imported before it is built
BUILD_FLAGS = runpy.run_path(os.path.join(HERE, "diffusion_fast", "_build_flags.py"))


def extensions():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources:
        return []
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cxx_flags, link_flags = BUILD_FLAGS["cxx_flags"](), BUILD_FLAGS["link_flags"]()
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
            extra_link_args=link_flags,
        )]
    return [CppExtension(
        "diffusion_fast._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
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
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "diffusers>=0.30", "accelerate",
                 "peft", "scipy"],  # scipy: diffusers' LMS scheduler, the reference for ours
        "diffusers": ["diffusers>=0.30"],
    },
    entry_points={"console_scripts": ["diffusion-fast=diffusion_fast.cli:main"]},
)
