"""Linear multistep (LMS, Karras et al. 2022's "LMS") with diffusers' LMSDiscreteScheduler semantics.

The schedule is Euler's. A step keeps the derivative (x - x0) / sigma of every step (up to ``order``, default 4) and
moves the sample by the integral of their Lagrange interpolation over [sigma, sigma_next]. diffusers integrates each
Lagrange basis polynomial numerically with scipy's ``quad``; here each is integrated exactly (numpy's polynomial
antiderivative, in float64), which is what ``quad`` converges to for a polynomial of degree 3 at most. The update is
linear in the sample, the model output and the earlier derivatives, so a step is one fused pass (``ops.linear_step``;
the earlier derivatives combined first, a few small ops).

``lms_update`` is one step on the state diffusers keeps (``step_index``, ``derivatives``): our scheduler runs it, and
so does ``accelerate``'s fused step for diffusers' own LMSDiscreteScheduler (which then needs no scipy).
"""
from __future__ import annotations

import numpy as np
import torch
from numpy.polynomial import polynomial

from .. import ops
from .._config import FrozenConfig
from .common import SchedulerOutput, check_same_run, check_step_inputs, linear_terms
from .euler import EulerDiscreteScheduler
from .heun import derivative_weights

# Euler's schedule options, at the values diffusers' LMS implies (it has no such fields)
FIXED_SCHEDULE = dict(interpolation_type="linear", sigma_min=None, sigma_max=None, timestep_type="discrete",
                      final_sigmas_type="zero", rescale_betas_zero_snr=False)


def lms_coefficients(values, index: int, order: int):
    """The weights of the ``order`` newest derivatives (newest first) for the step from values[index] to
    values[index + 1]: the integral of each Lagrange basis polynomial on the sigmas values[index - k], k < order
    (diffusers' get_lms_coefficient), exactly, in float64."""
    nodes = [values[index - k] for k in range(order)]
    weights = []
    for j in range(order):
        others = [nodes[k] for k in range(order) if k != j]
        basis = polynomial.polyfromroots(others) / np.prod([nodes[j] - s for s in others])
        antiderivative = polynomial.polyint(basis)
        weights.append(float(polynomial.polyval(values[index + 1], antiderivative)
                             - polynomial.polyval(values[index], antiderivative)))
    return weights


def lms_update(self, model_output, sample, values, order: int = 4, weights_cache=None):
    """One LMS step on ``self`` (a scheduler with diffusers' LMS state: ``step_index``, ``derivatives``, ``config``)
    with ``values`` the sigmas as host floats. Keeps this step's derivative as diffusers does (at most ``order`` of
    them) and returns (prev_sample, pred_original_sample); the caller advances the step index. ``weights_cache``: a
    dict kept for this schedule, so each step's weights are integrated once (0.3 ms of numpy each time otherwise)."""
    check_step_inputs(model_output, sample)
    check_same_run(sample, self.derivatives)
    i = self.step_index
    prediction = self.config.prediction_type
    dtype = torch.promote_types(model_output.dtype, sample.dtype)
    model_output = model_output.to(dtype)
    if prediction == "sample":  # the derivative is (x - x0) / sigma: the difference taken first, as diffusers does
        model_output = sample - model_output
    a, b, dx, dm = derivative_weights(values[i], prediction)
    self.derivatives.append(torch.add(model_output * dm, sample, alpha=dx) if dx else model_output * dm)
    if len(self.derivatives) > order:
        self.derivatives.pop(0)
    key = (i, min(i + 1, order))
    weights = weights_cache.get(key) if weights_cache is not None else None
    if weights is None:
        weights = lms_coefficients(values, i, key[1])
        if weights_cache is not None:
            weights_cache[key] = weights
    # prev = x + sum_k w_k d_(n-k): this step's d_n = dx x + dm m folded into the pass, the earlier ones combined
    earlier = list(zip(weights[1:], reversed(self.derivatives[:-1])))
    extra, pe = linear_terms(earlier)
    prev, x0 = ops.linear_step(model_output, sample, extra, cx=a, cm=b, p0=0.0, px=1 + weights[0] * dx,
                               pm=weights[0] * dm, pe=pe)
    return prev, x0


class LMSDiscreteScheduler(EulerDiscreteScheduler):
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        use_karras_sigmas=False, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0,
    )

    def __init__(self, **kwargs):
        schedule = kwargs.get("beta_schedule", "linear")
        if schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(
                f"beta_schedule must be linear, scaled_linear or squaredcos_cap_v2 (LMS), got {schedule!r}")
        super().__init__(**kwargs)
        self.derivatives = []

    def _schedule_config(self):
        return FrozenConfig(dict(self.config, **FIXED_SCHEDULE))

    def set_timesteps(self, num_inference_steps, device=None):
        """Euler's schedule for ``num_inference_steps`` (diffusers' LMS takes no custom timesteps or sigmas)."""
        super().set_timesteps(num_inference_steps, device)

    def _finish_schedule(self, sigmas, timesteps, n, device):
        super()._finish_schedule(sigmas, timesteps, n, device)
        self._sigma_values = self.sigmas.double().tolist()  # step's coefficients: host floats, no device read
        self._weights = {}  # (step index, order) -> the integrated weights, for this schedule
        self.derivatives = []

    def step(self, model_output, timestep, sample, order=4, return_dict=True):
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be a positive int, got {order!r}")
        self._checked_step_index(timestep)  # (not Euler's _next_index: diffusers' LMS takes integer timesteps too)
        prev, x0 = lms_update(self, model_output, sample, self._sigma_values, order, self._weights)
        self._step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)
