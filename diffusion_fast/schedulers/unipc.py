"""UniPC (Zhao et al. 2023) with diffusers' UniPCMultistepScheduler semantics: the predictor-corrector multistep
sampler diffusers' ControlNet and fast-sampling docs swap in.

Each step first corrects the previous step's prediction with this step's model output (UniC, unless
``disable_corrector`` lists the step), then predicts the next sample (UniP), both with diffusers' B(h) formulas
(``solver_type`` bh1 or bh2), on data (``predict_x0``, the default) or noise predictions. Supported: orders 1 and up,
``lower_order_final``, Karras and exponential sigmas (with ``sigma_min``/``sigma_max``), a final sigma of zero or
sigma_min, thresholding, every spacing and prediction type. Rejected with an error naming the field: ``solver_p``
(another scheduler as predictor), beta sigmas, flow sigmas and dynamic shifting.

The corrector and the predictor are linear in the samples and the stored predictions. ``bh_coefficients`` works
their weights out on the host in float64 (the small linear solve diffusers runs on the device as tensors), and
``unipc_update`` runs a step as at most two fused passes (``ops.linear_step``): the corrected sample with this step's
prediction, then the next sample. ``accelerate``'s fused step for diffusers' own UniPC runs the same function.
"""
from __future__ import annotations

import math

import numpy as np

from .. import ops
from .base import VPSigmaScheduleBase
from .common import SchedulerOutput, check_same_run, half_log_snr, linear_terms, threshold_sample, vp_alpha_sigma


def prediction_coefficients(sigma, prediction, predict_x0):
    """(cx, cm): the prediction UniPC stores, cx * sample + cm * model_output (x0, or the noise without predict_x0)."""
    a, s = vp_alpha_sigma(sigma)
    if predict_x0:
        return {"epsilon": (1 / a, -s / a), "v_prediction": (a, -s), "sample": (0.0, 1.0)}[prediction]
    return {"epsilon": (0.0, 1.0), "v_prediction": (s, a), "sample": (1 / s, -a / s)}[prediction]


def bh_coefficients(sigmas, t, s0, earlier, order, predict_x0, solver_type, corrector, as_diffusers=False):
    """diffusers' UniP (``corrector=False``) or UniC B(h) update from sigma index ``s0`` to ``t``, with the stored
    predictions at the sigma indices ``earlier`` (newest first, order - 1 of them), as weights:
    ``(px, w_m0, w_earlier, w_now)`` such that the result is px * x + w_m0 * m0 + sum(w_earlier[k] * m_k)
    (+ w_now * this step's prediction, for the corrector), m0 the prediction at s0. None where the update is not
    finite (as in diffusers: a higher order onto a final sigma of 0, two equal sigmas). ``as_diffusers``: also None
    where only diffusers' way of computing it is not finite (bh1's B(h) = -inf onto a final sigma of 0, times a zero
    residual: NaN in diffusers, the plain first-order update here)."""
    alpha_t, sigma_t = vp_alpha_sigma(sigmas[t])
    alpha_s0, sigma_s0 = vp_alpha_sigma(sigmas[s0])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        h = np.float64(half_log_snr(sigmas[t]) - half_log_snr(sigmas[s0]))
        rks = [(half_log_snr(sigmas[si]) - half_log_snr(sigmas[s0])) / h for si in earlier] + [np.float64(1.0)]
        hh = -h if predict_x0 else h
        h_phi_1 = np.expm1(hh)  # h phi_1(h) = e^h - 1
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if solver_type == "bh1" else np.expm1(hh)
        factorial = 1
        rows, b = [], []
        for i in range(1, order + 1):
            rows.append([rk ** (i - 1) for rk in rks])
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        rows, b = np.array(rows, dtype=np.float64), np.array(b, dtype=np.float64)
        if as_diffusers and not np.isfinite(b_h):  # bh1 onto a final sigma of 0: diffusers' B(h) * 0 is NaN
            return None
        try:
            if corrector:
                rhos = np.array([0.5]) if order == 1 else np.linalg.solve(rows, b)
            elif order == 1:
                rhos = np.zeros(0)
            else:
                rhos = np.array([0.5]) if order == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1])
        except np.linalg.LinAlgError:  # repeated sigmas: diffusers' torch.linalg.solve fails there too
            return None
        scale = alpha_t if predict_x0 else sigma_t
        px = sigma_t / sigma_s0 if predict_x0 else alpha_t / alpha_s0
        w_m0 = -scale * h_phi_1
        w_earlier = []
        for rho, rk in zip(rhos, rks[:-1]):  # rho * (m_k - m0) / rk
            w = -scale * b_h * rho / rk
            w_earlier.append(w)
            w_m0 -= w
        w_now = 0.0
        if corrector:  # rhos[-1] * (prediction now - m0)
            w_now = -scale * b_h * rhos[-1]
            w_m0 -= w_now
    values = [float(v) for v in (px, w_m0, w_now, *w_earlier)]
    if not all(map(math.isfinite, values)):
        return None
    return values[0], values[1], tuple(values[3:]), values[2]


