"""The ops with dispatch: one entry point per op, validating input and picking an implementation.

``backend="auto"`` follows the ``diffusion_fast.backend(...)`` block in force: under "reference" the plain PyTorch
reference runs; under "fast" (the default) CUDA tensors go to the Triton kernels and CPU tensors to the C++
extension (attention on CPU goes to PyTorch's fused ``scaled_dot_product_attention``: there is no C++ attention op).
``"triton"``, ``"cpp"`` and ``"reference"`` name one implementation explicitly; ``"triton"`` on CPU tensors needs
``TRITON_INTERPRET=1`` set before triton is imported. When the chosen implementation is unavailable (no C++
extension built, no triton installed, a head dim the kernel does not cover) the op falls back with one warning.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from . import _cpp, _triton_compiled, _validate, reference
from ._backend import current_backend

IMPLEMENTATIONS = ("auto", "triton", "cpp", "reference")
_warned: set = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _cpp_ops():
    return _cpp.load_ops()  # torch.ops.diffusion_fast, or None with a warning already given


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def _resolve(op: str, backend: str, device: torch.device, *, has_triton=True, has_cpp=True) -> str:
    if backend not in IMPLEMENTATIONS:
        raise ValueError(f"backend must be one of {IMPLEMENTATIONS}, got {backend!r}")
    explicit = backend != "auto"
    if not explicit:
        ctx = current_backend()
        if ctx == "reference":
            return "reference"
        if ctx in ("triton", "cpp"):
            backend = ctx
        elif device.type == "cuda":
            backend = "triton" if has_triton else "cpp"
        else:
            backend = "cpp"
    if backend == "triton":
        if not has_triton:
            if explicit:
                raise ValueError(f"{op} has no Triton kernel; use backend='cpp' or 'reference'")
            backend = "cpp"
        elif not _triton_usable(device):
            raise RuntimeError(
                f"{op}: backend 'triton' on {device.type} tensors needs TRITON_INTERPRET=1 set before triton is "
                "imported (the Triton interpreter, for correctness only); move the tensors to CUDA or use "
                "backend='cpp' or 'reference'"
            )
        else:
            return "triton"
    if backend == "cpp":
        if not has_cpp:
            if explicit:
                raise ValueError(f"{op} has no C++ implementation; use backend='triton' or 'reference'")
            return "torch"
        if _cpp_ops() is None:
            warn_once(f"cpp-missing-{op}", f"diffusion_fast: C++ extension unavailable, {op} runs the reference")
            return "reference"
        if device.type == "cuda" and not _cpp_has_cuda():
            warn_once(f"cpp-nocuda-{op}", f"diffusion_fast: C++ extension built without CUDA, {op} runs the reference")
            return "reference"
        return "cpp"
    return "reference"


def _cpp_has_cuda() -> bool:
    return _cpp.has_cuda()


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=True, backend="auto"):
    """GroupNorm (statistics in fp32) with optional affine and optional fused SiLU; NCHW or channels_last."""
    _validate.group_norm_args(x, num_groups, weight, bias, eps)
    return _group_norm_silu(x, num_groups, weight, bias, eps, silu, backend)


def _group_norm_silu(x, num_groups, weight, bias, eps, silu=True, backend="auto"):
    """``group_norm_silu`` without the Python argument checks, for callers whose arguments are valid by construction
    (a GroupNorm module's own parameters: our models, the accelerate patches). In a model this Python runs cold
    between convolutions, where the checks cost as much as a small GroupNorm. The C++ op and F.group_norm still
    check their arguments; the Triton launcher's unchecked entry refuses only a dtype or device it cannot run."""
    impl = _resolve("group_norm_silu", backend, x.device)
    if impl == "triton":
        if torch.compiler.is_compiling():  # one opaque node for torch.compile (diffusion_fast/_triton_compiled.py)
            return _triton_compiled.group_norm_silu(x, num_groups, weight, bias, float(eps), bool(silu))
        from .kernels.group_norm_silu import _group_norm_silu_unchecked as kernel

        return kernel(x, num_groups, weight, bias, eps, silu)
    if impl == "cpp":
        return _cpp_ops().group_norm_silu(x, num_groups, weight, bias, float(eps), bool(silu))
    return reference.group_norm_silu(x, num_groups, weight, bias, eps, silu=silu, upcast=True)


def attention(q, k, v, *, scale=None, backend="auto"):
    """softmax(q k^T * scale) v, q (B, H, Lq, D), k and v (B, H, Lk, D), without materialising Lq x Lk on the GPU."""
    _validate.attention_args(q, k, v, scale)
    return _attention(q, k, v, scale, backend)


def _attention(q, k, v, scale=None, backend="auto"):
    """``attention`` without the Python argument checks, for our models and the accelerate processor, which build
    q, k and v themselves (the Triton launcher and SDPA still refuse what they cannot run)."""
    impl = _resolve("attention", backend, q.device, has_cpp=False)
    if impl == "triton":
        from .kernels import attention as kernel

        if not kernel.supports(q):
            warn_once(
                f"attn-fallback-{q.shape[-1]}-{q.dtype}",
                f"diffusion_fast: attention head dim {q.shape[-1]} ({q.dtype}) is outside the Triton kernel's range "
                f"(head dim <= {kernel.MAX_HEAD_DIM}); using torch scaled_dot_product_attention",
            )
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if torch.compiler.is_compiling():
            return _triton_compiled.attention(q, k, v, None if scale is None else float(scale))
        return kernel._attention_unchecked(q, k, v, scale)
    if impl == "torch":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return reference.attention(q, k, v, scale=scale, upcast=True)


def _step_common(op, backend, named, ref_name, alpha_prod_t, alpha_prod_t_prev, eta, variance_noise, prediction_type,
                 clip, **resolve_kw):
    """The checks every step op shares; returns (sample, impl, a_t, a_prev, eta, clip). The C++ ops check float32
    alphas themselves and broadcast a single one (0-d or (1,)), so for them such tensors are passed as they are."""
    sample = _validate.step_tensors(named, ref_name)
    impl = _resolve(op, backend, sample.device, **resolve_kw)
    op_checks = impl == "cpp"
    a_t = _validate.per_sample_coefficient("alpha_prod_t", alpha_prod_t, sample, op_checks=op_checks)
    a_prev = _validate.per_sample_coefficient("alpha_prod_t_prev", alpha_prod_t_prev, sample, op_checks=op_checks)
    eta = _validate.finite_float("eta", eta, non_negative=True)
    _validate.prediction_type(prediction_type)
    if clip is not None:
        clip = _validate.finite_float("clip_sample_range", clip, positive=True)
    if eta > 0 and variance_noise is None:
        raise ValueError("variance_noise is required when eta > 0 (a tensor shaped like sample)")
    return sample, impl, a_t, a_prev, eta, clip


def ddim_step(
    model_output,
    sample,
    alpha_prod_t,
    alpha_prod_t_prev,
    *,
    eta=0.0,
    variance_noise=None,
    prediction_type="epsilon",
    clip_sample_range=None,
    use_clipped_model_output=False,
    backend="auto",
):
    """One DDIM update in one pass (computed in fp32). Returns (prev_sample, pred_original_sample)."""
    named = {"sample": sample, "model_output": model_output, "variance_noise": variance_noise}
    sample, impl, a_t, a_prev, eta, clip = _step_common(
        "ddim_step", backend, named, "sample", alpha_prod_t, alpha_prod_t_prev, eta, variance_noise, prediction_type,
        clip_sample_range,
    )
    args = (eta, variance_noise if eta > 0 else None, prediction_type, clip, bool(use_clipped_model_output))
    if impl == "triton":
        from .kernels.ddim import _cfg_ddim_step_unchecked as kernel

        return kernel(model_output, None, sample, a_t, a_prev, 1.0, *args)
    if impl == "cpp":
        return tuple(_cpp_ops().ddim_step(model_output, sample, a_t, a_prev, *args))
    return reference.ddim_step(
        model_output, sample, a_t, a_prev, eta=eta, variance_noise=args[1], prediction_type=prediction_type,
        clip_sample_range=clip, use_clipped_model_output=bool(use_clipped_model_output), upcast=True,
    )


def cfg_ddim_step(
    noise_pred_uncond,
    noise_pred_text,
    guidance_scale,
    sample,
    alpha_prod_t,
    alpha_prod_t_prev,
    *,
    eta=0.0,
    variance_noise=None,
    prediction_type="epsilon",
    clip_sample_range=None,
    use_clipped_model_output=False,
    backend="auto",
):
    """Classifier-free guidance combine + DDIM update in a single launch. Returns (prev_sample, pred_original_sample)."""
    named = {
        "sample": sample, "noise_pred_uncond": noise_pred_uncond, "noise_pred_text": noise_pred_text,
        "variance_noise": variance_noise,
    }
    sample, impl, a_t, a_prev, eta, clip = _step_common(
        "cfg_ddim_step", backend, named, "sample", alpha_prod_t, alpha_prod_t_prev, eta, variance_noise,
        prediction_type, clip_sample_range,
    )
    guidance_scale = _validate.finite_float("guidance_scale", guidance_scale)
    args = (eta, variance_noise if eta > 0 else None, prediction_type, clip, bool(use_clipped_model_output))
    if impl == "triton":
        from .kernels.ddim import _cfg_ddim_step_unchecked as kernel

        return kernel(noise_pred_uncond, noise_pred_text, sample, a_t, a_prev, guidance_scale, *args)
    if impl == "cpp":
        return tuple(
            _cpp_ops().cfg_ddim_step(noise_pred_uncond, noise_pred_text, guidance_scale, sample, a_t, a_prev, *args)
        )
    return reference.cfg_ddim_step(
        noise_pred_uncond, noise_pred_text, guidance_scale, sample, a_t, a_prev, eta=eta, variance_noise=args[1],
        prediction_type=prediction_type, clip_sample_range=clip,
        use_clipped_model_output=bool(use_clipped_model_output), upcast=True,
    )


def ddpm_step(
    model_output,
    sample,
    alpha_prod_t,
    alpha_prod_t_prev,
    *,
    std=0.0,
    variance_noise=None,
    prediction_type="epsilon",
    clip_sample_range=None,
    backend="auto",
):
    """One DDPM ancestral update; ``std`` (float or per-sample) scales ``variance_noise``. Returns (prev, x0)."""
    named = {"sample": sample, "model_output": model_output, "variance_noise": variance_noise}
    sample, impl, a_t, a_prev, _, clip = _step_common(
        "ddpm_step", backend, named, "sample", alpha_prod_t, alpha_prod_t_prev, 0.0, None, prediction_type,
        clip_sample_range,
    )
    if variance_noise is None and (torch.is_tensor(std) or std != 0):
        raise ValueError("variance_noise is required when std is non-zero or a tensor (a tensor shaped like sample)")
    std_t = _validate.per_sample_coefficient("std", std, sample, op_checks=impl == "cpp")
    if impl == "triton":
        from .kernels.ddpm import _ddpm_step_unchecked as kernel

        return kernel(model_output, sample, a_t, a_prev, std_t, variance_noise, prediction_type, clip)
    if impl == "cpp":
        return tuple(_cpp_ops().ddpm_step(model_output, sample, a_t, a_prev, std_t, variance_noise, prediction_type, clip))
    return reference.ddpm_step(
        model_output, sample, a_t, a_prev, std=std_t, variance_noise=variance_noise,
        prediction_type=prediction_type, clip_sample_range=clip, upcast=True,
    )


def euler_step(
    model_output,
    sample,
    sigma,
    sigma_next,
    *,
    gamma=0.0,
    s_noise=1.0,
    noise=None,
    prediction_type="epsilon",
    backend="auto",
):
    """One Euler update (diffusers' EulerDiscreteScheduler.step), computed in fp32. Returns (prev, x0)."""
    _validate.tensor("sample", sample, min_dim=1)
    for name, t in (("model_output", model_output), ("noise", noise)):
        if t is not None:
            _validate.tensor(name, t, min_dim=1)
            _validate.same(name, t, "sample", sample, dtype=False)
    impl = _resolve("euler_step", backend, sample.device)
    sigma_t = _validate.per_sample_coefficient("sigma", sigma, sample, op_checks=impl == "cpp")
    sigma_next_t = _validate.per_sample_coefficient("sigma_next", sigma_next, sample, op_checks=impl == "cpp")
    gamma = _validate.finite_float("gamma", gamma, non_negative=True)
    s_noise = _validate.finite_float("s_noise", s_noise)
    _validate.prediction_type(prediction_type)
    if gamma > 0 and noise is None:
        raise ValueError("noise is required when gamma > 0 (a tensor shaped like sample)")
    if impl == "triton":
        from .kernels.euler import _euler_step_unchecked as kernel

        return kernel(model_output, sample, sigma_t, sigma_next_t, noise if gamma > 0 else None, gamma, s_noise,
                      prediction_type, ancestral=False)
    if impl == "cpp":
        return tuple(
            _cpp_ops().euler_step(model_output, sample, sigma_t, sigma_next_t, gamma, s_noise, noise, prediction_type)
        )
    return reference.euler_step(
        model_output, sample, sigma_t, sigma_next_t, gamma=gamma, s_noise=s_noise, noise=noise,
        prediction_type=prediction_type, upcast=True,
    )


def euler_ancestral_step(model_output, sample, sigma, sigma_next, noise, *, prediction_type="epsilon",
                         backend="auto"):
    """One ancestral Euler update (diffusers' EulerAncestralDiscreteScheduler.step), computed in fp32; ``noise`` is
    the step's fresh noise, shaped like sample. Returns (prev, x0) in model_output's dtype."""
    _validate.tensor("sample", sample, min_dim=1)
    for name, t in (("model_output", model_output), ("noise", noise)):
        _validate.tensor(name, t, min_dim=1)
        _validate.same(name, t, "sample", sample, dtype=False)
    impl = _resolve("euler_ancestral_step", backend, sample.device)
    sigma_t = _validate.per_sample_coefficient("sigma", sigma, sample, op_checks=impl == "cpp")
    sigma_next_t = _validate.per_sample_coefficient("sigma_next", sigma_next, sample, op_checks=impl == "cpp")
    _validate.prediction_type(prediction_type)
    if impl == "triton":
        from .kernels.euler import _euler_step_unchecked as kernel

        return kernel(model_output, sample, sigma_t, sigma_next_t, noise, 0.0, 1.0, prediction_type, ancestral=True)
    if impl == "cpp":
        return tuple(_cpp_ops().euler_ancestral_step(model_output, sample, sigma_t, sigma_next_t, noise,
                                                     prediction_type))
    return reference.euler_ancestral_step(model_output, sample, sigma_t, sigma_next_t, noise,
                                          prediction_type=prediction_type, upcast=True)


def linear_step(model_output, sample, extra=None, *, cx, cm, p0, px, pm=0.0, pe=0.0, backend="auto"):
    """One pass of ``x0 = cx * sample + cm * model_output``, ``prev = p0 * x0 + px * sample + pm * model_output +
    pe * extra``, computed in fp32, with coefficients the caller computed (the same for every sample). Returns
    (prev, x0) in model_output's dtype."""
    _validate.tensor("sample", sample, min_dim=1)
    named = (("model_output", model_output),) + ((("extra", extra),) if extra is not None else ())
    for name, t in named:
        _validate.tensor(name, t, min_dim=1)
        _validate.same(name, t, "sample", sample, dtype=False)
    coefficients = {name: _validate.finite_float(name, value)
                    for name, value in (("cx", cx), ("cm", cm), ("p0", p0), ("px", px), ("pm", pm), ("pe", pe))}
    impl = _resolve("linear_step", backend, sample.device)
    if impl == "triton":
        from .kernels.linear_step import _linear_step_unchecked as kernel

        return kernel(model_output, sample, extra, **coefficients)
    if impl == "cpp":
        return tuple(_cpp_ops().linear_step(model_output, sample, extra, *coefficients.values()))
    return reference.linear_step(model_output, sample, extra, upcast=True, **coefficients)
