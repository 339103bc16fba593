"""Fused ``step`` methods for diffusers' DDIM, Euler, Euler ancestral, Heun, DPM2, DPM2 ancestral, LMS, DPM-Solver++
multistep and single-step, EDM DPM-Solver++ and Euler, DEIS, PNDM, UniPC, LCM, TCD, DDPM and flow-matching Euler
(SD3's) schedulers, patched on the instance by ``accelerate``.

Each replacement computes what the scheduler's own ``step`` computes, as one fused op (``diffusion_fast.ops``),
drawing its noise from the generator exactly as diffusers does. Whatever it does not mirror (thresholding, learned
variances, a prediction type it does not know, a call diffusers would warn about or reject) goes to the scheduler's
own ``step``, so behaviour outside the fused cases is diffusers' own.

Which schedulers are fused, and where:

``DDIMScheduler``, ``EulerDiscreteScheduler`` (SDXL's default), ``EulerAncestralDiscreteScheduler``,
``HeunDiscreteScheduler``, ``KDPM2DiscreteScheduler``, ``KDPM2AncestralDiscreteScheduler``, ``LMSDiscreteScheduler``,
``DPMSolverMultistepScheduler``, ``DPMSolverSinglestepScheduler``, ``EDMDPMSolverMultistepScheduler`` (Playground
v2.5's), ``EDMEulerScheduler`` (CosXL's), ``DEISMultistepScheduler``, ``PNDMScheduler`` (SD1.5's default),
``UniPCMultistepScheduler``, ``LCMScheduler`` (LCM-LoRA's), ``TCDScheduler`` (TCD-LoRA's), ``DDPMScheduler`` and
``FlowMatchEulerDiscreteScheduler`` (SD3's), on the CPU (C++ ops) and on CUDA (Triton kernels; all but DDIM, Euler,
Euler ancestral and DDPM run ``linear_step``).

Those run the same update functions as our own schedulers, on the state diffusers' scheduler keeps: their fused
steps are in ``diffusers_solver_steps``. This module has the ones that call an op of their own (DDIM, Euler, Euler
ancestral, DDPM), the registry, and what every fused step shares (the config check, the fallback to the scheduler's
own step, the sigma tables).

A subclass that overrides ``step`` is left alone: its step is not the one we mirror.
"""
from __future__ import annotations

import torch

from . import ops
from .schedulers import dpm_solver
from .schedulers.common import randn_tensor

_ORIGINAL = "_diffusion_fast_original_step"
_SIGMAS = "_diffusion_fast_sigmas"
_CHECKED = "_diffusion_fast_checked_config"
_HOST_LISTS = "_diffusion_fast_host_lists"
_LMS_WEIGHTS = "_diffusion_fast_lms_weights"


def _original(self, *args, **kwargs):
    return getattr(self, _ORIGINAL)(*args, **kwargs)


def _fused_ddim_step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
                     variance_noise=None, return_dict=True):
    """diffusers' DDIMScheduler.step as one fused op; thresholding keeps diffusers' own step."""
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

    if _config_gap_now(self) or self.num_inference_steps is None:
        return _original(self, model_output, timestep, sample, eta, use_clipped_model_output, generator,
                         variance_noise, return_dict)
    prev_t = timestep - self.config.num_train_timesteps // self.num_inference_steps
    alpha_t = self.alphas_cumprod[timestep]
    alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
    if generator is not None and variance_noise is not None:
        raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                         " `variance_noise` stays `None`.")
    if eta > 0 and variance_noise is None:
        variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                      dtype=model_output.dtype)
    prev, x0 = ops.ddim_step(
        model_output, sample, alpha_t, alpha_prev, eta=eta, variance_noise=variance_noise if eta > 0 else None,
        prediction_type=self.config.prediction_type,
        clip_sample_range=self.config.clip_sample_range if self.config.clip_sample else None,
        use_clipped_model_output=use_clipped_model_output,
    )
    return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


