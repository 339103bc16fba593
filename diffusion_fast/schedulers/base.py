"""The scheduler classes' shared machinery: config handling (diffusers' fields, defaults, from_config,
from_pretrained), device tables, add_noise; the sigma schedulers' step index; the VP multistep solvers' schedule."""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from .._config import FrozenConfig
from .common import as_timestep_tensor, karras_sigmas, make_betas, read_config, timesteps_for_sigmas


def _device_key(device) -> str:
    """A device as a table-cache key: "cuda" and "cuda:0" (the current device) are one device. set_timesteps is
    usually given "cuda", the step a sample on "cuda:0"; two keys meant a second copy at the first step, a host
    round trip inside the sampling loop (seen on the H200)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _version_of(t: torch.Tensor):
    """t's in-place modification counter, or None for an inference-mode tensor (which has none: always re-copied)."""
    try:
        return t._version
    except RuntimeError:
        return None


class SchedulerBase:
    """Config handling shared by the schedulers: defaults, from_config, from_pretrained, unsupported fields."""

    defaults: dict = {}
    unsupported: dict = {}  # field -> the only value we implement
    order = 1

    def __init__(self, **kwargs):
        for field, allowed in self.unsupported.items():
            if field in kwargs:
                if kwargs[field] != allowed:
                    raise ValueError(
                        f"{type(self).__name__}: {field}={kwargs[field]!r} is not supported (only {allowed!r})")
                kwargs.pop(field)
        unknown = sorted(set(kwargs) - set(self.defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown config fields {unknown}")
        config = dict(self.defaults, **kwargs)
        self.config = FrozenConfig(config)
        self.num_inference_steps = None

    @classmethod
    def from_config(cls, config, **overrides):
        """Build from a dict/config (keys of other schedulers and ``_``-keys are ignored, as in diffusers)."""
        if isinstance(config, (str, os.PathLike)):
            return cls.from_pretrained(config, **overrides)
        known = set(cls.defaults) | set(cls.unsupported)
        config = dict(config)
        # diffusers marks the fields its writer left at their default: the reader takes its own default (as diffusers).
        implicit = set(config.get("_use_default_values", ()))
        fields = {k: v for k, v in config.items() if k in known and k not in implicit}
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_pretrained(cls, folder, subfolder=None, **overrides):
        return cls.from_config(read_config(folder, subfolder), **overrides)

    def _check_steps(self, num_inference_steps):
        n_train = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
        if not 0 < num_inference_steps <= n_train:
            raise ValueError(
                f"num_inference_steps must be in [1, {n_train}] (num_train_timesteps), got {num_inference_steps}")

    def _custom_schedule(self, name, values, num_inference_steps, *, descending=True, below=None):
        """A user-given schedule (diffusers' ``timesteps=`` / ``sigmas=``) as a 1-d float64 array, checked."""
        if num_inference_steps is not None:
            raise ValueError(f"pass num_inference_steps or {name}, not both")
        try:
            array = np.asarray(values.cpu() if torch.is_tensor(values) else values, dtype=np.float64)
        except (TypeError, ValueError):  # (numpy's own message would not name the argument)
            array = np.zeros((0,))
        if array.ndim != 1 or array.size < 1 or not np.isfinite(array).all():
            raise ValueError(f"{name} must be a non-empty 1-d list of finite numbers, got {values!r}")
        if descending and (np.diff(array) >= 0).any():
            raise ValueError(f"{name} must be in descending order, got {array.tolist()}")
        if below is not None and (array[0] >= below or array.min() < 0):
            raise ValueError(f"{name} must lie in [0, {below}) (num_train_timesteps), got {array.tolist()}")
        return array

    def _table(self, name, device):
        """A coefficient table cached on ``device`` (tables live on the sample's device: no host round trips).

        ``set_timesteps`` refreshes the cache (see ``_reset_tables``) and, given a device, fills it.
        """
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (name, _device_key(device))
        if key not in cache:
            source = getattr(self, name)
            # [the table's source, its version when copied, our own copy (updated in place later)]
            cache[key] = [source, _version_of(source), source.to(device, copy=True)]
        return cache[key][2]

    def _reset_tables(self, device, names=("alphas_cumprod",)):
        """Bring the cached device tables up to date after ``set_timesteps``, in place where the shape allows.

        In place matters: a captured CUDA graph reads a table by its address, so a table that was freed and
        reallocated would leave the graph reading whatever the allocator put there next (garbage, NaN images).
        """
        cache = self.__dict__.setdefault("_device_tables", {})
        for key, entry in list(cache.items()):
            source, version, table = entry
            fresh = getattr(self, key[0])
            if fresh is source and version is not None and _version_of(fresh) == version:
                continue  # unchanged (DDIM's alphas_cumprod): no copy, which on CUDA would wait for the device
            if fresh.shape == table.shape and fresh.dtype == table.dtype:
                table.copy_(fresh)
                entry[0], entry[1] = fresh, _version_of(fresh)
            else:  # a schedule-dependent table changed length (Euler's sigmas): nothing graphed reads these
                del cache[key]
        if device is not None:
            for name in names:
                self._table(name, device)

    def _alphas(self, timesteps, like):
        """alphas_cumprod at ``timesteps`` (int, 0-d or (B,)), in like's dtype, shaped to broadcast over ``like``."""
        table = self._table("alphas_cumprod", like.device).to(like.dtype)
        a = table.index_select(0, as_timestep_tensor(timesteps, like.device).long())
        return a.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, original_samples, noise, timesteps):
        """sqrt(a_t) * x + sqrt(1 - a_t) * noise, with one timestep for all samples or one per sample."""
        a = self._alphas(timesteps, original_samples)
        return a**0.5 * original_samples + (1 - a) ** 0.5 * noise

    def get_velocity(self, sample, noise, timesteps):
        """The v-prediction target sqrt(a_t) * noise - sqrt(1 - a_t) * sample (diffusers' get_velocity)."""
        a = self._alphas(timesteps, sample)
        return a**0.5 * noise - (1 - a) ** 0.5 * sample

    def __len__(self):
        return self.config.num_train_timesteps


class SigmaScheduleBase(SchedulerBase):
    """What the sigma-schedule schedulers (Euler, DPM-Solver) share with diffusers': a step index kept as Python state
    (found from the first step's timestep, or set by a pipeline with ``set_begin_index``) and add_noise's indices."""

    _step_index = None
    _begin_index = None

    @property
    def step_index(self):
        """The index of the next step into ``sigmas`` (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self):
        """The first step's index, set by a pipeline with ``set_begin_index`` (img2img starts mid-schedule)."""
        return self._begin_index

    def set_begin_index(self, begin_index=0):
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or begin_index < 0:
            raise ValueError(f"begin_index must be a non-negative int, got {begin_index!r}")
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        """The index of ``timestep`` in the schedule: the second match if it appears twice, as diffusers (so that
        starting mid-schedule does not skip a sigma). Reads the timestep on the host."""
        schedule = (self.timesteps if schedule_timesteps is None else schedule_timesteps).cpu()
        t = timestep.cpu() if torch.is_tensor(timestep) else torch.tensor(timestep)
        matches = (schedule == t).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {float(t)} is not in this scheduler's timesteps (call set_timesteps first)")
        return int(matches[1 if len(matches) > 1 else 0])

    def _init_step_index(self, timestep):
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _checked_step_index(self, timestep, need_schedule=True):
        """This call's index into the schedule (found from the first call's timestep, or the begin index), checked:
        set_timesteps called first (``need_schedule``; diffusers' Euler also steps through its training schedule) and
        a call left in the schedule (Heun makes two calls a step)."""
        if need_schedule and self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step: call set_timesteps first")
        if self._step_index is None:
            self._init_step_index(timestep)
        calls = len(self.timesteps)
        if self._step_index >= calls:
            per = "" if calls == self.num_inference_steps else f" ({calls} calls)"
            raise ValueError(f"step called {self._step_index + 1} times for a {self.num_inference_steps}-step "
                             f"schedule{per}")
        return self._step_index

    def _step_indices(self, timesteps):
        """Per-sample sigma indices for add_noise, as diffusers: looked up per timestep when no begin index is set
        (training), else the current step (inpainting, after the first step) or the begin index (img2img)."""
        ts = timesteps.reshape(-1) if torch.is_tensor(timesteps) else torch.tensor([timesteps], dtype=torch.float32)
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in ts]
        return [self._step_index if self._step_index is not None else self._begin_index] * ts.shape[0]