def unipc_update(self, model_output, timestep, sample, sigmas, as_diffusers=False):
    """One UniPC step on ``self``, a scheduler with diffusers' UniPC state (``model_outputs``, ``timestep_list``,
    ``lower_order_nums``, ``last_sample``, ``this_order``, ``disable_corrector``, ``predict_x0``, ``_step_index``,
    ``timesteps``, ``config``), ``sigmas`` its sigmas as host floats. Updates the state as diffusers' ``step`` does
    and returns the next sample, or returns None (state untouched) where the update is not finite (``as_diffusers``:
    where diffusers' way of computing it is not, see ``bh_coefficients``)."""
    c, i, n = self.config, self._step_index, len(self.timesteps)
    check_same_run(sample, [self.last_sample, *self.model_outputs])
    x0_now = self.predict_x0
    corrector = None
    use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
    if use_corrector:  # UniC from i - 1 to i with the previous step's order
        corrector = bh_coefficients(sigmas, i, i - 1, [i - 1 - k for k in range(1, self.this_order)],
                                    self.this_order, x0_now, c.solver_type, corrector=True, as_diffusers=as_diffusers)
    order = min(c.solver_order, n - i) if c.lower_order_final else c.solver_order
    order = min(order, self.lower_order_nums + 1)  # warm-up: as many earlier predictions as there are
    predictor = bh_coefficients(sigmas, i + 1, i, [i - k for k in range(1, order)], order, x0_now, c.solver_type,
                                corrector=False, as_diffusers=as_diffusers)
    if predictor is None or (use_corrector and corrector is None):
        return None
    cx, cm = prediction_coefficients(sigmas[i], c.prediction_type, x0_now)
    if x0_now and c.thresholding:  # as diffusers: x0 in the model output's dtype, thresholded, then used
        model_output = threshold_sample((cx * sample + cm * model_output).to(model_output.dtype),
                                        c.dynamic_thresholding_ratio, c.sample_max_value)
        cx, cm = 0.0, 1.0
    prediction = None
    if use_corrector:
        px, w_m0, w_earlier, w_now = corrector
        earlier = [self.model_outputs[-(k + 1)] for k in range(1, self.this_order)]
        extra, pe = linear_terms([(px, self.last_sample), (w_m0, self.model_outputs[-1])]
                                 + list(zip(w_earlier, earlier)))
        sample, prediction = ops.linear_step(model_output, sample, extra, cx=cx, cm=cm, p0=w_now, px=0.0, pe=pe)
    px, w_m0, w_earlier, _ = predictor
    extra, pe = linear_terms(list(zip(w_earlier, [self.model_outputs[-k] for k in range(1, order)])))
    if prediction is None:
        prev, prediction = ops.linear_step(model_output, sample, extra, cx=cx, cm=cm, p0=w_m0, px=px, pe=pe)
    else:
        prev, _ = ops.linear_step(prediction, sample, extra, cx=0.0, cm=1.0, p0=w_m0, px=px, pe=pe)
    self.model_outputs = self.model_outputs[1:] + [prediction]
    self.timestep_list = self.timestep_list[1:] + [timestep]
    self.this_order, self.last_sample = order, sample
    self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
    self._step_index += 1
    return prev


