"""Drop-in acceleration of a diffusers Stable Diffusion pipeline (SD 1.x/2.x, SDXL and their variants; SD3 and 3.5),
in place, with ``restore`` to undo it.

``accelerate(pipe)`` patches instances, never classes, so other pipelines in the process are untouched (the pipeline
itself gets a subclass of its own class, with the same name, only to catch a scheduler assigned later):

- every ``ResnetBlock2D`` (UNet, VAE, ControlNets) runs its two GroupNorm->SiLU pairs as our fused op (blocks with
  settings we do not mirror — scale_shift time norm, resampling inside the resnet, a non-SiLU activation — are left
  alone);
- the UNet's and VAE's ``conv_norm_out`` + ``conv_act`` become one fused op;
- every ``Attention`` module without features we do not mirror (masks, added KV projections, spatial norm, q/k norms,
  custom processors) gets our processor (SD3's joint attention, image and text tokens at once, and its IP-Adapter
  one: their own, in ``diffusers_joint_attention``), which calls
  ``diffusion_fast.ops.attention`` with (B, H, L, D) views. With
  ``attention="auto"`` that happens on CUDA only: on the CPU our attention is the same SDPA call diffusers' own
  processor makes, so patching it would add only Python overhead (``attention=True`` patches it anyway);
- the scheduler's ``step`` becomes our fused step for DDIM, Euler, Euler ancestral, DPM-Solver++ (orders 1-3, ODE
  and SDE), PNDM, UniPC, DDPM, flow-matching Euler and more, noise drawn exactly as diffusers draws it; see
  ``diffusers_schedulers`` for what each mirrors. A scheduler assigned to the pipeline afterwards (``pipe.scheduler = X.from_config(...)``, the usual
  way to change samplers) is fused at the assignment, or left alone and listed;
- on CUDA (``cuda_graph="auto"``), the UNet's (SD3's transformer's) and each ControlNet's forward are replayed from
  CUDA graphs, one per input signature, every tensor argument a graph input (SDXL's ``added_cond_kwargs``, ControlNet
  residuals); see ``model_graphs``;
- with ``channels_last="auto"``, the UNet, VAE and ControlNet weights go to channels_last on the CPU and on CUDA,
  where it measured faster (on the H200, SD1.5 fp16: 2.94x diffusers eager against 2.29x in NCHW); NCHW elsewhere.
  restore converts them back.

No compile step: any resolution that is a multiple of 8 works at once. What it leaves alone is logged in one line and
kept in ``pipe._diffusion_fast_report``.
"""
from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

from . import _validate, ops
from .diffusers_joint_attention import DiffusionFastJointAttnProcessor, ip_processor_class
from .diffusers_schedulers import fuse_step, unfuse_step
from .model_graphs import graph_forward
from .pipeline_graphs import wants_channels_last

log = logging.getLogger("diffusion_fast")
_STATE = "_diffusion_fast_state"
_WATCHING = {}  # a pipeline class -> its subclass that fuses a scheduler assigned after accelerate


def _fused_resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """diffusers' ResnetBlock2D.forward (time_embedding_norm="default", SiLU) with fused GroupNorm+SiLU."""
    h = ops._group_norm_silu(input_tensor, self.norm1.num_groups, self.norm1.weight, self.norm1.bias, self.norm1.eps)
    h = self.conv1(h)
    if self.time_emb_proj is not None and temb is not None:
        t = temb if self.skip_time_act else F.silu(temb)
        h = h + self.time_emb_proj(t)[:, :, None, None]
    h = ops._group_norm_silu(h, self.norm2.num_groups, self.norm2.weight, self.norm2.bias, self.norm2.eps)
    h = self.conv2(self.dropout(h))
    x = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
    return (x + h) / self.output_scale_factor


def _hooked(module) -> bool:
    """Whether a hook of Hugging Face accelerate (CPU offload) or of diffusers (group offloading, layerwise casting)
    acts when this module is called: it may load or cast the module's weights at call time."""
    return hasattr(module, "_hf_hook") or hasattr(module, "_diffusers_hook")


def _only_forward(module) -> bool:
    """Whether calling the module does nothing but its class's forward, so a fused op may read its weights and skip
    the call: no offload or casting hook, no torch forward hook, no forward replaced on the instance."""
    return (not _hooked(module) and not module._forward_hooks and not module._forward_pre_hooks
            and "forward" not in vars(module))


