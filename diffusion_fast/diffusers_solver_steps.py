"""accelerate's fused ``step`` methods for diffusers' schedulers whose update our own schedulers compute: Heun, DPM2
and DPM2 ancestral, LMS, DPM-Solver++ multistep and single-step, the EDM DPM-Solver++ and Euler, DEIS, PNDM, UniPC,
LCM and TCD. Each runs our scheduler's update function (``schedulers.heun``, ``schedulers.kdpm2``, ``schedulers.lms``,
``schedulers.dpm_solver``, ``schedulers.dpm_singlestep``, ``schedulers.edm``, ``schedulers.deis``,
``schedulers.pndm``, ``schedulers.unipc``, ``schedulers.lcm``, ``schedulers.tcd``) on the state diffusers' scheduler
keeps, one ``linear_step`` pass a call. What they do not mirror goes to the scheduler's own step. The registry and
the shared checks are in ``diffusers_schedulers``.
"""
from __future__ import annotations

import torch

from .diffusers_schedulers import _HOST_LISTS, _LMS_WEIGHTS, _config_gap_now, _original, _sigma_tables
from .schedulers import deis, dpm_singlestep, dpm_solver, edm, heun, kdpm2, lcm, lms, pndm, tcd, unipc
from .schedulers.common import randn_tensor


def _fused_heun_step(self, model_output, timestep, sample, return_dict=True):
    """diffusers' HeunDiscreteScheduler.step as our scheduler computes it (``schedulers.heun.heun_update``): each of
    a step's two calls one fused pass (the second after one small op combining the kept tensors), coefficients in
    float64 from the sigmas as host floats, ``prev_derivative``, ``dt`` and ``sample`` kept as diffusers keeps them
    (``dt`` a float). A call past the schedule keeps diffusers' own step (its NaN, or its IndexError)."""
    from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput

    if _config_gap_now(self):
        return _original(self, model_output, timestep, sample, return_dict)
    if self.step_index is None:
        self._init_step_index(timestep)
    values, _ = _sigma_tables(self, torch.device("cpu"))  # the sigmas as floats, made once per schedule
    if self.step_index >= len(values) - 1:  # a call past the schedule: diffusers' own (NaN or IndexError)
        return _original(self, model_output, timestep, sample, return_dict)
    prev, x0 = heun.heun_update(self, model_output, sample, values)
    self._step_index += 1
    return HeunDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


def _fused_kdpm2_step(self, model_output, timestep, sample, return_dict=True):
    """diffusers' KDPM2DiscreteScheduler.step ("DPM2") as our scheduler computes it (``schedulers.kdpm2``): each of
    a step's two calls one fused pass, coefficients in float64 from diffusers' own sigma tables as host floats (read
    once per schedule), ``sample`` kept as diffusers keeps it. A call past the schedule keeps diffusers' own step."""
    from diffusers.schedulers.scheduling_k_dpm_2_discrete import KDPM2DiscreteSchedulerOutput

    if _config_gap_now(self):
        return _original(self, model_output, timestep, sample, return_dict)
    prev_x0 = _kdpm2_call(self, model_output, timestep, sample, ("sigmas", "sigmas_interpol"), None)
    if prev_x0 is None:
        return _original(self, model_output, timestep, sample, return_dict)
    return KDPM2DiscreteSchedulerOutput(prev_sample=prev_x0[0], pred_original_sample=prev_x0[1]) if return_dict \
        else prev_x0


def _fused_kdpm2_ancestral_step(self, model_output, timestep, sample, generator=None, return_dict=True):
    """diffusers' KDPM2AncestralDiscreteScheduler.step ("DPM2 a") as ``_fused_kdpm2_step``, its second call's noise
    drawn from the generator as diffusers draws it."""
    from diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete import KDPM2AncestralDiscreteSchedulerOutput

    if _config_gap_now(self):
        return _original(self, model_output, timestep, sample, generator, return_dict)
    names = ("sigmas", "sigmas_interpol", "sigmas_up", "sigmas_down")
    prev_x0 = _kdpm2_call(self, model_output, timestep, sample, names, generator)
    if prev_x0 is None:
        return _original(self, model_output, timestep, sample, generator, return_dict)
    if not return_dict:
        return prev_x0
    return KDPM2AncestralDiscreteSchedulerOutput(prev_sample=prev_x0[0], pred_original_sample=prev_x0[1])


