"""DPM-Solver++ single-step (Lu et al. 2022) with diffusers' DPMSolverSinglestepScheduler semantics: the sampler
diffusers maps A1111's "DPM++ SDE (Karras)" to, and "DPM++ 2S" in its ODE form.

A single-step solver of order k spends k model calls on one step from sigma_s to sigma_t: the first call a
first-order step to an intermediate sigma, the next ones updates from the group's first sample ``S`` with the x0s
of the calls so far. The orders repeat as diffusers' ``order_list`` sets them ([1, 2, 1, 2, ...] for order 2, the
last ones lowered by ``lower_order_final``). Every call is linear in the current sample (through x0), ``S`` and the
group's earlier x0s, plus noise for the SDE variant: ``singlestep_coefficients`` works the weights out on the host in
float64 from the sigmas, and ``dpm_solver.solver_step`` runs the call as one fused pass (``ops.linear_step``).
``accelerate``'s fused step for diffusers' own scheduler uses both.

Supported, as diffusers computes them: ``algorithm_type`` dpmsolver++ and sde-dpmsolver++; ``solver_order`` 1 to 3;
``solver_type`` midpoint and heun; Karras and exponential sigmas; ``lambda_min_clipped``; a final sigma of zero or
sigma_min; thresholding; the epsilon, v_prediction and sample prediction types; custom timesteps. As in diffusers,
``set_timesteps`` turns ``lower_order_final`` on in the config where the schedule needs it (a final sigma of zero,
or a step count the order does not divide). Rejected with an error naming the field: the deprecated
noise-prediction algorithm (dpmsolver), learned variances, beta and flow sigmas, dynamic shifting.
"""
from __future__ import annotations

import math

import numpy as np

from .._config import FrozenConfig
from .base import VPSigmaScheduleBase
from .common import SchedulerOutput, half_log_snr, vp_alpha_sigma
from .dpm_solver import (
    _X0,
    VP_CHOICES,
    DPMSolverMultistepScheduler,
    advance_multistep,
    check_choices,
    clipped_timesteps,
    nearest_settings,
    sde_noise,
    solver_step,
    thresholder,
)


def singlestep_coefficients(sigmas, i, order, prediction, algorithm="dpmsolver++", solver_type="midpoint"):
    """The call at index ``i`` of ``sigmas`` (host floats, the final sigma last) in ``solver_step``'s form, for an
    order-``order`` group that began at index i - order + 1 with sample S: ``(cx, cm, p0, ps, weights, noise_scale)``
    with x0 = cx * x + cm * m this call's x0 (at sigma i) and prev = p0 * x0 + ps * S + sum(w * x0 of the call j back,
    for j, w in enumerate(weights, 1)) + noise_scale * noise, the result at sigma i + 1. None where diffusers'
    arithmetic is not finite (two equal sigmas in a group: a division by zero).

    diffusers' D0, D1 (and D2) of its second- and third-order updates are written as coefficient vectors over
    (x0 now, x0 one call back, x0 two calls back)."""
    alpha_t, sigma_t = vp_alpha_sigma(sigmas[i + 1])
    _, sigma_s = vp_alpha_sigma(sigmas[i - order + 1])  # the group's first sigma: S's
    cx, cm = _X0[prediction](*vp_alpha_sigma(sigmas[i]))
    lams = [half_log_snr(sigmas[i - j]) for j in range(order)]  # lambda of the x0 now, one back, two back
    h = np.float64(half_log_snr(sigmas[i + 1]) - lams[-1])  # numpy: x / 0 is inf or NaN, as in diffusers' tensors
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if algorithm == "dpmsolver++":
            em = np.expm1(-h)  # e^-h - 1
            ps, noise = sigma_t / sigma_s, 0.0
            a0, half, a1 = -alpha_t * em, -0.5 * alpha_t * em, alpha_t * (em / h + 1.0)
            a2 = -alpha_t * ((em + h) / h**2 - 0.5)
        else:  # sde-dpmsolver++
            e2 = -np.expm1(-2.0 * h)  # 1 - e^-2h
            ps, noise = sigma_t / sigma_s * np.exp(-h), sigma_t * np.sqrt(e2)
            a0, half, a1 = alpha_t * e2, 0.5 * alpha_t * e2, alpha_t * (e2 / (-2.0 * h) + 1.0)
            a2 = alpha_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        if order == 1:
            combined = [a0, 0.0, 0.0]
        elif order == 2:  # D0 = x0 one back, D1 = (x0 now - D0) / r0
            r0 = (lams[0] - lams[1]) / h
            d1 = [1 / r0, -1 / r0, 0.0]
            a = half if solver_type == "midpoint" else a1
            combined = [a * d1[0], a0 + a * d1[1], 0.0]
        else:  # D0 = x0 two back; D1_0, D1_1 the differences of the x0 one back and now from it
            r0, r1 = (lams[0] - lams[2]) / h, (lams[1] - lams[2]) / h
            d1_0, d1_1 = [0.0, 1 / r1, -1 / r1], [1 / r0, 0.0, -1 / r0]
            if solver_type == "midpoint":  # diffusers' order-3 midpoint takes D1_1 alone, with the heun weight
                combined = [a1 * q for q in d1_1]
            else:
                d1 = [(r0 * p - r1 * q) / (r0 - r1) for p, q in zip(d1_0, d1_1)]
                d2 = [2.0 * (q - p) / (r0 - r1) for p, q in zip(d1_0, d1_1)]
                combined = [a1 * p + a2 * q for p, q in zip(d1, d2)]
            combined[2] += a0
    values = [float(v) for v in (cx, cm, combined[0], ps, *combined[1:order], noise)]
    if not all(map(math.isfinite, values)):
        return None
    return (*values[:4], tuple(values[4:-1]), values[-1])


