"""DEIS multistep (Zhang & Chen 2022, "log-rho" solver, orders 1 to 3) with diffusers' DEISMultistepScheduler
semantics.

The model output is turned into a noise prediction, eps = (x - alpha_s * x0) / sigma_s, which is kept as diffusers
keeps it (``model_outputs``); the update is exponential integration in rho = sigma / alpha with the last one to
three noise predictions interpolated by a Lagrange polynomial in log rho (diffusers' ``ind_fn`` integrals). Every
step is linear in the sample, this step's model output and the kept noise predictions, so ``deis_coefficients``
works the weights out on the host in float64 and the step is one ``linear_step`` pass whose second output is this
step's noise prediction (``dpm_solver.solver_step``). ``accelerate``'s fused step for diffusers' own uses both.

Rejected with an error naming the field: thresholding, beta and flow sigmas, dynamic shifting. A DPM-Solver or UniPC
config loads with DEIS's own algorithm and solver type, as in diffusers.
"""
from __future__ import annotations

import math

import numpy as np

from .base import VPSigmaScheduleBase
from .common import SchedulerOutput, vp_alpha_sigma
from .dpm_solver import _X0, advance_multistep, check_choices, solver_order_now, solver_step


def _integral(order, t, b, c, d=None):
    """diffusers' ``ind_fn``: the antiderivative, at rho = ``t``, of the Lagrange basis polynomial in log rho that
    is 1 at ``b`` and 0 at ``c`` (and ``d``), times rho."""
    lt, lb, lc = math.log(t), math.log(b), math.log(c)
    if order == 2:
        return t * (-lc + lt - 1) / (lb - lc)
    ld = math.log(d)
    numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return numerator / ((lb - lc) * (lb - ld))


def deis_coefficients(sigmas, i, order, prediction):
    """DEIS's update at step ``i`` of ``sigmas`` (host floats, the final sigma last) in ``solver_step``'s form:
    ``(cx, cm, p0, px, weights, 0.0)`` with eps = cx * x + cm * m this step's noise prediction and prev = p0 * eps +
    px * x + sum(w * eps of the step j back); None where diffusers' arithmetic is not finite (two equal sigmas under
    a higher order: a division by log b - log c = 0)."""
    alpha_t, _ = vp_alpha_sigma(sigmas[i + 1])
    alpha_s, sigma_s = vp_alpha_sigma(sigmas[i])
    if prediction == "epsilon":
        cx, cm = 0.0, 1.0
    else:
        x, m = _X0[prediction](alpha_s, sigma_s)
        cx, cm = (1 - alpha_s * x) / sigma_s, -alpha_s * m / sigma_s
    rho = [sigmas[i + 1]] + [sigmas[i - j] for j in range(order)]  # rho = sigma / alpha is the Karras sigma
    try:
        if order == 1:  # h = lambda_t - lambda_s = log(rho_s / rho_t)
            weights = [-alpha_t * rho[0] * math.expm1(math.log(rho[1] / rho[0]))]
        else:
            points = rho[1:]
            weights = []
            for k in range(order):  # the basis polynomial that is 1 at points[k]
                others = points[:k] + points[k + 1:]
                weights.append(alpha_t * (_integral(order, rho[0], points[k], *others)
                                          - _integral(order, rho[1], points[k], *others)))
    except (ZeroDivisionError, ValueError):
        return None
    values = [cx, cm, weights[0], alpha_t / alpha_s, *weights[1:]]
    if not all(map(math.isfinite, values)):
        return None
    return (*values[:4], tuple(values[4:]), 0.0)


class DEISMultistepScheduler(VPSigmaScheduleBase):
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="deis", solver_type="logrho", lower_order_final=True,
        use_karras_sigmas=False, use_exponential_sigmas=False, timestep_spacing="linspace", steps_offset=0,
        flow_shift=1.0, time_shift_type="exponential",  # kept for round trips; they act only with flow sigmas
    )
    unsupported = dict(use_beta_sigmas=False, use_flow_sigmas=False, use_dynamic_shifting=False, thresholding=False)

    def __init__(self, **kwargs):
        # As diffusers: a DPM-Solver or UniPC config loaded into this scheduler takes DEIS's algorithm and solver
        if kwargs.get("algorithm_type") in ("dpmsolver", "dpmsolver++"):
            kwargs["algorithm_type"] = "deis"
        if kwargs.get("solver_type") in ("midpoint", "heun", "bh1", "bh2"):
            kwargs["solver_type"] = "logrho"
        super().__init__(**kwargs)
        check_choices(self.config, (("algorithm_type", ("deis",)), ("solver_type", ("logrho",)),
                                    ("solver_order", (1, 2, 3)), ("prediction_type", tuple(_X0)),
                                    ("timestep_spacing", ("linspace", "leading", "trailing")),
                                    ("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))))
        self._training_schedule()
        self._reset_state()

    def set_timesteps(self, num_inference_steps=None, device=None):
        """diffusers' schedule: ``num_inference_steps`` spaced per the config, or Karras or exponential sigmas; the
        final sigma is the training schedule's first (t = 0), or with those sigmas the last one repeated."""
        c = self.config
        self._check_steps(num_inference_steps)
        n = int(num_inference_steps)
        sigmas, timesteps, base = self._schedule_sigmas(self._spaced_timesteps(n), n)
        repeated = c.use_karras_sigmas or c.use_exponential_sigmas  # (the last such sigma is repeated at the end)
        last_sigma = float(np.float32(sigmas[-1])) if repeated else float(base[0])
        self._finish_schedule(sigmas, last_sigma, timesteps, device)

    def _reset_state(self):
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = self._begin_index = None

    def step(self, model_output, timestep, sample, return_dict=True):
        c = self.config
        i, n = self._checked_step_index(timestep), len(self.timesteps)
        order = solver_order_now(c, i, n, self.lower_order_nums, zero_final=False)  # (DEIS ends at sigma(t=0))
        coefficients = deis_coefficients(self._sigma_values, i, order, c.prediction_type)
        if coefficients is None:
            raise ValueError(
                f"the order-{order} DEIS update at step {i} divides by zero for this schedule (sigmas "
                f"{self._sigma_values[max(i - order + 1, 0):i + 2]}: two equal); diffusers returns NaN or inf there. "
                "Use lower_order_final=True or fewer repeated sigmas")
        earlier = [self.model_outputs[-j] for j in range(1, order)]
        prev, eps = solver_step(model_output, sample, earlier, coefficients)
        advance_multistep(self, eps)
        return SchedulerOutput(prev) if return_dict else (prev,)
