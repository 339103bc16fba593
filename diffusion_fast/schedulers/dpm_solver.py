"""DPM-Solver++ multistep (Lu et al. 2022) with diffusers' DPMSolverMultistepScheduler semantics: the samplers
people call "DPM++ 2M", "DPM++ 2M Karras" and "DPM++ 2M SDE".

Supported, as diffusers computes them: ``algorithm_type`` dpmsolver++ and sde-dpmsolver++; ``solver_order`` 1 to 3;
``solver_type`` midpoint and heun; Karras, exponential and Lu-lambda sigmas; ``lambda_min_clipped``;
``lower_order_final`` and ``euler_at_final``; a final sigma of zero or sigma_min; thresholding; the epsilon,
v_prediction and sample prediction types; custom timesteps. Rejected with an error naming the field: the deprecated
noise-prediction algorithms (dpmsolver, sde-dpmsolver), learned variances, beta sigmas, and flow sigmas and dynamic
shifting (flow-matching models).

Each step is linear in the sample, this step's x0 and the earlier steps' x0 (plus noise for the SDE variant).
``solver_coefficients`` works those coefficients out on the host in float64 from the schedule's sigmas (diffusers
computes them as fp32 tensors, which costs more than the update itself); ``solver_step`` runs the update as one
fused pass (``ops.linear_step``). ``accelerate``'s fused step for diffusers' own scheduler uses both.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .. import ops
from .base import VPSigmaScheduleBase
from .common import (
    SchedulerOutput,
    check_same_run,
    check_step_inputs,
    edm_x0_weights,
    half_log_snr,
    linear_terms,
    randn_tensor,
    threshold_sample,
    vp_alpha_sigma,
)

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
# x0 = cx * sample + cm * model_output, with (alpha_s, sigma_s) the step's VP alpha and sigma
_X0 = {"epsilon": lambda a, s: (1 / a, -s / a), "v_prediction": lambda a, s: (a, -s), "sample": lambda a, s: (0.0, 1.0)}


def solver_coefficients(sigmas, i, order, prediction, algorithm="dpmsolver++", solver_type="midpoint",
                        sigma_data=None):
    """DPM-Solver++'s update at step ``i`` of ``sigmas`` (host floats, the final sigma last), with diffusers' formulas:
    ``(cx, cm, p0, px, weights, noise_scale)`` such that x0 = cx * x + cm * m and prev = p0 * x0 + px * x +
    sum(w * x0 of the step j back, for j, w in enumerate(weights, 1)) + noise_scale * noise; or None where diffusers'
    arithmetic gives NaN (0 / 0: two equal sigmas with the heun or third-order terms, or a higher order onto a final
    sigma of 0). Divisions by zero follow IEEE rules as in diffusers' tensors: an infinite r0 makes D1 zero.

    The multistep differences D1, D2 of diffusers' second- and third-order updates are expanded into weights on the
    x0s, written as coefficient vectors over (x0 now, x0 one step back, x0 two steps back).

    ``sigma_data``: EDM's form (diffusers' EDMDPMSolverMultistepScheduler): the sigmas are the process's own (alpha
    1) and x0 is EDM's preconditioned output (``edm.edm_x0_weights``). lambda = -log(sigma) in both forms."""
    if sigma_data is None:
        alpha_t, sigma_t = vp_alpha_sigma(sigmas[i + 1])
        alpha_s0, sigma_s0 = vp_alpha_sigma(sigmas[i])
        cx, cm = _X0[prediction](alpha_s0, sigma_s0)
    else:
        (alpha_t, sigma_t), sigma_s0 = (1.0, sigmas[i + 1]), sigmas[i]
        cx, cm = edm_x0_weights(sigmas[i], sigma_data, prediction)
    lams = [half_log_snr(sigmas[i - j]) for j in range(order)]  # lambda at s0, s1, s2
    h = np.float64(half_log_snr(sigmas[i + 1]) - lams[0])  # numpy: x / 0 is inf or NaN, as in diffusers' tensors
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if algorithm == "dpmsolver++":
            em = np.expm1(-h)  # e^-h - 1
            px, noise = sigma_t / sigma_s0, 0.0
            a = [lambda: -alpha_t * em,
                 lambda: (-0.5 * alpha_t * em if order == 2 and solver_type == "midpoint"
                          else alpha_t * (em / h + 1.0)),
                 lambda: -alpha_t * ((em + h) / h**2 - 0.5)]
        else:  # sde-dpmsolver++
            e2 = -np.expm1(-2.0 * h)  # 1 - e^-2h
            # h in (-1e-6, 0]: one sigma twice, rounded apart in fp32 (EDM's last Karras sigma and its final
            # sigma_min): no noise, as diffusers' fp32 h of 0 gives, rather than the root of a rounding error
            px, noise = sigma_t / sigma_s0 * np.exp(-h), sigma_t * np.sqrt(0.0 if -1e-6 < h <= 0 else e2)
            a = [lambda: alpha_t * e2,
                 lambda: (0.5 * alpha_t * e2 if order == 2 and solver_type == "midpoint"
                          else alpha_t * (e2 / (-2.0 * h) + 1.0)),
                 lambda: alpha_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)]
        combined = [a[0](), 0.0, 0.0]  # a0 * D0, D0 = x0 now
        if order >= 2:
            r0 = (lams[0] - lams[1]) / h
            d1_0 = [1 / r0, -1 / r0, 0.0]
            d1, d2 = d1_0, [0.0, 0.0, 0.0]
            if order == 3:
                r1 = (lams[1] - lams[2]) / h
                diff = [p - q for p, q in zip(d1_0, [0.0, 1 / r1, -1 / r1])]  # D1_0 - D1_1
                d1 = [p + r0 / (r0 + r1) * q for p, q in zip(d1_0, diff)]
                d2 = [q / (r0 + r1) for q in diff]
            a1, a2 = a[1](), (a[2]() if order == 3 else 0.0)
            combined = [c + a1 * p + a2 * q for c, p, q in zip(combined, d1, d2)]
    values = [float(v) for v in (cx, cm, combined[0], px, *combined[1:order], noise)]
    if not all(map(math.isfinite, values)):
        return None
    return (*values[:4], tuple(values[4:-1]), values[-1])


