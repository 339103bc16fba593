"""What the schedulers share: configs, beta schedules, noise drawn the way diffusers draws it, the output type."""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from .._config import FrozenConfig  # noqa: F401  (re-exported)


@dataclass
class SchedulerOutput:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor = None

    def __iter__(self):  # allows `prev, x0 = scheduler.step(...)` like a tuple
        return iter((self.prev_sample, self.pred_original_sample))


_FLOAT32_DRAWS = [False]  # set inside float32_draws()


@contextlib.contextmanager
def float32_draws():
    """Within it, every ``randn_tensor`` draw in fp16/bf16 is a float32 draw rounded to that dtype: runs in two
    dtypes then start from one noise. (In torch 2.11 a float16 randn from a seed is not the float32 one rounded;
    ``diffusion-fast check`` compares an fp16 image with the fp32 reference, image-to-image and inpainting included,
    where the pipelines draw their noise themselves.)"""
    _FLOAT32_DRAWS[0] = True
    try:
        yield
    finally:
        _FLOAT32_DRAWS[0] = False


def randn_tensor(shape, generator=None, device=None, dtype=None):
    """Gaussian noise drawn exactly as diffusers' randn_tensor draws it (so images match diffusers').

    The noise is drawn on the generator's device (CPU generators on CUDA targets draw on the CPU, then move); a list
    of generators draws one sample each. Inside ``float32_draws()`` a half-precision draw is float32 rounded.
    """
    if _FLOAT32_DRAWS[0] and dtype in (torch.float16, torch.bfloat16):
        return randn_tensor(shape, generator, device, torch.float32).to(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    if generator is not None and (not generators or not all(isinstance(g, torch.Generator) for g in generators)):
        raise TypeError(f"generator must be a torch.Generator, a list of them or None, got {generator!r}")
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, (list, tuple)) else generator).device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type:
            raise ValueError(
                f"generator is on {gen_type} but the noise is for {device.type}: use a CPU or {device.type} generator")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator is a list of {len(generator)} but the batch size is {shape[0]}")
        one = (1,) + tuple(shape[1:])
        noise = torch.cat([torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator])
        return noise.to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def betas_for_alpha_bar(num_steps, max_beta=0.999):
    """The squaredcos_cap_v2 (cosine) schedule: betas from alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas):
    """Rescale betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), as diffusers does."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))  # diffusers' rounding order
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(config) -> torch.Tensor:
    if config.trained_betas is not None:
        return torch.tensor(config.trained_betas, dtype=torch.float32)
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    elif config.beta_schedule == "sigmoid":  # GeoDiff's schedule (diffusers' DDPM has it)
        betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (config.beta_end - config.beta_start) + config.beta_start
    else:
        raise ValueError(
            f"beta_schedule must be linear, scaled_linear, squaredcos_cap_v2 or sigmoid, got {config.beta_schedule!r}")
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def spaced_timesteps(config, num_inference_steps, dtype=np.int64):
    """Inference timesteps per timestep_spacing (leading, trailing, linspace), highest first, as diffusers."""
    n_train = config.num_train_timesteps
    spacing = config.timestep_spacing
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, num_inference_steps).round()[::-1].copy().astype(dtype)
    if spacing == "leading":
        ratio = n_train // num_inference_steps
        return (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(dtype) + config.steps_offset
    if spacing == "trailing":
        return np.round(np.arange(n_train, 0, -n_train / num_inference_steps)).astype(dtype) - 1
    raise ValueError(f"timestep_spacing must be leading, trailing or linspace, got {spacing!r}")


def sigma_timesteps(config, num_inference_steps):
    """The float32 timesteps diffusers' sigma schedulers (Euler, Heun, LMS, DPM2) space: linspace not rounded, the
    others as ``spaced_timesteps``."""
    if config.timestep_spacing == "linspace":
        return np.linspace(0, config.num_train_timesteps - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
    return spaced_timesteps(config, num_inference_steps, dtype=np.float32)


def karras_sigmas(sigma_min, sigma_max, n, rho=7.0):
    """Karras et al. (2022)'s n sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def vp_alpha_sigma(sigma):
    """(alpha_t, sigma_t) of the VP process at the noise level sigma (sigma = sigma_t / alpha_t)."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def half_log_snr(sigma):
    """lambda = log(alpha_t) - log(sigma_t), infinite at sigma = 0 (DPM-Solver's and UniPC's time variable)."""
    alpha, s = vp_alpha_sigma(sigma)
    return math.log(alpha) - math.log(s) if s > 0 else math.inf


def sigma_to_t(sigma, log_sigmas):
    """Interpolate a timestep for ``sigma`` in log-sigma space (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(np.shape(sigma))


def linear_terms(terms):
    """``(extra, pe)`` for ``ops.linear_step``'s ``pe * extra`` from [(weight, tensor), ...]: one term passed as it
    is (no extra pass), several added up first (in fp32: a few small ops), none as (None, 0.0)."""
    if not terms:
        return None, 0.0
    if len(terms) == 1:
        return terms[0][1], terms[0][0]
    extra = terms[0][1].float() * terms[0][0]
    for weight, tensor in terms[1:]:
        extra = extra.add(tensor, alpha=weight)
    return extra, 1.0



def timesteps_for_sigmas(sigmas, log_sigmas, rounded):
    """The (fractional, or ``rounded``) training timestep of each sigma, interpolated as diffusers does."""
    timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
    return timesteps.round() if rounded else timesteps

def check_same_run(sample, kept):
    """A multistep step combines this sample with tensors ``kept`` from the earlier steps of the run: a sample of
    another shape (a new batch or size without set_timesteps) is refused by name, not left to fail deep in the op."""
    for t in kept:
        if torch.is_tensor(t) and t.shape != sample.shape:
            raise ValueError(f"sample has shape {tuple(sample.shape)}, but the earlier steps of this run had "
                             f"{tuple(t.shape)}: call set_timesteps to start a new run")

def threshold_sample(sample, ratio, max_value):
    """Dynamic thresholding (Imagen): clamp each sample to its ratio-quantile of |x| (at least 1), rescale."""
    dtype = sample.dtype
    batch = sample.shape[0]
    upcast = dtype not in (torch.float32, torch.float64)  # quantile needs fp32/fp64
    flat = (sample.float() if upcast else sample).reshape(batch, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(sample.shape).to(dtype)


def as_timestep_tensor(timestep, device) -> torch.Tensor:
    """A timestep (int, float, 0-d or (B,) tensor) as a 1-d tensor on ``device``; never reads a device value."""
    t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
    return t.to(device=device, dtype=torch.long).reshape(-1)


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
        array = np.asarray(values.cpu() if torch.is_tensor(values) else values, dtype=np.float64)
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
        key = (name, str(torch.device(device)))
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


def read_config(folder, subfolder=None) -> dict:
    path = os.fspath(folder)
    if subfolder:
        path = os.path.join(path, subfolder)
    if os.path.isdir(path):
        path = os.path.join(path, "scheduler_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no scheduler config at {path!r}")
    with open(path) as f:
        return json.load(f)
