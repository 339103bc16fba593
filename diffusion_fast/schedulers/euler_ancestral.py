"""Euler ancestral sampling with diffusers' EulerAncestralDiscreteScheduler semantics.

Its schedule is Euler's with the options diffusers' ancestral scheduler does not have fixed (sigmas interpolated
linearly, no Karras sigmas, a final sigma of zero, discrete timesteps), so it reuses ``EulerDiscreteScheduler``'s
tables, step index and noise functions. Each step is the Euler step down to sigma_down plus fresh noise times
sigma_up (sigma_up^2 + sigma_down^2 = sigma_next^2), one fused op computed in fp32 as diffusers does, the noise
drawn as diffusers draws it. The sigmas come from a device table sliced by the step index: no host read.
"""
from __future__ import annotations

from .. import ops
from .._config import FrozenConfig
from .common import SchedulerOutput, check_step_inputs, randn_tensor
from .euler import EulerDiscreteScheduler

# Euler's schedule options, at the values diffusers' ancestral scheduler implies (it has no such fields)
FIXED_SCHEDULE = dict(interpolation_type="linear", use_karras_sigmas=False, sigma_min=None, sigma_max=None,
                      timestep_type="discrete", final_sigmas_type="zero")


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    defaults = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
    )
    unsupported = {}

    def __init__(self, **kwargs):
        prediction = kwargs.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):  # diffusers' step raises NotImplementedError for "sample"
            raise ValueError(f"prediction_type must be one of ('epsilon', 'v_prediction'), got {prediction!r}")
        super().__init__(**kwargs)

    def _schedule_config(self):
        return FrozenConfig(dict(self.config, **FIXED_SCHEDULE))

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        check_step_inputs(model_output, sample)
        i = self._next_index(timestep)
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                             dtype=model_output.dtype)
        sigmas = self._table("sigmas", sample.device)  # sliced, not read: no host sync
        # As diffusers: the sample is upcast to fp32, x0 stays fp32, prev_sample takes model_output's dtype.
        prev, x0 = ops.euler_ancestral_step(model_output.float(), sample.float(), sigmas[i:i + 1],
                                            sigmas[i + 1:i + 2], noise, prediction_type=self.config.prediction_type)
        prev = prev.to(model_output.dtype)
        self._step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)
