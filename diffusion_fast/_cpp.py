"""Loading the C++ extension: prebuilt, else built just in time, else one warning (the ops then run the reference).

``import diffusion_fast`` calls ``load_ops()``, so ``torch.ops.diffusion_fast.*`` exist afterwards. The extension is
normally built at install (``pip install --no-build-isolation -e .``). When that module is missing, the sources in
``csrc/`` beside the package are compiled with ``torch.utils.cpp_extension.load`` (about a minute, once; cached by
torch), announced by a warning; ``DIFFUSION_FAST_NO_JIT=1`` skips that. Fake (meta) implementations are registered
so the ops work under torch.compile and FakeTensor tracing.
"""
from __future__ import annotations

import glob
import os
import threading
import warnings
from pathlib import Path

import torch

from ._build_flags import cxx_flags, link_flags

_lock = threading.Lock()
_state = {"loaded": None, "tried": False}
CSRC = Path(__file__).resolve().parent.parent / "csrc"
OPS = ("ddim_step", "cfg_ddim_step", "ddpm_step", "euler_step", "euler_ancestral_step", "linear_step",
       "group_norm_silu")


def _jit_build():
    from torch.utils.cpp_extension import CUDA_HOME, load

    sources = sorted(glob.glob(str(CSRC / "*.cpp")))
    if not sources:
        raise FileNotFoundError(f"no C++ sources in {CSRC} (an installed wheel without a built extension?)")
    cuda = sorted(glob.glob(str(CSRC / "cuda" / "*.cu")))
    use_cuda = (bool(cuda) and torch.version.cuda is not None and CUDA_HOME is not None
                and not os.environ.get("DIFFUSION_FAST_NO_CUDA"))  # as in setup.py
    warnings.warn("diffusion_fast: the prebuilt C++ extension is missing; building it now (about a minute, once)",
                  RuntimeWarning, stacklevel=4)
    load(name="diffusion_fast_C", sources=sources + (cuda if use_cuda else []), extra_cflags=cxx_flags(),
         extra_ldflags=link_flags(), extra_cuda_cflags=["-O3"], is_python_module=False, verbose=False)


def load_ops():
    """torch.ops.diffusion_fast once its ops are registered, or None (after one warning) if they cannot be."""
    if _state["tried"]:
        return _state["loaded"]
    with _lock:
        if _state["tried"]:
            return _state["loaded"]
        try:
            try:
                from . import _C  # noqa: F401  (loading the library registers the ops)
            except ImportError:
                if os.environ.get("DIFFUSION_FAST_NO_JIT") == "1":
                    raise
                _jit_build()
            _register_fakes()
            _state["loaded"] = torch.ops.diffusion_fast
        except Exception as exc:  # the fallback is announced, never silent
            warnings.warn(f"diffusion_fast: C++ extension unavailable ({type(exc).__name__}: {exc}); CPU ops run the "
                          "plain-PyTorch reference", RuntimeWarning, stacklevel=3)
            _state["loaded"] = None
        _state["tried"] = True
        return _state["loaded"]


def has_cuda() -> bool:
    """Whether the loaded extension has CUDA kernels (built with nvcc against a CUDA torch)."""
    return load_ops() is not None and torch._C._dispatch_has_kernel_for_dispatch_key("diffusion_fast::ddim_step", "CUDA")


def _same_device(anchor_name, anchor, **tensors):
    """The real ops' first check, in their fakes: every tensor argument on the anchor's device. The dispatcher also
    routes a call with a meta tensor among real ones to the fake (Meta outranks CPU), which would otherwise hand back
    uninitialised memory for, say, a meta weight left by sequential CPU offload."""
    for name, t in tensors.items():
        if t is not None and t.device != anchor.device:
            raise ValueError(f"{name} is on {t.device} but {anchor_name} is on {anchor.device}")


def _register_fakes():
    if getattr(_register_fakes, "done", False):
        return

    # The outputs' strides must be the real ops': the step ops read their inputs contiguously and write contiguous
    # outputs whatever the sample's layout; the GroupNorm keeps channels_last and makes any other layout contiguous.
    # (empty_like would keep a channels_last or permuted sample's strides, which torch.compile would then trust.)
    def two_like(sample, dtype=None):
        return tuple(sample.new_empty(sample.shape, dtype=dtype) for _ in range(2))

    @torch.library.register_fake("diffusion_fast::ddim_step")
    def _(model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta, variance_noise, prediction_type,
          clip_sample_range, use_clipped_model_output):
        _same_device("sample", sample, model_output=model_output, alpha_prod_t=alpha_prod_t,
                     alpha_prod_t_prev=alpha_prod_t_prev, variance_noise=variance_noise)
        return two_like(sample)

    @torch.library.register_fake("diffusion_fast::cfg_ddim_step")
    def _(noise_pred_uncond, noise_pred_text, guidance_scale, sample, alpha_prod_t, alpha_prod_t_prev, eta,
          variance_noise, prediction_type, clip_sample_range, use_clipped_model_output):
        _same_device("sample", sample, noise_pred_uncond=noise_pred_uncond, noise_pred_text=noise_pred_text,
                     alpha_prod_t=alpha_prod_t, alpha_prod_t_prev=alpha_prod_t_prev, variance_noise=variance_noise)
        return two_like(sample)

    @torch.library.register_fake("diffusion_fast::ddpm_step")
    def _(model_output, sample, alpha_prod_t, alpha_prod_t_prev, std, variance_noise, prediction_type,
          clip_sample_range):
        _same_device("sample", sample, model_output=model_output, alpha_prod_t=alpha_prod_t,
                     alpha_prod_t_prev=alpha_prod_t_prev, std=std, variance_noise=variance_noise)
        return two_like(sample)

    @torch.library.register_fake("diffusion_fast::euler_step")
    def _(model_output, sample, sigma, sigma_next, gamma, s_noise, noise, prediction_type):
        _same_device("sample", sample, model_output=model_output, sigma=sigma, sigma_next=sigma_next, noise=noise)
        return two_like(sample, model_output.dtype)

    @torch.library.register_fake("diffusion_fast::euler_ancestral_step")
    def _(model_output, sample, sigma, sigma_next, noise, prediction_type):
        _same_device("sample", sample, model_output=model_output, sigma=sigma, sigma_next=sigma_next, noise=noise)
        return two_like(sample, model_output.dtype)

    @torch.library.register_fake("diffusion_fast::linear_step")
    def _(model_output, sample, extra, cx, cm, p0, px, pm, pe):
        _same_device("sample", sample, model_output=model_output, extra=extra)
        return two_like(sample, model_output.dtype)

    @torch.library.register_fake("diffusion_fast::group_norm_silu")
    def _(x, num_groups, weight, bias, eps, silu):
        _same_device("x", x, weight=weight, bias=bias)
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    _register_fakes.done = True