def _kdpm2_call(self, model_output, timestep, sample, names, generator):
    """(prev_sample, pred_original_sample) of one DPM2 call on diffusers' scheduler (its tables ``names`` read as
    host floats), its step index advanced; None for a call past the schedule."""
    if self.step_index is None:
        self._init_step_index(timestep)
    if self.step_index >= len(self.timesteps):
        return None
    tables = dict(zip(names, _host_lists(self, names)))
    prev, x0 = kdpm2.kdpm2_update(self, model_output, sample, tables, generator)
    self._step_index += 1
    return prev, x0


def _fused_lms_step(self, model_output, timestep, sample, order=4, return_dict=True):
    """diffusers' LMSDiscreteScheduler.step as our scheduler computes it (``schedulers.lms.lms_update``): the
    Lagrange weights integrated exactly in float64 (where diffusers calls scipy's quad), the update one fused pass
    after the earlier derivatives are combined, ``derivatives`` kept as diffusers keeps them. A call diffusers warns
    about (scale_model_input skipped), an order below 1 and a call past the schedule keep diffusers' own step."""
    from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteSchedulerOutput

    if (not getattr(self, "is_scale_input_called", True) or _config_gap_now(self)
            or isinstance(order, bool) or not isinstance(order, int) or order < 1):
        return _original(self, model_output, timestep, sample, order, return_dict)
    if self.step_index is None:
        self._init_step_index(timestep)
    values, _ = _sigma_tables(self, torch.device("cpu"))  # the sigmas as floats, made once per schedule
    if self.step_index >= len(values) - 1:
        return _original(self, model_output, timestep, sample, order, return_dict)
    cached = getattr(self, _LMS_WEIGHTS, None)
    if cached is None or cached[0] is not values:  # a new schedule (the sigma tables were made again)
        cached = (values, {})
        setattr(self, _LMS_WEIGHTS, cached)
    prev, x0 = lms.lms_update(self, model_output, sample, values, order, cached[1])
    self._step_index += 1
    return LMSDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