def singlestep_update(model_output, sample, group_sample, earlier_x0, coefficients, noise=None, threshold=None):
    """(prev, x0) of one call as ``singlestep_coefficients`` describes it, one fused pass: ``group_sample`` is S
    (``sample`` itself for a group's first call), ``earlier_x0`` the group's earlier x0s, newest first."""
    cx, cm, p0, ps, weights, noise_scale = coefficients
    if not weights:  # a first call: S is this sample
        return solver_step(model_output, sample, [], coefficients, noise, threshold)
    folded = (cx, cm, p0, 0.0, (*weights, ps), noise_scale)  # S as one more kept tensor
    return solver_step(model_output, sample, [*earlier_x0, group_sample], folded, noise, threshold)


def order_list(num_steps, solver_order, lower_order_final, zero_final):
    """diffusers' ``get_order_list``: the order of each call, groups of 1, 2, ... up to ``solver_order`` calls; with
    ``lower_order_final`` the last group cut short where the steps do not divide, and a final call of order 1 onto a
    final sigma of zero."""
    n, k = num_steps, solver_order
    if k == 1:
        orders = [1] * n
    elif not lower_order_final:
        orders = list(range(1, k + 1)) * (n // k)
    elif k == 2:
        orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    else:
        tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[n % 3]
        orders = [1, 2, 3] * (n // 3 - (n % 3 == 0)) + tail
    if zero_final:
        orders[-1] = 1
    return orders


class DPMSolverSinglestepScheduler(VPSigmaScheduleBase):
    # diffusers' multistep fields and defaults, but for the spacing, Lu lambdas, euler_at_final and zero-SNR rescaling
    # it lacks, and lower_order_final off (set_timesteps turns it on where the schedule needs it)
    defaults = dict({k: v for k, v in DPMSolverMultistepScheduler.defaults.items() if k not in (
        "timestep_spacing", "steps_offset", "use_lu_lambdas", "euler_at_final", "rescale_betas_zero_snr")},
        lower_order_final=False)
    unsupported = DPMSolverMultistepScheduler.unsupported

    def __init__(self, **kwargs):
        super().__init__(**nearest_settings(kwargs))
        check_choices(self.config, VP_CHOICES)
        self._training_schedule()
        self._reset_state()

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """diffusers' schedule: ``num_inference_steps`` spaced linearly (within lambda_min_clipped), or custom
        descending integer ``timesteps``; then Karras or exponential sigmas if the config asks; then the order of
        every call."""
        c = self.config
        timesteps = clipped_timesteps(self, num_inference_steps, timesteps,
                                      {"use_karras_sigmas": "Karras", "use_exponential_sigmas": "exponential"})
        n = len(timesteps)
        # (Karras timesteps rounded even for the cosine schedule, unlike DPM-Solver multistep's)
        sigmas, timesteps, base = self._schedule_sigmas(timesteps, n)
        zero_final = c.final_sigmas_type == "zero"
        if not c.lower_order_final and (zero_final or n % c.solver_order):  # as diffusers' register_to_config
            self.config = FrozenConfig(dict(c, lower_order_final=True))
        self.order_list = order_list(n, c.solver_order, self.config.lower_order_final, zero_final)
        self._finish_schedule(sigmas, 0.0 if zero_final else float(base[0]), timesteps, device)

    def _reset_state(self):
        self.model_outputs = [None] * self.config.solver_order
        self.sample = None
        self._step_index = self._begin_index = None

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        c = self.config
        i = self._checked_step_index(timestep)
        order = call_order(self.order_list[i], self.model_outputs)
        coefficients = singlestep_coefficients(self._sigma_values, i, order, c.prediction_type, c.algorithm_type,
                                               c.solver_type)
        if coefficients is None:
            raise ValueError(
                f"the order-{order} single-step DPM-Solver call at step {i} divides by zero for this schedule "
                f"(sigmas {self._sigma_values[i - order + 1:i + 2]}: two equal); diffusers returns NaN there")
        earlier = [self.model_outputs[-j] for j in range(1, order)]
        prev, x0 = singlestep_update(model_output, sample, self.sample, earlier, coefficients,
                                     sde_noise(c, model_output, generator), thresholder(c))
        if order == 1:
            self.sample = sample
        advance_multistep(self, x0)
        return SchedulerOutput(prev, x0) if return_dict else (prev,)


def call_order(listed, kept):
    """The order a call runs at: ``listed`` (the order list's), lowered while the group's earlier x0s are missing
    from ``kept`` (the model outputs before this call, oldest first), as diffusers lowers it (img2img starts
    mid-group)."""
    while listed > 1 and kept[-(listed - 1)] is None:
        listed -= 1
    return listed
