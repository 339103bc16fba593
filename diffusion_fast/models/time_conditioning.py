"""What a UNet or ControlNet adds to its time embedding, and the timestep as a batch: the timestep's sinusoidal
embedding, an LCM-distilled UNet's guidance-scale embedding, a class embedding (the x4 upscaler's noise level) and
SDXL's added text-time embedding. Nothing here reads a value on the host, so the forward can be captured in a CUDA
graph."""
from __future__ import annotations

import torch

from .layers import timestep_embedding


def broadcast_timestep(timestep, sample: torch.Tensor) -> torch.Tensor:
    """An int/float, a 0-d tensor or a (B,) tensor as a (B,) tensor on sample's device, without a host sync."""
    batch = sample.shape[0]
    if torch.is_tensor(timestep):
        if timestep.dtype == torch.bool or timestep.is_complex():
            raise TypeError(f"timestep must be an int or float tensor, got dtype {timestep.dtype}")
        if timestep.numel() not in (1, batch) or timestep.dim() > 1:
            raise ValueError(f"timestep must be a number, a 0-d tensor or a ({batch},) tensor, "
                             f"got shape {tuple(timestep.shape)}")
        t = timestep
    elif isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        t = torch.tensor(timestep, dtype=torch.int64 if isinstance(timestep, int) else torch.float32)
    else:
        raise TypeError(f"timestep must be an int, a float or a tensor, got {type(timestep).__name__}")
    # .to() of a CPU tensor is an async-safe copy, and expand is a view: no value is read on the host.
    return t.to(sample.device).reshape(-1).expand(batch)


def _checked_timestep_cond(model, timestep_cond, sample):
    """An LCM-distilled UNet's guidance-scale embedding, checked against its ``cond_proj`` and the batch."""
    if timestep_cond is None:
        return None
    dim = getattr(model.config, "time_cond_proj_dim", None)
    if dim is None:
        raise ValueError(f"timestep_cond: this {type(model).__name__} takes none (its config has no "
                         "time_cond_proj_dim: it is not an LCM-distilled model)")
    if not torch.is_tensor(timestep_cond) or tuple(timestep_cond.shape) != (sample.shape[0], dim):
        got = tuple(timestep_cond.shape) if torch.is_tensor(timestep_cond) else type(timestep_cond).__name__
        raise ValueError(f"timestep_cond must be a ({sample.shape[0]}, {dim}) tensor (the batch's guidance-scale "
                         f"embeddings, time_cond_proj_dim wide), got {got}")
    return timestep_cond.to(sample.dtype)


def _class_embedding(model, class_labels, sample):
    """A UNet's class embedding of ``class_labels`` (an int or (B,) integer tensor: the x4 upscaler's noise level),
    or None for a UNet without one (given labels are then ignored, as diffusers ignores them)."""
    table = getattr(model, "class_embedding", None)
    if table is None:
        return None
    if class_labels is None:
        raise ValueError(f"class_labels: this UNet has a class embedding (num_class_embeds="
                         f"{model.config.num_class_embeds}): pass its labels (an upscaler's noise level per sample)")
    if isinstance(class_labels, int) and not isinstance(class_labels, bool):
        class_labels = torch.tensor(class_labels)
    if not torch.is_tensor(class_labels) or class_labels.is_floating_point() or class_labels.is_complex() or (
            class_labels.dtype == torch.bool) or class_labels.numel() not in (1, sample.shape[0]) or class_labels.dim() > 1:
        got = f"{class_labels.dtype} of shape {tuple(class_labels.shape)}" if torch.is_tensor(class_labels) else \
            type(class_labels).__name__
        raise ValueError(f"class_labels must be an int or an integer ({sample.shape[0]},) tensor, got {got}")
    # (as the timestep: moved and broadcast without reading a value on the host)
    return table(class_labels.to(sample.device).reshape(-1).expand(sample.shape[0])).to(sample.dtype)


def embed_time(model, sample, timestep, added_cond_kwargs, timestep_cond=None, class_labels=None):
    """A UNet's or ControlNet's time embedding: the timestep's (plus an LCM-distilled UNet's guidance-scale
    embedding ``timestep_cond``, projected), plus a class embedding of ``class_labels`` where the UNet has one, plus
    SDXL's added text-time embedding."""
    c = model.config
    t = broadcast_timestep(timestep, sample)
    emb = model.time_embedding(timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
                               .to(sample.dtype), _checked_timestep_cond(model, timestep_cond, sample))
    class_emb = _class_embedding(model, class_labels, sample)
    if class_emb is not None:
        emb = emb + class_emb
    if c.addition_embed_type == "text_time":
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError("added_cond_kwargs must hold 'text_embeds' and 'time_ids' (addition_embed_type='text_time')")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_embeds = timestep_embedding(time_ids.flatten(), c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
        add = torch.cat([text_embeds, time_embeds.reshape(text_embeds.shape[0], -1)], dim=-1).to(emb.dtype)
        emb = emb + model.add_embedding(add)
    return emb