def _fused_dpm_multistep_step(self, model_output, timestep, sample, generator=None, variance_noise=None,
                              return_dict=True):
    """diffusers' DPMSolverMultistepScheduler.step for DPM-Solver++ (orders 1 to 3, midpoint or heun, ODE or SDE:
    "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M") as our scheduler computes it (``schedulers.dpm_solver``): x0 and the
    update in one pass, the step's x0 kept in ``model_outputs`` as diffusers keeps it (in model_output's dtype), the
    SDE noise drawn as diffusers draws it. The noise-prediction variants, thresholding, learned variances and flow
    sigmas keep diffusers' own step, and so does a step diffusers computes as 0 / 0 (NaN in its image too)."""
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    config = self.config
    if self.num_inference_steps is None or _config_gap_now(self):
        return _original(self, model_output, timestep, sample, generator, variance_noise, return_dict)
    if self.step_index is None:
        self._init_step_index(timestep)
    n, i = len(self.timesteps), self.step_index
    order = dpm_solver.solver_order_now(config, i, n, self.lower_order_nums)
    values, _ = _sigma_tables(self, torch.device("cpu"))  # the sigmas as floats, made once per schedule
    coefficients = dpm_solver.solver_coefficients(values, i, order, config.prediction_type, config.algorithm_type,
                                                  config.solver_type)
    if coefficients is None:  # 0 / 0 in diffusers' arithmetic: its own step (and its NaN)
        return _original(self, model_output, timestep, sample, generator, variance_noise, return_dict)
    noise = None
    if config.algorithm_type == "sde-dpmsolver++":
        noise = (variance_noise.to(model_output.device, torch.float32) if variance_noise is not None else
                 randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                              dtype=torch.float32))
    earlier = [self.model_outputs[-j] for j in range(1, order)]
    prev, x0 = dpm_solver.solver_step(model_output, sample, earlier, coefficients, noise)
    dpm_solver.advance_multistep(self, x0)
    return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def _fused_deis_step(self, model_output, timestep, sample, return_dict=True):
    """diffusers' DEISMultistepScheduler.step (orders 1 to 3) as our scheduler computes it (``schedulers.deis``):
    this step's noise prediction and the update in one pass, the prediction kept in ``model_outputs`` as diffusers
    keeps it. Thresholding and flow sigmas keep diffusers' own step, and so does a step whose coefficients diffusers
    computes as NaN or inf (two equal sigmas under a higher order)."""
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    config = self.config
    if self.num_inference_steps is None or _config_gap_now(self):
        return _original(self, model_output, timestep, sample, return_dict)
    if self.step_index is None:
        self._init_step_index(timestep)
    n, i = len(self.timesteps), self.step_index
    order = dpm_solver.solver_order_now(config, i, n, self.lower_order_nums, zero_final=False)
    values, _ = _sigma_tables(self, torch.device("cpu"))  # the sigmas as floats, made once per schedule
    coefficients = deis.deis_coefficients(values, i, order, config.prediction_type) if i < n else None
    if coefficients is None:  # past the schedule, or not finite in diffusers' arithmetic: its own step
        return _original(self, model_output, timestep, sample, return_dict)
    earlier = [self.model_outputs[-j] for j in range(1, order)]
    prev, eps = dpm_solver.solver_step(model_output, sample, earlier, coefficients)
    dpm_solver.advance_multistep(self, eps)
    return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def _fused_dpm_singlestep_step(self, model_output, timestep, sample, generator=None, return_dict=True):
    """diffusers' DPMSolverSinglestepScheduler.step for DPM-Solver++ (orders 1 to 3, midpoint or heun, ODE or SDE)
    as our scheduler computes it (``schedulers.dpm_singlestep``): x0 and the call's update in one pass, the x0 kept in
    ``model_outputs`` and a group's first sample in ``sample`` as diffusers keeps them, the SDE noise drawn as
    diffusers draws it. What ``_config_gap`` names, a call past the schedule and a call whose arithmetic diffusers
    computes as not finite keep diffusers' own step."""
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    config = self.config
    if self.num_inference_steps is None or _config_gap_now(self):
        return _original(self, model_output, timestep, sample, generator, return_dict)
    if self.step_index is None:
        self._init_step_index(timestep)
    i = self.step_index
    coefficients = None
    if i < len(self.order_list):
        order = dpm_singlestep.call_order(self.order_list[i], self.model_outputs)
        values, _ = _sigma_tables(self, torch.device("cpu"))  # the sigmas as floats, made once per schedule
        coefficients = dpm_singlestep.singlestep_coefficients(values, i, order, config.prediction_type,
                                                              config.algorithm_type, config.solver_type)
    if coefficients is None:  # past the schedule (IndexError), or not finite there: diffusers' own step
        return _original(self, model_output, timestep, sample, generator, return_dict)
    earlier = [self.model_outputs[-j] for j in range(1, order)]
    noise = dpm_solver.sde_noise(config, model_output, generator)  # drawn at every call, as diffusers draws it
    prev, x0 = dpm_singlestep.singlestep_update(model_output, sample, self.sample, earlier, coefficients, noise)
    if order == 1:
        self.sample = sample
    dpm_solver.advance_multistep(self, x0)
    return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def _fused_edm_dpm_step(self, model_output, timestep, sample, generator=None, return_dict=True):
    """diffusers' EDMDPMSolverMultistepScheduler.step (Playground v2.5's) as our scheduler computes it
    (``schedulers.edm``): EDM's x0 and the DPM-Solver++ update in one pass, x0 kept in ``model_outputs`` as diffusers
    keeps it, the SDE noise drawn in the model output's dtype as diffusers draws it. A call past the schedule and a
    step whose arithmetic is not finite keep diffusers' own step."""
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    config = self.config
    if self.num_inference_steps is None or _config_gap_now(self):
        return _original(self, model_output, timestep, sample, generator, return_dict)
    if self.step_index is None:
        self._init_step_index(timestep)
    n, i = len(self.timesteps), self.step_index
    order = dpm_solver.solver_order_now(config, i, n, self.lower_order_nums)
    values, _ = _sigma_tables(self, torch.device("cpu"))  # the sigmas as floats, made once per schedule
    coefficients = edm.edm_solver_coefficients(values, i, order, config) if i < n else None
    if coefficients is None:
        return _original(self, model_output, timestep, sample, generator, return_dict)
    earlier = [self.model_outputs[-j] for j in range(1, order)]
    noise = dpm_solver.sde_noise(config, model_output, generator)
    prev, x0 = dpm_solver.solver_step(model_output, sample, earlier, coefficients, noise)
    dpm_solver.advance_multistep(self, x0)
    return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def _fused_edm_euler_step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                          s_noise=1.0, generator=None, return_dict=True, pred_original_sample=None):
    """diffusers' EDMEulerScheduler.step (CosXL's) as our scheduler computes it (``schedulers.edm``): the churn
    noise drawn as diffusers draws it, then one fused pass; prev in the model output's dtype, x0 in fp32. An integer
    timestep (diffusers raises), a call diffusers warns about (scale_model_input skipped) and a call past the
    schedule keep diffusers' own step."""
    from diffusers.schedulers.scheduling_edm_euler import EDMEulerSchedulerOutput

    args = (s_churn, s_tmin, s_tmax, s_noise, generator, return_dict, pred_original_sample)
    if (isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)) or not self.is_scale_input_called
            or _config_gap_now(self)):
        return _original(self, model_output, timestep, sample, *args)
    if self.step_index is None:
        self._init_step_index(timestep)
    values, _ = _sigma_tables(self, torch.device("cpu"))
    if self.step_index >= len(values) - 1:
        return _original(self, model_output, timestep, sample, *args)
    prev, x0 = edm.edm_euler_update(self, model_output, sample, values, self.step_index, s_churn, s_tmin, s_tmax,
                                    s_noise, generator, pred_original_sample)
    self._step_index += 1
    return EDMEulerSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