def solver_step(model_output, sample, earlier_x0, coefficients, noise=None, threshold=None):
    """One step as ``solver_coefficients`` describes it: (prev, x0) in model_output's dtype, computed in fp32.
    ``earlier_x0``: the earlier steps' x0, newest first (as many as there are weights); ``threshold``: a function
    applied to x0 first (diffusers' dynamic thresholding), which costs a pass of its own."""
    check_step_inputs(model_output, sample)  # (before sample.float() below)
    check_same_run(sample, earlier_x0)
    cx, cm, p0, px, weights, noise_scale = coefficients
    extra, pe = linear_terms(list(zip(weights, earlier_x0)) + ([(noise_scale, noise)] if noise_scale else []))
    if threshold is not None:  # as diffusers: x0 in the model output's dtype, thresholded, then the update
        model_output = threshold((cx * sample + cm * model_output).to(model_output.dtype))
        cx, cm = 0.0, 1.0
    return ops.linear_step(model_output, sample.float(), extra, cx=cx, cm=cm, p0=p0, px=px, pm=0.0, pe=pe)


def solver_order_now(config, step_index, num_steps, lower_order_nums, zero_final=None):
    """The order diffusers' step uses at ``step_index`` (lower near the end of short schedules and at a final sigma
    of zero, and while fewer earlier x0s exist). getattr: fields an older diffusers' config lacks. ``zero_final``:
    whether the schedule ends at sigma 0 (default: the config's final_sigmas_type; DEIS's never does)."""
    if zero_final is None:
        zero_final = getattr(config, "final_sigmas_type", "zero") == "zero"
    final = step_index == num_steps - 1 and (getattr(config, "euler_at_final", False)
                                             or (config.lower_order_final and num_steps < 15) or zero_final)
    second = step_index == num_steps - 2 and config.lower_order_final and num_steps < 15
    if config.solver_order == 1 or lower_order_nums < 1 or final:
        return 1
    if config.solver_order == 2 or lower_order_nums < 2 or second:
        return 2
    return 3


def clipped_timesteps(sched, num_inference_steps, timesteps, sigma_fields):
    """A DPM-Solver's integer timesteps before any sigma conversion: custom descending ``timesteps`` checked (not
    with the config's ``sigma_fields``, {field: name}, set), or ``num_inference_steps`` spaced per the config up to
    where lambda_min_clipped cuts the training schedule, as diffusers does."""
    c = sched.config
    n_train = c.num_train_timesteps
    if timesteps is not None:
        if any(c[field] for field in sigma_fields):
            raise ValueError(f"custom timesteps cannot be used with {' or '.join(sigma_fields.values())} sigmas")
        return sched._custom_schedule("timesteps", timesteps, num_inference_steps, below=n_train).astype(np.int64)
    sched._check_steps(num_inference_steps)
    alphas = sched.alphas_cumprod
    lambdas = torch.log(torch.sqrt(alphas)) - torch.log(torch.sqrt(1 - alphas))
    last = n_train - int(torch.searchsorted(torch.flip(lambdas, [0]), c.lambda_min_clipped))
    return sched._spaced_timesteps(int(num_inference_steps), last)


def nearest_settings(kwargs):
    """As diffusers: a DEIS or UniPC config loaded into a DPM-Solver keeps its own algorithm's nearest settings."""
    if kwargs.get("algorithm_type") == "deis":
        kwargs["algorithm_type"] = "dpmsolver++"
    if kwargs.get("solver_type") in ("logrho", "bh1", "bh2"):
        kwargs["solver_type"] = "midpoint"
    return kwargs


