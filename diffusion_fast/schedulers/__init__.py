"""Schedulers with diffusers' config fields, defaults and numbers; their step arithmetic runs as one fused op."""
import warnings

from .._config import FrozenConfig
from .common import SchedulerOutput, randn_tensor, read_config
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .deis import DEISMultistepScheduler
from .dpm_singlestep import DPMSolverSinglestepScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .edm import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .flow_match_euler import FlowMatchEulerDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from .lcm import LCMScheduler, LCMSchedulerOutput
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler
from .tcd import TCDScheduler, TCDSchedulerOutput
from .unipc import UniPCMultistepScheduler

SCHEDULERS = {cls.__name__: cls for cls in (
    DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler,
    EDMDPMSolverMultistepScheduler, EDMEulerScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler,
    LCMScheduler, LMSDiscreteScheduler,
    PNDMScheduler, TCDScheduler, UniPCMultistepScheduler)}


def load_scheduler(folder_or_config, default="DDIMScheduler"):
    """Our scheduler for a diffusers scheduler folder/config, by its ``_class_name``.

    A class we don't implement (DPM++ SDE, SA-Solver, ...) has its config loaded into ``default`` with a warning,
    as diffusers' ``DDIMScheduler.from_config(pipe.scheduler.config)`` would.
    """
    config = folder_or_config if isinstance(folder_or_config, dict) else read_config(folder_or_config)
    name = config.get("_class_name", default)
    if name not in SCHEDULERS:
        warnings.warn(f"diffusion_fast: scheduler {name} is not implemented; using {default} with its config",
                      RuntimeWarning, stacklevel=2)
        name = default
    return SCHEDULERS[name].from_config(config)


__all__ = ["DDIMScheduler", "DDPMScheduler", "DEISMultistepScheduler", "DPMSolverMultistepScheduler",
           "DPMSolverSinglestepScheduler", "EDMDPMSolverMultistepScheduler", "EDMEulerScheduler",
           "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
           "HeunDiscreteScheduler",
           "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LCMScheduler", "LCMSchedulerOutput",
           "LMSDiscreteScheduler", "PNDMScheduler", "TCDScheduler", "TCDSchedulerOutput", "UniPCMultistepScheduler",
           "load_scheduler", "randn_tensor", "SchedulerOutput", "FrozenConfig", "SCHEDULERS"]
