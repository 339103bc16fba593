"""Our processors for diffusers' SD3 joint attention, which ``accelerate`` sets (``diffusers_patch``): the plain one
(JointAttnProcessor2_0) and the IP-Adapter one (SD3IPAdapterJointAttnProcessor2_0), the attention itself on
``diffusion_fast.ops`` and everything else as diffusers computes it.
"""
from __future__ import annotations

import functools

import torch

from . import ops


def _joint(attn, hidden_states, encoder_hidden_states):
    """The joint attention's output before the output projections, (B, Li + Lt, H * D), and the image stream's
    queries and keys before the q/k norms (B, Li, H, D) and its values, which an IP-Adapter attends with."""
    batch = hidden_states.shape[0]
    head_dim = attn.to_k.out_features // attn.heads

    def heads(x, projections):
        return [p(x).view(batch, -1, attn.heads, head_dim) for p in projections]

    def normed(t, norm):
        return t if norm is None else norm(t)

    q_raw, k_raw, v = heads(hidden_states, (attn.to_q, attn.to_k, attn.to_v))
    q, k = normed(q_raw, attn.norm_q), normed(k_raw, attn.norm_k)
    if encoder_hidden_states is not None:
        cq, ck, cv = heads(encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        cq, ck = normed(cq, attn.norm_added_q), normed(ck, attn.norm_added_k)
        q, k, v_all = torch.cat([q, cq], dim=1), torch.cat([k, ck], dim=1), torch.cat([v, cv], dim=1)
    else:
        v_all = v
    out = ops._attention(q.transpose(1, 2), k.transpose(1, 2), v_all.transpose(1, 2), attn.scale)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype), (q_raw, k_raw, v)


def _finish(attn, out, length, encoder_hidden_states, image=None):
    """The output projections of the image stream (``image``: its attention output, if changed) and the text's."""
    image = attn.to_out[1](attn.to_out[0](out[:, :length] if image is None else image))
    if encoder_hidden_states is None:
        return image
    text = out[:, length:]
    return image, (text if attn.context_pre_only else attn.to_add_out(text))


class DiffusionFastJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0 (SD3's: image and text tokens in one attention, each stream with its own
    projections and q/k norms) with the attention itself on ``diffusion_fast.ops.attention``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            return attn._diffusion_fast_original(attn, hidden_states, encoder_hidden_states, attention_mask)
        out, _ = _joint(attn, hidden_states, encoder_hidden_states)
        return _finish(attn, out, hidden_states.shape[1], encoder_hidden_states)


@functools.lru_cache(maxsize=None)
def ip_processor_class():
    """Our processor in place of diffusers' SD3IPAdapterJointAttnProcessor2_0: a subclass of it holding the same weight
    modules and scale (so diffusers' set_ip_adapter_scale, is_ip_adapter_active and its state dict still see them),
    both attentions on our op."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0

    class DiffusionFastSD3IPJointAttnProcessor(SD3IPAdapterJointAttnProcessor2_0):
        def __init__(self, original):
            torch.nn.Module.__init__(self)
            for name, module in original.named_children():  # (the same modules: norm_ip, to_k_ip, ..., norm_ip_k)
                setattr(self, name, module)
            self.scale = original.scale

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     ip_hidden_states=None, temb=None):
            if attention_mask is not None:
                return attn._diffusion_fast_original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                                     ip_hidden_states, temb)
            out, (q, k, v) = _joint(attn, hidden_states, encoder_hidden_states)
            length, image = hidden_states.shape[1], None
            if self.scale != 0 and ip_hidden_states is not None:  # the image queries over their keys and the image's
                batch, _, heads, head_dim = q.shape
                tokens = self.norm_ip(ip_hidden_states, temb=temb)
                ip_k = self.norm_ip_k(self.to_k_ip(tokens).view(batch, -1, heads, head_dim))
                ip_v = self.to_v_ip(tokens).view(batch, -1, heads, head_dim)
                keys, values = torch.cat([self.norm_k(k), ip_k], dim=1), torch.cat([v, ip_v], dim=1)
                ip_out = ops._attention(self.norm_q(q).transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                        head_dim**-0.5)
                ip_out = ip_out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(q.dtype)
                image = out[:, :length] + ip_out * self.scale
            return _finish(attn, out, length, encoder_hidden_states, image)

    return DiffusionFastSD3IPJointAttnProcessor
