"""DPM2 and DPM2 ancestral ("DPM2", "DPM2 a", with Karras sigmas "DPM2 Karras" and "DPM2 a Karras"): Karras et
al. (2022)'s second-order sampler with a midpoint in log sigma, with diffusers' KDPM2DiscreteScheduler and
KDPM2AncestralDiscreteScheduler semantics.

A step from sigma to the next takes two model calls: an Euler step to the midpoint sigma_mid (the geometric mean of
sigma and the next sigma; for the ancestral variant, of sigma and sigma_down), then the midpoint's derivative
applied to the kept sample over the whole step (and, ancestral, fresh noise times sigma_up). The schedule is
diffusers': its sigmas, midpoints and (ancestral) sigma_up / sigma_down repeated as it repeats them, and the
timesteps interleaved with the midpoints' (fractional) timesteps, so the UNet is called at the midpoint too. The
last step, onto sigma = 0, is the first call alone (its midpoint is 0, so it lands on x0).

Each call is linear in the sample, the model output and (second call) the kept sample plus the step's noise, so it
is one fused pass (``ops.linear_step``) with coefficients worked out on the host in float64 from the tables as
host floats: no device read per step. ``kdpm2_update`` is one call on diffusers' state (``step_index``,
``sample``): our schedulers run it, and so does ``accelerate``'s fused step for diffusers' own schedulers.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from .._config import FrozenConfig
from .common import (
    SchedulerOutput,
    check_same_run,
    check_step_inputs,
    karras_sigmas,
    randn_tensor,
    sigma_timesteps,
    timesteps_for_sigmas,
)
from .euler import EulerDiscreteScheduler
from .heun import FIXED_SCHEDULE, derivative_weights


def kdpm2_update(self, model_output, sample, tables, generator=None):
    """One DPM2 call on ``self`` (a scheduler with diffusers' KDPM2 state: ``step_index``, ``sample``, ``config``) at
    its step index. ``tables``: diffusers' repeated sigmas as host floats, by name ("sigmas", "sigmas_interpol",
    and for the ancestral variant "sigmas_up" and "sigmas_down"), indexed as diffusers indexes them. Updates the
    state as diffusers' ``step`` does and returns (prev_sample, pred_original_sample); the caller advances the step
    index. The ancestral second call draws its noise from ``generator`` as diffusers draws it."""
    check_step_inputs(model_output, sample)
    first = self.sample is None
    if not first:
        check_same_run(sample, [self.sample])
    i, ancestral = self.step_index, "sigmas_up" in tables
    sigmas, mids = tables["sigmas"], tables["sigmas_interpol"]
    if ancestral:  # (diffusers' indexing: the second call reads the first call's entries)
        sigma, mid = (sigmas[i], mids[i]) if first else (sigmas[i - 1], mids[i - 1])
        target = tables["sigmas_down"][i - 1]
    else:
        sigma, mid = (sigmas[i], mids[i + 1]) if first else (sigmas[i - 1], mids[i])
        target = sigmas[i + 1] if first else sigmas[i]
    dtype = torch.promote_types(model_output.dtype, sample.dtype)
    model_output = model_output.to(dtype)
    # x0 and the derivative (sample - x0) / sigma_in at the sigma this call's input was scaled for
    a, b, dx, dm = derivative_weights(sigma if first else mid, self.config.prediction_type)
    if first:  # Euler to the midpoint
        dt = mid - sigma
        prev, x0 = ops.linear_step(model_output, sample, None, cx=a, cm=b, p0=0.0, px=1 + dt * dx, pm=dt * dm)
        self.sample = sample
        if ancestral:
            self.dt = dt
        return prev, x0
    dt = target - sigma  # the midpoint's derivative, from the kept sample over the whole step
    kept, self.sample = self.sample, None
    if ancestral:
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
        kept = torch.add(kept, noise, alpha=tables["sigmas_up"][i - 1])
    return ops.linear_step(model_output, sample, kept, cx=a, cm=b, p0=0.0, px=dt * dx, pm=dt * dm, pe=1.0)


def _repeated(values: torch.Tensor) -> torch.Tensor:
    """diffusers' layout of a per-step table: the first entry once, every other twice, the last once more."""
    return torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]])