class UniPCMultistepScheduler(VPSigmaScheduleBase):
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
        use_karras_sigmas=False, use_exponential_sigmas=False, timestep_spacing="linspace", steps_offset=0,
        final_sigmas_type="zero", rescale_betas_zero_snr=False, sigma_min=None, sigma_max=None,
        flow_shift=1.0, time_shift_type="exponential",  # kept for round trips; they act only with flow sigmas
    )
    unsupported = dict(solver_p=None, use_beta_sigmas=False, use_flow_sigmas=False, use_dynamic_shifting=False,
                       shift_terminal=None)

    def __init__(self, **kwargs):
        if kwargs.get("solver_type") in ("midpoint", "heun", "logrho"):  # a DPM or DEIS config, as diffusers maps it
            kwargs["solver_type"] = "bh2"
        super().__init__(**kwargs)
        c = self.config
        order = c.solver_order
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"solver_order must be a positive int, got {order!r}")
        for field, allowed in (("solver_type", ("bh1", "bh2")),
                               ("prediction_type", ("epsilon", "v_prediction", "sample")),
                               ("final_sigmas_type", ("zero", "sigma_min")),
                               ("timestep_spacing", ("linspace", "leading", "trailing")),
                               ("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))):
            if c[field] not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {c[field]!r}")
        if not all(isinstance(j, int) and not isinstance(j, bool) for j in c.disable_corrector):
            raise ValueError(f"disable_corrector must be a list of step indices, got {c.disable_corrector!r}")
        self._training_schedule()
        self.predict_x0, self.disable_corrector = c.predict_x0, list(c.disable_corrector)
        self._reset_state()

    def _reset_state(self):
        order = self.config.solver_order
        self.model_outputs, self.timestep_list = [None] * order, [None] * order
        self.lower_order_nums, self.last_sample, self.this_order = 0, None, None
        self._step_index = self._begin_index = None

    def set_timesteps(self, num_inference_steps, device=None):
        """diffusers' schedule: spaced timesteps (an extra point dropped at the end for linspace and leading), then
        Karras or exponential sigmas if the config asks, with the final sigma per ``final_sigmas_type``."""
        self._check_steps(num_inference_steps)
        c, n = self.config, int(num_inference_steps)
        base = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        sigma_range = (c.sigma_min if c.sigma_min is not None else float(base[0]),
                       c.sigma_max if c.sigma_max is not None else float(base[-1]))
        # (Karras timesteps rounded also for cosine, unlike DPM-Solver multistep's)
        sigmas, timesteps, base = self._schedule_sigmas(self._spaced_timesteps(n), n, sigma_range=sigma_range)
        # diffusers' sigma_min with Karras or exponential sigmas: the schedule's own last sigma
        last = float(sigmas[-1]) if c.use_karras_sigmas or c.use_exponential_sigmas else float(base[0])
        self._finish_schedule(sigmas, last if c.final_sigmas_type == "sigma_min" else 0.0, timesteps, device)

    def step(self, model_output, timestep, sample, return_dict=True):
        i = self._checked_step_index(timestep)
        prev = unipc_update(self, model_output, timestep, sample, self._sigma_values)
        if prev is None:
            raise ValueError(
                f"UniPC's update at step {i} is not finite for this schedule (sigmas {self._sigma_values[-3:]}); "
                "diffusers returns NaN there. Use lower_order_final=True or final_sigmas_type='sigma_min'")
        return SchedulerOutput(prev) if return_dict else (prev,)

