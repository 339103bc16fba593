"""Compiler flags for the C++ extension, shared by setup.py (the build at install) and _cpp.py (the just-in-time
build when the prebuilt module is missing), so both builds compile the same code paths.

No torch import here: setup.py loads this file by path before the package can be imported.
"""
import os


def native_vector_flags():
    """-mavx2 -mfma (and -mf16c) when the building machine has them (the extension is built where it runs), so the
    step and GroupNorm loops vectorise 8 floats wide, the AVX2 SiLU intrinsics are compiled and fp16 converts in
    registers; nothing otherwise.
    DIFFUSION_FAST_PORTABLE=1 turns this off."""
    if os.environ.get("DIFFUSION_FAST_PORTABLE"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return []
    if not {"avx2", "fma"} <= flags:
        return []
    return ["-mavx2", "-mfma"] + (["-mf16c"] if "f16c" in flags else [])  # F16C: vectorised fp16 <-> fp32


def cxx_flags():
    """The C++ compile flags. No -std: BuildExtension adds the standard its torch wants (C++20 in torch 2.13 and
    2.14); a fixed -std=c++17 overrode it, and torch 2.14's headers refuse C++17. DIFFUSION_FAST_NO_OPENMP=1 builds
    without OpenMP (at::parallel_for then runs on torch's own thread pool backend, or serially)."""
    flags = ["-O3", "-fno-trapping-math"] + native_vector_flags()
    if not os.environ.get("DIFFUSION_FAST_NO_OPENMP"):
        flags.append("-fopenmp")
    return flags


def link_flags():
    return ["-fopenmp"] if "-fopenmp" in cxx_flags() else []