class KDPM2DiscreteScheduler(EulerDiscreteScheduler):
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear", trained_betas=None,
        use_karras_sigmas=False, use_exponential_sigmas=False, prediction_type="epsilon",
        timestep_spacing="linspace", steps_offset=0,
    )
    unsupported = dict(use_beta_sigmas=False)  # (diffusers' beta sigmas need scipy)
    order = 2
    ancestral = False

    def __init__(self, **kwargs):
        name = type(self).__name__
        schedule = kwargs.get("beta_schedule", "linear")
        if schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(f"beta_schedule must be linear, scaled_linear or squaredcos_cap_v2 ({name}), "
                             f"got {schedule!r}")
        prediction = kwargs.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):  # diffusers raises NotImplementedError at the first step
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction' ({name}), got {prediction!r}")
        if kwargs.get("use_karras_sigmas") and kwargs.get("use_exponential_sigmas"):
            raise ValueError("use_karras_sigmas and use_exponential_sigmas: choose one")
        super().__init__(**kwargs)
        self.sample = None

    def _schedule_config(self):
        return FrozenConfig(dict(self.config, **FIXED_SCHEDULE))

    @property
    def state_in_first_order(self):
        return self.sample is None

    def set_timesteps(self, num_inference_steps=None, device=None):
        """diffusers' schedule: ``num_inference_steps`` sigmas per the spacing (or Karras / exponential sigmas, as
        the config asks) and a final 0, each but the first and last taken twice, with the midpoints and their
        timesteps interleaved."""
        c = self.config
        self._check_steps(num_inference_steps)
        n = int(num_inference_steps)
        timesteps = sigma_timesteps(c, n)
        base = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        log_sigmas = np.log(base)
        sigmas = np.interp(timesteps, np.arange(0, len(base)), base)
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
            timesteps = timesteps_for_sigmas(sigmas, log_sigmas, rounded=True)
        elif c.use_exponential_sigmas:
            sigmas = np.exp(np.linspace(np.log(float(sigmas[0])), np.log(float(sigmas[-1])), n))
            timesteps = timesteps_for_sigmas(sigmas, log_sigmas, rounded=False)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        tables = self._tables(sigmas)  # (fp32 torch arithmetic, as diffusers', so the values are its own)
        mid_timesteps = timesteps_for_sigmas(tables["sigmas_interpol"].numpy(), log_sigmas, rounded=False)
        # the midpoints' timesteps between the sigmas': diffusers' slice differs between the two variants
        mid_timesteps = mid_timesteps[:-2] if self.ancestral else mid_timesteps[1:-1]
        interleaved = np.stack([mid_timesteps, np.asarray(timesteps)[1:]], axis=-1).reshape(-1)
        self.timesteps = torch.from_numpy(np.concatenate([timesteps[:1], interleaved]).astype(np.float32)).to(device)
        for name, values in tables.items():
            setattr(self, name, _repeated(values))
        self._values = {name: getattr(self, name).double().tolist() for name in tables}  # (host floats for step)
        self.num_inference_steps = n
        self._step_index = self._begin_index = None
        self.sample = None

    def _tables(self, sigmas):
        """{name: per-step table}: the sigmas and their midpoints in log sigma (the first midpoint is 0, from the
        wrap-around with the final 0, as diffusers computes it)."""
        return {"sigmas": sigmas, "sigmas_interpol": sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()}

    def _input_sigma(self):
        i = self._step_index
        if self.state_in_first_order:
            return self.sigmas[i]
        return self.sigmas_interpol[i - 1 if self.ancestral else i]

    def scale_model_input(self, sample, timestep):
        if self._step_index is None:
            self._init_step_index(timestep)
        return sample / ((self._input_sigma() ** 2 + 1) ** 0.5)

    def step(self, model_output, timestep, sample, return_dict=True):
        return self._step(model_output, timestep, sample, None, return_dict)

    def _step(self, model_output, timestep, sample, generator, return_dict):
        self._checked_step_index(timestep)  # (diffusers' KDPM2 takes integer timesteps too)
        prev, x0 = kdpm2_update(self, model_output, sample, self._values, generator)
        self._step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    ancestral = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dt = None

    def _tables(self, sigmas):
        """The sigmas, the ancestral split of each step into sigma_down (deterministic) and sigma_up (fresh noise),
        and the midpoints between each sigma and its sigma_down (the last two 0), as diffusers computes them where
        its values are finite."""
        following = sigmas.roll(-1)
        following[-1] = 0.0
        up = (following**2 * (sigmas**2 - following**2) / sigmas**2) ** 0.5
        down = (following**2 - up**2) ** 0.5
        # sigma_down^2 = next^2 - up^2 cancels when sigma >> next: for the cosine schedule's first step (sigma =
        # 2e4) it rounds to 0, and diffusers' midpoint exp(lerp(log sigma, log 0)) is NaN, so is its image. There
        # only, the exact next^2 / sigma.
        lost = (following > 0) & ~(down > 0)
        down = torch.where(lost, following**2 / sigmas, down)
        down[-1] = 0.0
        mids = sigmas.log().lerp(down.log(), 0.5).exp()
        mids[-2:] = 0.0
        return {"sigmas": sigmas, "sigmas_interpol": mids, "sigmas_up": up, "sigmas_down": down}

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return self._step(model_output, timestep, sample, generator, return_dict)