def check_choices(config, choices):
    """Each (field, allowed values) of ``choices`` checked on the config: a ValueError naming the field."""
    for field, allowed in choices:
        if config[field] not in allowed or isinstance(config[field], bool):
            hint = (" (dpmsolver and sde-dpmsolver, the noise-prediction variants, are deprecated in diffusers)"
                    if field == "algorithm_type" and "dpmsolver++" in allowed else "")
            raise ValueError(f"{field} must be one of {allowed}, got {config[field]!r}{hint}")


# The config choices every DPM-Solver++ on VP sigmas checks (multistep adds its timestep spacing)
VP_CHOICES = (("algorithm_type", ALGORITHMS), ("solver_type", ("midpoint", "heun")), ("solver_order", (1, 2, 3)),
              ("prediction_type", tuple(_X0)), ("final_sigmas_type", ("zero", "sigma_min")),
              ("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2")))


def sde_noise(config, model_output, generator):
    """The SDE variant's noise for one step, drawn in the model output's dtype as diffusers' single-step and EDM
    solvers draw it (even where a call scales it by 0); None for the ODE."""
    if config.algorithm_type != "sde-dpmsolver++":
        return None
    return randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)


def thresholder(config):
    """diffusers' dynamic thresholding of x0 as ``solver_step``'s ``threshold``, or None without it."""
    if not config.thresholding:
        return None
    return functools.partial(threshold_sample, ratio=config.dynamic_thresholding_ratio,
                             max_value=config.sample_max_value)


def advance_multistep(sched, kept):
    """diffusers' multistep bookkeeping after a step, on ours or on diffusers' own scheduler (DPM-Solver, DEIS, the
    EDM DPM-Solver, and single-step DPM-Solver's calls): ``kept`` appended to ``model_outputs`` in place, the oldest
    dropped; one more step towards the full order (where the scheduler counts them); the step index advanced."""
    order = sched.config.solver_order
    for j in range(order - 1):
        sched.model_outputs[j] = sched.model_outputs[j + 1]
    sched.model_outputs[-1] = kept
    if getattr(sched, "lower_order_nums", order) < order:
        sched.lower_order_nums += 1
    sched._step_index += 1


class DPMSolverMultistepScheduler(VPSigmaScheduleBase):
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_lu_lambdas=False,
        final_sigmas_type="zero", lambda_min_clipped=-math.inf, timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False,
        flow_shift=1.0, time_shift_type="exponential",  # kept for round trips; they act only with flow sigmas
    )
    unsupported = dict(use_beta_sigmas=False, use_flow_sigmas=False, variance_type=None, use_dynamic_shifting=False)

    def __init__(self, **kwargs):
        super().__init__(**nearest_settings(kwargs))
        check_choices(self.config, VP_CHOICES + (("timestep_spacing", ("linspace", "leading", "trailing")),))
        self._training_schedule()
        self._reset_state()

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """diffusers' schedule: ``num_inference_steps`` spaced per the config (within lambda_min_clipped), or custom
        descending integer ``timesteps``; then Karras, exponential or Lu-lambda sigmas if the config asks."""
        c = self.config
        timesteps = clipped_timesteps(self, num_inference_steps, timesteps, {
            "use_karras_sigmas": "Karras", "use_lu_lambdas": "Lu-lambda", "use_exponential_sigmas": "exponential"})
        # (diffusers rounds Karras and Lu-lambda timesteps, except for the cosine schedule)
        sigmas, timesteps, base = self._schedule_sigmas(timesteps, num_inference_steps or len(timesteps),
                                                        karras_rounded=c.beta_schedule != "squaredcos_cap_v2")
        last_sigma = float(base[0]) if c.final_sigmas_type == "sigma_min" else 0.0
        self._finish_schedule(sigmas, last_sigma, timesteps, device)

    def _reset_state(self):
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = self._begin_index = None

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        c = self.config
        i, n = self._checked_step_index(timestep), len(self.timesteps)
        order = solver_order_now(c, i, n, self.lower_order_nums)
        coefficients = solver_coefficients(self._sigma_values, i, order, c.prediction_type, c.algorithm_type,
                                           c.solver_type)
        if coefficients is None:
            raise ValueError(
                f"the order-{order} DPM-Solver update at step {i} is 0 / 0 for this schedule (sigmas "
                f"{self._sigma_values[max(i - order + 1, 0):i + 2]}: two equal, or a final sigma of 0); diffusers "
                "returns NaN there. Use lower_order_final=True, solver_type='midpoint' or final_sigmas_type='zero'")
        noise = None
        if c.algorithm_type == "sde-dpmsolver++":  # drawn as diffusers draws it, in fp32, even when scaled by 0
            noise = (variance_noise.to(model_output.device, torch.float32) if variance_noise is not None else
                     randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                  dtype=torch.float32))
        earlier = [self.model_outputs[-j] for j in range(1, order)]
        prev, x0 = solver_step(model_output, sample, earlier, coefficients, noise, thresholder(c))
        advance_multistep(self, x0)
        return SchedulerOutput(prev, x0) if return_dict else (prev,)