def _fused_euler_step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                      s_noise=1.0, generator=None, return_dict=True):
    """diffusers' EulerDiscreteScheduler.step (churn included) as one fused op, in fp32 as diffusers computes it:
    prev_sample in model_output's dtype, pred_original_sample in fp32 (model_output itself for "sample")."""
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

    prediction = self.config.prediction_type
    if (isinstance(timestep, (int, torch.IntTensor, torch.LongTensor))  # diffusers raises its own error
            or not getattr(self, "is_scale_input_called", True)  # diffusers warns about it
            or _config_gap_now(self)):
        return _original(self, model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                         return_dict)
    if self.step_index is None:
        self._init_step_index(timestep)
    i = self.step_index
    values, table = _sigma_tables(self, sample.device)
    gamma = min(s_churn / (len(values) - 1), 2**0.5 - 1) if s_tmin <= values[i] <= s_tmax else 0.0
    noise = None
    if gamma > 0:
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
    as_sample = prediction in ("sample", "original_sample")
    prev, x0 = ops.euler_step(model_output.float(), sample.float(), table[i:i + 1], table[i + 1:i + 2], gamma=gamma,
                              s_noise=s_noise, noise=noise, prediction_type="sample" if as_sample else prediction)
    prev = prev.to(model_output.dtype)
    if as_sample:
        x0 = model_output
    self._step_index += 1
    return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


def _fused_euler_ancestral_step(self, model_output, timestep, sample, generator=None, return_dict=True):
    """diffusers' EulerAncestralDiscreteScheduler.step as one fused op, in fp32 as diffusers computes it: prev_sample
    in model_output's dtype, pred_original_sample in fp32. The step's noise is drawn as diffusers draws it."""
    from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput

    prediction = self.config.prediction_type
    if (isinstance(timestep, (int, torch.IntTensor, torch.LongTensor))  # diffusers raises its own error
            or not getattr(self, "is_scale_input_called", True)  # diffusers warns about it
            or _config_gap_now(self)):
        return _original(self, model_output, timestep, sample, generator, return_dict)
    if self.step_index is None:
        self._init_step_index(timestep)
    i = self.step_index
    _, table = _sigma_tables(self, sample.device)
    noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                         generator=generator)
    prev, x0 = ops.euler_ancestral_step(model_output.float(), sample.float(), table[i:i + 1], table[i + 1:i + 2],
                                        noise, prediction_type=prediction)
    prev = prev.to(model_output.dtype)
    self._step_index += 1
    if not return_dict:
        return prev, x0
    return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


def _sigma_tables(self, device):
    """A scheduler's sigmas as Python floats (for the churn window test) and as a float32 table on the
    sample's device (sliced for the op, so a step neither reads the device nor copies to it), made again whenever
    ``self.sigmas`` is replaced (set_timesteps) or changed in place."""
    sigmas = self.sigmas
    cached = getattr(self, _SIGMAS, None)
    if cached is None or cached[0] is not sigmas or cached[1] != sigmas._version or cached[2] != device:
        cached = (sigmas, sigmas._version, device, sigmas.tolist(), sigmas.to(device, torch.float32))
        setattr(self, _SIGMAS, cached)
    return cached[3], cached[4]


def _fused_ddpm_step(self, model_output, timestep, sample, generator=None, return_dict=True):
    """diffusers' DDPMScheduler.step for the fixed variances (fixed_small, fixed_small_log, fixed_large) as one fused
    op; thresholding, the learned variances and fixed_large_log (NaN in diffusers) keep diffusers' own step."""
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

    config = self.config
    if _config_gap_now(self):
        return _original(self, model_output, timestep, sample, generator, return_dict)
    t = timestep
    prev_t = self.previous_timestep(t)
    alpha_t = self.alphas_cumprod[t]
    alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
    std, noise = 0.0, None
    if t > 0:  # as diffusers: no noise (and no draw from the generator) at the last step
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
        variance = self._get_variance(t)  # diffusers' own numbers; fixed_small_log returns the std itself
        std = variance if config.variance_type == "fixed_small_log" else variance**0.5
    prev, x0 = ops.ddpm_step(model_output, sample, alpha_t, alpha_prev, std=std, variance_noise=noise,
                             prediction_type=config.prediction_type,
                             clip_sample_range=config.clip_sample_range if config.clip_sample else None)
    return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


