"""PNDM (Liu et al. 2022) with diffusers' PNDMScheduler semantics: SD1.5's shipped scheduler.

The schedule is diffusers': with ``skip_prk_steps`` (SD1.5's config) linear multistep (PLMS) steps from the first,
the second step repeating the first timestep; otherwise three Runge-Kutta (PRK) steps of four model calls each,
then PLMS. ``pndm_update`` is one step of either, on the state diffusers keeps (``counter``, ``ets``,
``cur_sample``, ``cur_model_output``): our scheduler runs it, and so does ``accelerate``'s fused step for diffusers'
own PNDMScheduler. The update is linear in the sample, the model output and one combination of the earlier outputs,
so each step is one fused pass (``ops.linear_step``), computed in fp32, in the model output's dtype.

Unlike diffusers, our ``step`` takes its timestep from the schedule by its counter (the PNDM state already fixes
which step comes next), so a device timestep is never read on the host. A host timestep is checked against it.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from .base import SchedulerBase
from .common import SchedulerOutput, check_same_run, check_step_inputs, make_betas, spaced_timesteps

# PLMS's weights for the current model output and the earlier ones (newest first), by how many it has (diffusers')
PLMS_WEIGHTS = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
PNDM_ORDER = 4  # Runge-Kutta evaluations per warm-up step


def pndm_update(self, model_output, sample, timestep: int):
    """One PNDM step at ``timestep`` (a host int) on ``self``, a scheduler with diffusers' PNDM state and tables
    (``counter``, ``ets``, ``cur_sample``, ``cur_model_output``, ``prk_timesteps``, ``alphas_cumprod``,
    ``final_alpha_cumprod``, ``config``, ``num_inference_steps``). Updates that state as diffusers' ``step`` does and
    returns the previous sample."""
    check_step_inputs(model_output, sample)
    check_same_run(sample, [self.cur_sample, *self.ets])
    config = self.config
    stride = config.num_train_timesteps // self.num_inference_steps
    earlier = None  # the earlier outputs' part of the combined model output, if any
    if not config.skip_prk_steps and self.counter < len(self.prk_timesteps):  # Runge-Kutta: 4 calls a step
        prev_timestep = timestep - (0 if self.counter % 2 else stride // 2)
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])
        phase = self.counter % 4
        weight = 1.0
        if phase == 0:
            self.cur_model_output = self.cur_model_output + model_output / 6
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + model_output / 3
        else:  # the last of four: the RK combination (k1 + 2 k2 + 2 k3 + k4) / 6
            weight, earlier, self.cur_model_output = 1 / 6, self.cur_model_output, 0
        sample = self.cur_sample
    else:  # linear multistep
        prev_timestep = timestep - stride
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:  # the second call re-steps from the first sample, at the first timestep
            prev_timestep, timestep = timestep, timestep + stride
        if len(self.ets) == 1 and self.counter == 0:
            weight = 1.0
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:  # (m + ets[-1]) / 2, from the first step's sample
            weight, earlier = 0.5, self.ets[-1] * 0.5
            sample, self.cur_sample = self.cur_sample, None
        else:
            weight, *rest = PLMS_WEIGHTS[len(self.ets)]
            earlier = self.ets[-2] * rest[0]
            for w, e in zip(rest[1:], reversed(self.ets[:-2])):
                earlier = earlier.add(e, alpha=w)
    # diffusers' _get_prev_sample: prev = sqrt(a_prev / a_t) x - k eps, eps the combined output (for v_prediction
    # sqrt(a_t) v + sqrt(1 - a_t) x), k = (a_prev - a_t) / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev))
    alpha_t = float(self.alphas_cumprod[timestep])
    alpha_prev = float(self.alphas_cumprod[prev_timestep]) if prev_timestep >= 0 else float(self.final_alpha_cumprod)
    beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
    k = (alpha_prev - alpha_t) / (alpha_t * beta_prev**0.5 + (alpha_t * beta_t * alpha_prev) ** 0.5)
    px = (alpha_prev / alpha_t) ** 0.5
    if config.prediction_type == "v_prediction":
        px, k = px - k * beta_t**0.5, k * alpha_t**0.5
    prev, _ = ops.linear_step(model_output, sample, earlier, cx=0.0, cm=0.0, p0=0.0, px=px, pm=-k * weight,
                              pe=-k if earlier is not None else 0.0)
    self.counter += 1
    return prev


class PNDMScheduler(SchedulerBase):
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon", timestep_spacing="leading",
        steps_offset=0,
    )
    init_noise_sigma = 1.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        if c.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction (PNDM), got {c.prediction_type!r}")
        if c.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(
                f"beta_schedule must be linear, scaled_linear or squaredcos_cap_v2 (PNDM), got {c.beta_schedule!r}")
        if c.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing must be leading, trailing or linspace, got {c.timestep_spacing!r}")
        self.betas = make_betas(c)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0].clone()
        self.timesteps = None
        self.prk_timesteps = self.plms_timesteps = None
        self._reset_state()

    def _reset_state(self):
        self.counter, self.ets, self.cur_sample, self.cur_model_output = 0, [], None, 0
        self._begin = 0

    def set_begin_index(self, begin_index=0):
        """Start the run at the schedule's ``begin_index``-th timestep (img2img): the state starts afresh there, as
        diffusers' PNDM does when a pipeline hands it the tail of its timesteps."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or begin_index < 0:
            raise ValueError(f"begin_index must be a non-negative int, got {begin_index!r}")
        if self.num_inference_steps is None:
            raise ValueError("PNDMScheduler.set_begin_index: call set_timesteps first")
        if begin_index >= len(self._schedule):
            raise ValueError(f"begin_index {begin_index} is past the schedule of {len(self._schedule)} timesteps")
        self._reset_state()
        self._begin = begin_index

    def set_timesteps(self, num_inference_steps, device=None):
        """diffusers' schedule: the spaced timesteps, PRK's half-steps over the last four first unless
        skip_prk_steps, then PLMS's (with skip_prk_steps, the first timestep twice)."""
        self._check_steps(num_inference_steps)
        c = self.config
        n = int(num_inference_steps)
        if not c.skip_prk_steps and n < PNDM_ORDER:
            raise ValueError(f"num_inference_steps must be at least {PNDM_ORDER} for PNDM's Runge-Kutta warm-up "
                             f"(skip_prk_steps=False), got {n}")
        self.num_inference_steps = n
        ascending = spaced_timesteps(c, n)[::-1]  # diffusers' PNDM spaces them as DDIM does, ascending
        if c.skip_prk_steps:
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
        else:
            half = np.tile(np.array([0, c.num_train_timesteps // n // 2]), PNDM_ORDER)
            prk = np.array(ascending[-PNDM_ORDER:]).repeat(2) + half
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = ascending[:-3][::-1].copy()
        schedule = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._schedule = schedule.tolist()  # host copy: step never reads the device timesteps
        self.timesteps = torch.from_numpy(schedule).to(device)
        self._reset_state()

    def scale_model_input(self, sample, timestep=None):
        return sample

    def step(self, model_output, timestep, sample, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("PNDMScheduler.step: call set_timesteps first")
        if self._begin + self.counter >= len(self._schedule):
            raise ValueError(f"step called {self.counter + 1} times for a schedule of {len(self._schedule)} "
                             f"timesteps ({self.num_inference_steps} inference steps)"
                             + (f", begun at index {self._begin}" if self._begin else ""))
        expected = self._schedule[self._begin + self.counter]
        on_host = not torch.is_tensor(timestep) or timestep.device.type == "cpu"
        if on_host and int(timestep) != expected:  # a device timestep is not read (that would wait on the device)
            raise ValueError(f"timestep {int(timestep)} is not this step's timestep {expected}: PNDM steps through "
                             "scheduler.timesteps in order (its state depends on the earlier steps)")
        prev = pndm_update(self, model_output, sample, expected)
        return SchedulerOutput(prev) if return_dict else (prev,)