def _hooks_inside(model) -> bool:
    """Whether offload or casting hooks act on the model's submodules (sequential CPU offload, leaf-level group
    offloading): weights then live elsewhere (meta, CPU) until each submodule's call. A hook on the model itself
    (enable_model_cpu_offload) moves all of it before its forward, which leaves nothing to work around."""
    return any(_hooked(m) for m in model.modules() if m is not model)


def _resnet_supported(block):
    # "group" without a time embedding (the VAE decoder's resnets) computes exactly what "default" does
    time_norm_ok = block.time_embedding_norm == "default" or (
        block.time_embedding_norm == "group" and block.time_emb_proj is None)
    return (time_norm_ok and block.upsample is None and block.downsample is None
            and isinstance(block.nonlinearity, torch.nn.SiLU) and isinstance(block.norm1, torch.nn.GroupNorm)
            and isinstance(block.norm2, torch.nn.GroupNorm) and block.norm1.affine and block.norm2.affine)


class DiffusionFastAttnProcessor:
    """diffusers' AttnProcessor2_0 with the attention itself on ``diffusion_fast.ops.attention``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if attention_mask is not None:  # masks are not supported by our kernel: the same math, unfused
            return attn._diffusion_fast_original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = ops._attention(q, k, v, attn.scale)  # the module's own scale (1/sqrt(D) unless scale_qk=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _processor_for(attn):
    """Our processor for ``attn``, or None where its processor or features are not mirrored."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0, SD3IPAdapterJointAttnProcessor2_0

    if type(attn.processor) is JointAttnProcessor2_0 and attn.spatial_norm is None:
        return DiffusionFastJointAttnProcessor()
    if type(attn.processor) is SD3IPAdapterJointAttnProcessor2_0 and attn.spatial_norm is None:
        return ip_processor_class()(attn.processor)  # (the same weights; diffusers' scale setter still finds it)
    return DiffusionFastAttnProcessor() if _attention_supported(attn) else None


def _attention_supported(attn):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return (type(attn.processor) in (AttnProcessor, AttnProcessor2_0) and attn.spatial_norm is None
            and getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None
            and getattr(attn, "add_k_proj", None) is None and not getattr(attn, "is_cross_attention_added", False))


def _fuse_norm_out(module, report):
    """conv_norm_out + conv_act (SiLU) of a UNet/VAE encoder/decoder -> one fused op (conv_act becomes Identity)."""
    norm, act = getattr(module, "conv_norm_out", None), getattr(module, "conv_act", None)
    if norm is None or act is None:
        return
    if not isinstance(norm, torch.nn.GroupNorm) or not isinstance(act, torch.nn.SiLU):
        report["skipped"].append(f"{type(module).__name__}.conv_norm_out ({type(norm).__name__}, {type(act).__name__})")
        return
    if not (_only_forward(norm) and _only_forward(act)):
        report["skipped"].append(f"{type(module).__name__}.conv_norm_out (hooks on it, e.g. sequential CPU offload)")
        return

    def fused(self, x):
        return ops._group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)

    module._diffusion_fast_act = act
    norm.forward = types.MethodType(fused, norm)
    module.conv_act = torch.nn.Identity()
    report["norm_out"] += 1