def _fused_flow_match_step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                           s_noise=1.0, generator=None, per_token_timesteps=None, return_dict=True):
    """diffusers' FlowMatchEulerDiscreteScheduler.step (SD3's) as one fused ``linear_step``, in fp32 as diffusers
    computes it: ``sample + (sigma_next - sigma) * v``, or with stochastic sampling ``(1 - sigma_next) * x0 +
    sigma_next * noise``, the noise drawn as diffusers draws it; prev_sample in model_output's dtype. A timestep per
    token keeps diffusers' own step."""
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

    if (isinstance(timestep, (int, torch.IntTensor, torch.LongTensor))  # diffusers raises its own error
            or per_token_timesteps is not None or _config_gap_now(self)):
        return _original(self, model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                         per_token_timesteps, return_dict)
    if self.step_index is None:
        self._init_step_index(timestep)
    i = self.step_index
    sigmas, _ = _sigma_tables(self, sample.device)  # host floats (read once per schedule), exact float32 values
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if self.config.stochastic_sampling:  # (diffusers draws the noise in the upcast sample's fp32)
        sample = sample.to(torch.float32)
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev, _ = ops.linear_step(model_output, sample, noise, cx=1.0, cm=-sigma, p0=1.0 - sigma_next, px=0.0,
                                  pe=sigma_next)
    else:  # (the op computes in fp32 whatever the storage: no copy of the sample to fp32 first)
        prev, _ = ops.linear_step(model_output, sample, cx=1.0, cm=-sigma, p0=0.0, px=1.0, pm=sigma_next - sigma)
    self._step_index += 1
    return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def _config_gap(scheduler):
    """What in the scheduler's config its fused step does not mirror (every step would be the scheduler's own), or
    None. ``fuse_step`` leaves such a scheduler alone and says why; each fused step checks again, in case the config
    was changed afterwards (``register_to_config``)."""
    c = scheduler.config
    prediction = {"DDIMScheduler": ("epsilon", "v_prediction", "sample"),
                  "EulerDiscreteScheduler": ("epsilon", "v_prediction", "sample", "original_sample"),
                  "EulerAncestralDiscreteScheduler": ("epsilon", "v_prediction"),  # diffusers raises for "sample"
                  "HeunDiscreteScheduler": ("epsilon", "v_prediction", "sample"),
                  "KDPM2DiscreteScheduler": ("epsilon", "v_prediction"),  # diffusers raises for "sample"
                  "KDPM2AncestralDiscreteScheduler": ("epsilon", "v_prediction"),
                  "LMSDiscreteScheduler": ("epsilon", "v_prediction", "sample"),
                  "DPMSolverMultistepScheduler": ("epsilon", "v_prediction", "sample"),
                  "DPMSolverSinglestepScheduler": ("epsilon", "v_prediction", "sample"),
                  "EDMDPMSolverMultistepScheduler": ("epsilon", "v_prediction"),  # diffusers raises for "sample"
                  "EDMEulerScheduler": ("epsilon", "v_prediction"),
                  "DEISMultistepScheduler": ("epsilon", "v_prediction", "sample"),
                  "PNDMScheduler": ("epsilon", "v_prediction"),
                  "UniPCMultistepScheduler": ("epsilon", "v_prediction", "sample"),
                  "LCMScheduler": ("epsilon", "v_prediction", "sample"),
                  "TCDScheduler": ("epsilon", "v_prediction", "sample"),
                  "DDPMScheduler": ("epsilon", "v_prediction", "sample"),
                  "FlowMatchEulerDiscreteScheduler": (None,)}[_fused_class(scheduler).__name__]  # (velocity)
    predicts = getattr(c, "prediction_type", None)  # (a flow-matching scheduler's model predicts a velocity)
    variance = getattr(c, "variance_type", None)  # DDPM's and DPM-Solver's
    algorithm, solver = getattr(c, "algorithm_type", "dpmsolver++"), getattr(c, "solver_type", "midpoint")  # DPM's
    gaps = [
        (getattr(c, "thresholding", False), "thresholding"),
        (predicts not in prediction, f"prediction_type {predicts!r}"),
        (variance not in (None, "fixed_small", "fixed_small_log", "fixed_large"), f"variance_type {variance!r}"),
        (algorithm not in dpm_solver.ALGORITHMS + ("deis",), f"algorithm_type {algorithm!r}"),
        (solver not in ("midpoint", "heun", "bh1", "bh2", "logrho"), f"solver_type {solver!r}"),  # DPM, UniPC, DEIS
        (getattr(c, "use_flow_sigmas", False), "flow sigmas"),
        (getattr(scheduler, "solver_p", None) is not None, "solver_p: another scheduler as UniPC's predictor"),
        (hasattr(c, "sigma_data") and algorithm == "sde-dpmsolver++" and getattr(c, "solver_order", 2) == 3,
         "sde-dpmsolver++ of order 3 (diffusers' EDM solver has no such update)"),
    ]
    return next((why for gap, why in gaps if gap), None)