def _fused_pndm_step(self, model_output, timestep, sample, return_dict=True):
    """diffusers' PNDMScheduler.step as our scheduler computes it (``schedulers.pndm.pndm_update``): the Runge-Kutta
    warm-up steps unless ``skip_prk_steps``, then the linear multistep ones, each one fused pass, with ``ets``,
    ``counter``, ``cur_sample`` and ``cur_model_output`` kept as diffusers keeps them. A call diffusers rejects
    (before set_timesteps, or PLMS without the warm-up's outputs) is diffusers' own."""
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    config = self.config
    warming_up = not config.skip_prk_steps and self.counter < len(self.prk_timesteps)
    if (self.num_inference_steps is None or _config_gap_now(self)
            or (not config.skip_prk_steps and not warming_up and len(self.ets) < 3)):
        return _original(self, model_output, timestep, sample, return_dict)
    prev = pndm.pndm_update(self, model_output, sample, int(timestep))
    return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def _fused_unipc_step(self, model_output, timestep, sample, return_dict=True):
    """diffusers' UniPCMultistepScheduler.step as our scheduler computes it (``schedulers.unipc.unipc_update``): the
    corrector and the predictor each one fused pass, coefficients in float64 on the host, the state kept as diffusers
    keeps it. ``solver_p``, flow sigmas and thresholding keep diffusers' own step, and so does a step whose
    arithmetic diffusers computes as not finite (its image is NaN or inf there too)."""
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    if self.num_inference_steps is None or _config_gap_now(self) or self.solver_p is not None:
        return _original(self, model_output, timestep, sample, return_dict)
    if self.step_index is None:
        self._init_step_index(timestep)
    values, _ = _sigma_tables(self, torch.device("cpu"))  # the sigmas as floats, made once per schedule
    prev = unipc.unipc_update(self, model_output, timestep, sample, values, as_diffusers=True)
    if prev is None:
        return _original(self, model_output, timestep, sample, return_dict)
    return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def _fused_lcm_step(self, model_output, timestep, sample, generator=None, return_dict=True):
    """diffusers' LCMScheduler.step as our scheduler computes it (``schedulers.lcm.lcm_update``): x0, the boundary
    condition and the next step's noise in one fused pass, coefficients in float64 on the host, the noise drawn as
    diffusers draws it (none at the last step). This step's timestep is the schedule's at the step index (diffusers'
    own reading of it); a host timestep that is not, a step past the schedule, epsilon at a zero alpha (zero terminal
    SNR; diffusers' x0 is NaN) and thresholding keep diffusers' own step."""
    from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

    call = _consistency_call(self, timestep)
    if call is None:
        return _original(self, model_output, timestep, sample, generator, return_dict)
    prev, denoised = lcm.lcm_update(self, model_output, sample, *call, generator)
    self._step_index += 1
    return LCMSchedulerOutput(prev_sample=prev, denoised=denoised) if return_dict else (prev, denoised)