def accelerate(pipe, *, group_norm_silu=True, attention="auto", scheduler=True, cuda_graph="auto",
               channels_last="auto"):
    """Patch a diffusers StableDiffusion(XL)(3)Pipeline in place to run on diffusion_fast's ops; returns ``pipe``.

    Accelerate after moving the pipeline to its device (or after ``enable_model_cpu_offload()``): ``"auto"`` settings
    (attention, CUDA graphs, channels_last) are decided for the device the UNet runs on then.
    """
    if not (hasattr(pipe, "vae") and hasattr(pipe, "scheduler") and _denoiser(pipe)[1] is not None):
        raise TypeError(f"pipe must be a diffusers Stable Diffusion pipeline (with a unet or an SD3 transformer, vae "
                        f"and scheduler), got {type(pipe).__name__}")
    for name, value in (("attention", attention), ("cuda_graph", cuda_graph), ("channels_last", channels_last)):
        _validate.auto_or_bool(name, value)
    if getattr(pipe, _STATE, None) is not None:
        return pipe  # already accelerated: idempotent
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    report = {"resnets": 0, "norm_out": 0, "attention": 0, "scheduler": 0, "cuda_graph": 0, "channels_last": 0,
              "skipped": []}
    device = _execution_device(pipe)
    on_cuda = device.type == "cuda"
    if attention == "auto" and not on_cuda:
        attention = False
        report["skipped"].append(
            "attention (on CPU ours is the same SDPA call as diffusers'; attention=True patches it)")
    state = {"resnets": [], "attention": [], "norm_out": [], "schedulers": [], "graphed": [],
             "channels_last": [], "class": type(pipe)}
    if wants_channels_last(channels_last, device):
        for model in (*_unet(pipe), pipe.vae, *_controlnets(pipe)):  # (not SD3's transformer: one conv)
            if _hooks_inside(model):
                report["skipped"].append(f"channels_last for {type(model).__name__} (offload hooks hold its weights)")
                continue
            convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
            if convs and not convs[0].is_contiguous(memory_format=torch.channels_last):  # a user's choice stands
                model.to(memory_format=torch.channels_last)
                state["channels_last"].append(model)
        report["channels_last"] = len(state["channels_last"])
    models = [_denoiser(pipe), ("vae", pipe.vae)] + [(f"controlnet{i or ''}", net)
                                                   for i, net in enumerate(_controlnets(pipe))]
    for model_name, model in models:
        for name, module in model.named_modules():
            if group_norm_silu and isinstance(module, ResnetBlock2D):
                if not (_only_forward(module) and _only_forward(module.norm1) and _only_forward(module.norm2)):
                    report["skipped"].append(f"{model_name}.{name} (hooks on the resnet or its norms, e.g. "
                                             "sequential CPU offload loading their weights at call time)")
                elif _resnet_supported(module):
                    module.forward = types.MethodType(_fused_resnet_forward, module)
                    state["resnets"].append(module)
                    report["resnets"] += 1
                else:
                    report["skipped"].append(f"{model_name}.{name} (resnet settings not mirrored)")
            if attention and isinstance(module, Attention):
                processor = _processor_for(module)
                if processor is not None:
                    module._diffusion_fast_original = module.processor
                    module.set_processor(processor)
                    state["attention"].append(module)
                    report["attention"] += 1
                else:
                    processor = type(module.processor).__name__
                    report["skipped"].append(f"{model_name}.{name} (attention processor {processor})")
        if group_norm_silu:
            for owner in (model, getattr(model, "encoder", None), getattr(model, "decoder", None)):
                if owner is not None and hasattr(owner, "conv_norm_out"):
                    before = report["norm_out"]
                    _fuse_norm_out(owner, report)
                    if report["norm_out"] > before:
                        state["norm_out"].append(owner)
    if scheduler:
        _fuse_scheduler(pipe.scheduler, state, report)
    if cuda_graph is True and not on_cuda:
        raise ValueError("cuda_graph=True needs the pipeline on a CUDA device (pipe.to('cuda') first)")
    if cuda_graph and on_cuda:
        state["graphed"] = _graph_models(pipe, report)
        report["cuda_graph"] = len(state["graphed"])
    setattr(pipe, _STATE, state)
    pipe._diffusion_fast_report = report
    if scheduler:
        pipe.__class__ = _watching_class(type(pipe))
    log.info("diffusion_fast.accelerate: %d resnets, %d norm_out, %d attention, scheduler %s, CUDA graphs for %d "
             "models, channels_last %d models; left alone: %s", report["resnets"], report["norm_out"],
             report["attention"], type(pipe.scheduler).__name__ if report["scheduler"] else "not fused", report["cuda_graph"], report["channels_last"],
             "; ".join(report["skipped"]) or "nothing")
    return pipe


def _fuse_scheduler(scheduler, state, report):
    """Fuse ``scheduler``'s step (kept for restore), or list why it is left alone; report["scheduler"] says whether
    the pipeline's current scheduler is fused."""
    left_alone = fuse_step(scheduler)
    if left_alone is None and not any(s is scheduler for s in state["schedulers"]):
        state["schedulers"].append(scheduler)
    report["skipped"] = [why for why in report["skipped"] if not why.startswith("scheduler ")]  # the earlier one's
    if left_alone is not None:
        report["skipped"].append(left_alone)
    report["scheduler"] = int(left_alone is None)
    return left_alone