def _config_gap_now(scheduler):
    """``_config_gap`` as a fused step checks it: worked out again only when the config object was replaced since
    (``register_to_config`` makes a new one), so a step pays one identity test, not the whole check."""
    config = scheduler.config
    checked = getattr(scheduler, _CHECKED, None)
    if checked is None or checked[0] is not config:
        checked = (config, _config_gap(scheduler))
        setattr(scheduler, _CHECKED, checked)
    return checked[1]


def _fused_class(scheduler):
    return next(cls for cls, *_ in _fusable() if isinstance(scheduler, cls))


def _fusable():
    """[(diffusers scheduler class, its fused step)]."""
    from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                           DPMSolverSinglestepScheduler, EDMDPMSolverMultistepScheduler, EDMEulerScheduler,
                           EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                           HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler, LMSDiscreteScheduler,
                           PNDMScheduler, TCDScheduler, UniPCMultistepScheduler)

    from .diffusers_solver_steps import (_fused_deis_step, _fused_dpm_multistep_step, _fused_dpm_singlestep_step,
                                         _fused_edm_dpm_step, _fused_edm_euler_step, _fused_heun_step,
                                         _fused_kdpm2_ancestral_step, _fused_kdpm2_step, _fused_lcm_step,
                                         _fused_lms_step, _fused_pndm_step, _fused_tcd_step, _fused_unipc_step)

    return [(DDIMScheduler, _fused_ddim_step), (EulerDiscreteScheduler, _fused_euler_step),
            (EulerAncestralDiscreteScheduler, _fused_euler_ancestral_step), (HeunDiscreteScheduler, _fused_heun_step),
            (KDPM2DiscreteScheduler, _fused_kdpm2_step),
            (KDPM2AncestralDiscreteScheduler, _fused_kdpm2_ancestral_step),
            (LMSDiscreteScheduler, _fused_lms_step),
            (DPMSolverMultistepScheduler, _fused_dpm_multistep_step),
            (DPMSolverSinglestepScheduler, _fused_dpm_singlestep_step), (DEISMultistepScheduler, _fused_deis_step),
            (EDMDPMSolverMultistepScheduler, _fused_edm_dpm_step), (EDMEulerScheduler, _fused_edm_euler_step),
            (PNDMScheduler, _fused_pndm_step),
            (UniPCMultistepScheduler, _fused_unipc_step), (LCMScheduler, _fused_lcm_step),
            (TCDScheduler, _fused_tcd_step),
            (DDPMScheduler, _fused_ddpm_step), (FlowMatchEulerDiscreteScheduler, _fused_flow_match_step)]


def fuse_step(scheduler):
    """Patch ``scheduler.step`` on the instance with its fused step; returns None, or why it was left alone. A
    scheduler already fused stays as it is (fusing it twice would make the fused step its own fallback). Every fused
    step's op has a C++ kernel for the CPU and a Triton kernel for CUDA, so the device decides nothing here."""
    if _ORIGINAL in vars(scheduler):
        return None
    name = type(scheduler).__name__
    for cls, fused in _fusable():
        if not isinstance(scheduler, cls):
            continue
        if type(scheduler).step is not cls.step:
            return f"scheduler {name} (its own step overrides {cls.__name__}.step)"
        gap = _config_gap(scheduler)
        if gap:
            return f"scheduler {name} ({gap}: its own step)"
        setattr(scheduler, _ORIGINAL, scheduler.step)
        scheduler.step = fused.__get__(scheduler)
        return None
    names = ", ".join(cls.__name__ for cls, *_ in _fusable())
    return f"scheduler {name} (fused: {names})"


def unfuse_step(scheduler):
    """Undo ``fuse_step``."""
    del scheduler.step  # the instance attribute shadowed the class method
    delattr(scheduler, _ORIGINAL)
    for cache in (_SIGMAS, _CHECKED, _HOST_LISTS, _LMS_WEIGHTS):
        if hasattr(scheduler, cache):
            delattr(scheduler, cache)