def _fused_tcd_step(self, model_output, timestep, sample, eta=0.3, generator=None, return_dict=True):
    """diffusers' TCDScheduler.step as our scheduler computes it (``schedulers.tcd.tcd_update``): x0, the noise, the
    re-noising to s and the step's fresh noise in one fused pass, the noise drawn as diffusers draws it. An eta
    outside [0, 1] (diffusers' assert), a host timestep that is not the schedule's, a step past the schedule and
    epsilon at a zero alpha keep diffusers' own step."""
    from diffusers.schedulers.scheduling_tcd import TCDSchedulerOutput

    good_eta = not isinstance(eta, bool) and isinstance(eta, (int, float)) and 0 <= eta <= 1
    call = _consistency_call(self, timestep) if good_eta else None
    if call is None:
        return _original(self, model_output, timestep, sample, eta, generator, return_dict)
    prev, noised = tcd.tcd_update(self, model_output, sample, *call, float(eta), generator)
    self._step_index += 1
    return TCDSchedulerOutput(prev_sample=prev, pred_noised_sample=noised) if return_dict else (prev, noised)


def _consistency_call(self, timestep):
    """(step index, timesteps, alphas as host lists) for an LCM or TCD call, or None for one diffusers' own step
    takes: no schedule yet, a config not mirrored, a step past the schedule, a host timestep that is not this step's
    (diffusers reads the schedule's), epsilon at a zero alpha (zero terminal SNR: x0 = x / 0, NaN there too)."""
    if self.num_inference_steps is None or _config_gap_now(self):
        return None
    if self.step_index is None:
        self._init_step_index(timestep)
    schedule, alphas = _host_lists(self, ("timesteps", "alphas_cumprod"))
    i = self.step_index
    on_host = not torch.is_tensor(timestep) or timestep.device.type == "cpu"
    if (i >= len(schedule) or (on_host and int(timestep) != schedule[i])
            or (self.config.prediction_type == "epsilon" and alphas[schedule[i]] == 0)):
        return None
    return i, schedule, alphas


def _host_lists(self, names):
    """The scheduler's tables ``names`` as host lists (floats in float64, ints as ints), made again whenever
    set_timesteps replaces one or it is changed in place (diffusers' add_noise moves alphas_cumprod to the sample's
    device): one device read per schedule, none per step."""
    tensors = [getattr(self, name) for name in names]
    cache = self.__dict__.setdefault(_HOST_LISTS, {})
    cached = cache.get(names)
    if cached is None or any(t is not old or t._version != version for t, (old, version) in zip(tensors, cached[0])):
        lists = [t.double().tolist() if t.is_floating_point() else t.tolist() for t in tensors]
        cached = cache[names] = ([(t, t._version) for t in tensors], lists)
    return cached[1]