class VPSigmaScheduleBase(SigmaScheduleBase):
    """The multistep solvers on VP sigmas (DPM-Solver++, UniPC): spaced timesteps as diffusers spaces them for these,
    the model input not scaled, and add_noise putting each sample at its schedule sigma as alpha * x + sigma_vp *
    noise, as diffusers does. A subclass resets its solver state in ``_reset_state``."""

    init_noise_sigma = 1.0

    def _training_schedule(self):
        """The training tables diffusers makes (zero-SNR's last alpha kept finite, as diffusers does), and no
        inference schedule yet; refuses two sigma schedules at once."""
        c = self.config
        if c.use_karras_sigmas and c.use_exponential_sigmas:
            raise ValueError("use_karras_sigmas and use_exponential_sigmas: choose one")
        self.betas = make_betas(c)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        if c.get("rescale_betas_zero_snr"):  # (DEIS has no such field)
            self.alphas_cumprod[-1] = 2**-24
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        n = c.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, n - 1, n, dtype=np.float32)[::-1].copy())

    def _spaced_timesteps(self, n, last=None):
        """n timesteps per timestep_spacing: n + 1 points, the last dropped, for linspace and leading. ``last``: the
        first timestep past the schedule (num_train_timesteps, or less where DPM-Solver's lambda_min_clipped cuts)."""
        c = self.config
        n_train = c.num_train_timesteps
        last = n_train if last is None else last
        spacing = c.get("timestep_spacing", "linspace")  # (single-step DPM-Solver has no such field: linspace)
        if spacing == "linspace":
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        if spacing == "leading":
            ratio = last // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + c.steps_offset
        return np.arange(last, 0, -n_train / n).round().copy().astype(np.int64) - 1

    def _schedule_sigmas(self, timesteps, n, karras_rounded=True, sigma_range=None):
        """(sigmas, timesteps, training sigmas) as diffusers' VP solvers make them: ``n`` Karras or Lu-lambda sigmas
        (their timesteps rounded where ``karras_rounded``) or exponential ones (not rounded) where the config asks,
        between ``sigma_range`` = (min, max) or the training schedule's ends; else the training sigmas at
        ``timesteps``."""
        c = self.config
        base = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        log_sigmas = np.log(base)
        lo, hi = sigma_range or (float(base[0]), float(base[-1]))
        rounded = karras_rounded
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(lo, hi, n)
        elif c.get("use_lu_lambdas"):  # (DPM-Solver multistep's)
            lam_max, lam_min = float(log_sigmas[-1]), float(log_sigmas[0])
            sigmas = np.exp(lam_max + np.linspace(0, 1, n) * (lam_min - lam_max))
        elif c.use_exponential_sigmas:
            sigmas, rounded = np.exp(np.linspace(math.log(hi), math.log(lo), n)), False
        else:
            return np.interp(timesteps, np.arange(0, len(base)), base), timesteps, base
        return sigmas, timesteps_for_sigmas(sigmas, log_sigmas, rounded), base

    def _finish_schedule(self, sigmas, last_sigma, timesteps, device):
        """Keep the schedule (the sigmas also as host floats: a step's coefficients never read the device)."""
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [last_sigma]]).astype(np.float32))
        self._sigma_values = self.sigmas.tolist()
        self.timesteps = torch.from_numpy(np.asarray(timesteps)).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._reset_state()

    def scale_model_input(self, sample, timestep=None):
        return sample

    def add_noise(self, original_samples, noise, timesteps):
        """alpha_t * x + sigma_t * noise at the schedule's sigma per sample (see _step_indices), as diffusers."""
        sigma = self.sigmas[self._step_indices(timesteps)].to(original_samples.device, original_samples.dtype)
        sigma = sigma.view(-1, *([1] * (original_samples.dim() - 1)))
        alpha = 1 / (sigma**2 + 1) ** 0.5
        return alpha * original_samples + sigma * alpha * noise
