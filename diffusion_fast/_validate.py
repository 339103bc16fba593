"""Argument checks shared by the ops, the Triton launchers and the C++ op wrappers.

Every check raises TypeError or ValueError with a message that names the argument, so bad input never reaches a
kernel (where it would crash, or worse, compute garbage).
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def tensor(name: str, value, *, dtypes=FLOAT_DTYPES, min_dim: int | None = None, dim: int | None = None):
    if not torch.is_tensor(value):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name} must be {dim}-d, got shape {tuple(value.shape)}")
    if min_dim is not None and value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)})")
    return value


def same(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor, *, shape=True, dtype=True):
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")
    if shape and value.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    if dtype and value.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but {ref_name} has dtype {ref.dtype}")


def finite_float(name: str, value, *, positive=False, non_negative=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def auto_or_bool(name: str, value):
    """A setting that is "auto", True or False (cuda_graph, channels_last, attention...)."""
    if value is not True and value is not False and not (isinstance(value, str) and value == "auto"):
        raise ValueError(f"{name} must be 'auto', True or False, got {value!r}")
    return value


def prediction_type(value) -> str:
    if value not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {value!r}")
    return value


def group_norm_args(x, num_groups, weight, bias, eps):
    tensor("x", x, min_dim=2)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must be positive and divide the channel count {channels} of x")
    if weight is not None:  # two plain calls, no loop over a tuple: this runs for every GroupNorm of a model
        _channel_vector("weight", weight, x, channels)
    if bias is not None:
        _channel_vector("bias", bias, x, channels)
    finite_float("eps", eps, positive=True)


def _channel_vector(name, t, x, channels):
    tensor(name, t, dim=1)
    if t.shape[0] != channels:
        raise ValueError(f"{name} must have {channels} elements (the channels of x), got {t.shape[0]}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def attention_args(q, k, v, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(name, t, dim=4)
    same("k", k, "q", q, shape=False)
    same("v", v, "q", q, shape=False)
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has shape {tuple(v.shape)}; they must match")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q (B, H, Lq, D) = {tuple(q.shape)} and k (B, H, Lk, D) = {tuple(k.shape)} must agree on B, H and D"
        )
    if scale is not None:
        finite_float("scale", scale, positive=True)


def step_tensors(named: dict, ref_name: str):
    """Check the latent-shaped step inputs: same shape, dtype and device as ``ref_name``."""
    ref = tensor(ref_name, named[ref_name], min_dim=1)
    shape, dtype, device = ref.shape, ref.dtype, ref.device  # read once: each tensor attribute read costs
    for name, t in named.items():
        if t is None or name == ref_name:
            continue
        if torch.is_tensor(t) and t.shape == shape and t.dtype == dtype and t.device == device:
            continue  # like ref in every checked respect, so valid as ref is
        tensor(name, t, min_dim=1)
        same(name, t, ref_name, ref)
    return ref


def per_sample_coefficient(name: str, value, sample: torch.Tensor, *, positive=False, op_checks=False) -> torch.Tensor:
    """A float or tensor coefficient as a float32 (B,) tensor on sample's device.

    Accepts a Python float, a 0-d tensor, a (B,) tensor, or a (B, 1, ..., 1) tensor. NaN/inf are rejected for floats
    and CPU tensors; CUDA tensors are not inspected (that would force a host sync). ``op_checks``: the caller's
    implementation (the C++ ops) takes a float32 tensor on sample's device holding B values or one value for all
    samples (0-d or (1,)), and checks its shape and, on the CPU, its values itself, so such a tensor is returned as it
    is: no tensor is built and nothing is checked twice per step.
    """
    batch = sample.shape[0]
    if (op_checks and torch.is_tensor(value) and value.dtype is torch.float32 and value.ndim <= 1
            and value.numel() in (1, batch) and value.device == sample.device):
        return value
    if not torch.is_tensor(value):
        v = finite_float(name, value)
        if positive and v <= 0:
            raise ValueError(f"{name} must be > 0, got {v}")
        return torch.full((batch,), v, dtype=torch.float32, device=sample.device)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a float or a floating-point tensor, got dtype {value.dtype}")
    # This runs twice per sampler step, so the two common cases take the fewest torch calls (each costs microseconds,
    # as much as the C++ step itself on small latents): a 0-d CPU tensor is read (free on the CPU), and a (B,) float32
    # tensor already on sample's device is returned as it is.
    if value.ndim == 0 and value.is_cpu:
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"{name} contains NaN or inf: {[v] * batch}")
        return torch.full((batch,), v, dtype=torch.float32, device=sample.device)
    if (value.ndim == 1 and value.shape[0] == batch and value.dtype is torch.float32 and value.device == sample.device
            and value.is_contiguous()):
        if value.is_cpu and not all(map(math.isfinite, value.tolist())):
            raise ValueError(f"{name} contains NaN or inf: {value.tolist()}")
        return value
    if value.dim() == 0:
        value = value.reshape(1).expand(batch)
    else:
        if value.shape[0] not in (1, batch) or any(s != 1 for s in value.shape[1:]):
            raise ValueError(
                f"{name} must be a float, a 0-d tensor, or a tensor of shape ({batch},) or ({batch}, 1, ...), "
                f"got shape {tuple(value.shape)}"
            )
        value = value.reshape(-1).expand(batch)
    if value.device != sample.device:
        value = value.to(sample.device)
    # (B,) values: a Python loop over them is ~10x cheaper than torch.isfinite(value).all(), which matters per step
    if value.device.type == "cpu" and not all(map(math.isfinite, value.tolist())):
        raise ValueError(f"{name} contains NaN or inf: {value.tolist()}")
    return value.to(torch.float32).contiguous()