def _watching_class(cls):
    """A subclass of the pipeline's class (same name, module and qualified name, so ``save_pretrained`` and reprs
    are unchanged) whose ``__setattr__`` fuses a scheduler assigned after ``accelerate``; ``restore`` gives the
    pipeline its own class back. One per pipeline class."""
    if cls not in _WATCHING:
        def __setattr__(self, name, value):
            cls.__setattr__(self, name, value)  # diffusers' own bookkeeping (the pipeline config) first
            state = getattr(self, _STATE, None)
            if name == "scheduler" and state is not None:
                left_alone = _fuse_scheduler(value, state, self._diffusion_fast_report)
                log.info("diffusion_fast: the scheduler assigned after accelerate, %s, is %s", type(value).__name__,
                         "fused" if left_alone is None else f"left alone: {left_alone}")

        _WATCHING[cls] = type(cls.__name__, (cls,), {"__setattr__": __setattr__, "__module__": cls.__module__,
                                                     "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _WATCHING[cls]


def _denoiser(pipe):
    """(its name, the model that denoises): the UNet, or SD3's transformer (None where the pipeline has neither)."""
    unet = getattr(pipe, "unet", None)
    return ("unet", unet) if unet is not None else ("transformer", getattr(pipe, "transformer", None))


def _unet(pipe):
    """[the UNet], or [] for a pipeline without one (SD3)."""
    unet = getattr(pipe, "unet", None)
    return [unet] if unet is not None else []


def _execution_device(pipe) -> torch.device:
    """Where the UNet (or transformer) runs: diffusers' ``_execution_device`` sees through CPU offload hooks, which keep the UNet on
    the CPU between calls."""
    try:
        device = pipe._execution_device
    except (AttributeError, RuntimeError, ValueError):  # not a DiffusionPipeline, or hooks it cannot read
        device = None
    return torch.device(device) if device is not None else _denoiser(pipe)[1].device


def _graph_models(pipe, report):
    """Graph the UNet's (or SD3 transformer's) call and each ControlNet's (one per net of a MultiControlNetModel),
    except models with hooks
    that act during the call (offload or casting hooks on submodules move or cast weights; diffusers' caching hooks
    choose per step what to compute, which a replay would freeze); returns [(model, its instance forward or None)]
    for restore: a model-level offload hook is an instance forward, which the graph wraps and restore puts back."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    def unet_output(out):
        return UNet2DConditionOutput(sample=out[0])

    def transformer_output(out):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out[0])

    def controlnet_output(out):
        try:
            from diffusers.models.controlnets.controlnet import ControlNetOutput
        except ImportError:  # diffusers < 0.31
            from diffusers.models.controlnet import ControlNetOutput
        return ControlNetOutput(down_block_res_samples=out[0], mid_block_res_sample=out[1])

    def sd3_controlnet_output(out):  # (an SD3ControlNetModel's: one list of per-block residuals)
        from diffusers.models.controlnets.controlnet_sd3 import SD3ControlNetOutput

        return SD3ControlNetOutput(controlnet_block_samples=out[0])

    graphed = []
    name, denoiser = _denoiser(pipe)
    first = [(denoiser, unet_output if name == "unet" else transformer_output)]
    nets = [(net, sd3_controlnet_output if type(net).__name__ == "SD3ControlNetModel" else controlnet_output)
            for net in _controlnets(pipe)]
    for model, make_output in first + nets:
        if _hooks_inside(model) or hasattr(model, "_diffusers_hook"):  # diffusers' caching hooks decide per step
            report["skipped"].append(f"CUDA graph for {type(model).__name__} (hooks act during each call: offload, "
                                     "casting or step caching)")
            continue
        previous = vars(model).get("forward")
        graph_forward(model, make_output)
        graphed.append((model, previous))
    return graphed


def _controlnets(pipe):
    """The pipeline's ControlNetModels: its ``controlnet`` itself, or the nets of a MultiControlNetModel."""
    controlnet = getattr(pipe, "controlnet", None)
    if not isinstance(controlnet, torch.nn.Module):
        return []
    nets = getattr(controlnet, "nets", None)
    return list(nets) if isinstance(nets, torch.nn.ModuleList) else [controlnet]


def restore(pipe):
    """Undo ``accelerate(pipe)`` exactly; a no-op on a pipeline that is not accelerated."""
    state = getattr(pipe, _STATE, None)
    if state is None:
        return pipe
    for module in state["resnets"]:
        del module.forward  # the instance attribute shadowed the class method
    for module in state["attention"]:
        module.set_processor(module._diffusion_fast_original)
        del module._diffusion_fast_original
    for owner in state["norm_out"]:
        del owner.conv_norm_out.forward
        owner.conv_act = owner._diffusion_fast_act
        del owner._diffusion_fast_act
    pipe.__class__ = state["class"]  # first: no assignment below is watched
    for scheduler in state["schedulers"]:
        unfuse_step(scheduler)
    for model in state["channels_last"]:
        model.to(memory_format=torch.contiguous_format)
    for model, previous in state["graphed"]:
        if previous is None:
            del model.forward
        else:
            model.forward = previous  # a model-level offload hook's forward, which the graph wrapped
    setattr(pipe, _STATE, None)
    pipe._diffusion_fast_report = None
    return pipe
