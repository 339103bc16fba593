"""Our Stable Diffusion 3 / 3.5 pipeline: three text encoders, the MMDiT transformer, flow-matching Euler, the VAE.

Same seed and weights give the same image as diffusers' StableDiffusion3Pipeline: the prompt through both CLIP
encoders (penultimate hidden states side by side, zero-padded to T5's width, pooled outputs concatenated) and T5
(its hidden states after CLIP's tokens; zeros where the folder has no T5), the noise drawn as diffusers draws it,
classifier-free guidance above scale 1, SD3.5's skip-layer guidance, and the latents decoded after un-scaling and
un-shifting; LoRAs (diffusers' format, on the transformer and the CLIP encoders) at a call's
``joint_attention_kwargs={"scale": s}``. What differs is how it runs: the attention of every block is our
flash-attention op over the joint image + text sequence, the scheduler's update is one fused op whose coefficients
come from a host copy of the sigmas (the loop never waits on the device), LoRAs are merged into the weights (nothing
extra per step), and on CUDA the transformer call is captured once per input shape as a CUDA graph and replayed
every step (``cuda_graph``).
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ._backend import current_backend
from .cuda_graph import GraphedCallable, ModuleState
from .lora import LoraLoaderMixin, lora_call_scale
from .pipeline_common import CallState, StableDiffusionPipelineOutput, auto_or_bool_setting, postprocess
from .pipeline_folder import ComponentLoader, check_model_config, read_model_index, resolve_dtype
from .pipeline_sd3_ip_adapter import SD3IPAdapterMixin
from .pipeline_sd3_text import SD3TextEncoding
from .schedulers import FlowMatchEulerDiscreteScheduler
from .schedulers.common import randn_tensor


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """The dynamic shift's exponent mu for an image of ``image_seq_len`` tokens (diffusers' calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def text_arguments(call):
    """(the prompts, the given embeddings) among a pipeline call's arguments ``call`` (its ``locals()``), as
    ``_prepare_text`` takes them."""
    prompts = ("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3")
    given = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return {k: call[k] for k in prompts}, {k: call[k] for k in given}


class StableDiffusion3Pipeline(SD3TextEncoding, LoraLoaderMixin, SD3IPAdapterMixin, CallState):
    _callback_tensor_inputs = ("latents", "prompt_embeds", "pooled_prompt_embeds")  # diffusers' names
    _component_names = ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                        "tokenizer_2", "text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor",
                        "cuda_graph", "channels_last")  # (from_pipe)

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3=None, tokenizer_3=None, *, image_encoder=None, feature_extractor=None,
                 cuda_graph="auto", channels_last="auto"):
        check_model_config("transformer", transformer, "joint_attention_dim", "an SD3Transformer2DModel")
        for name, encoder in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
            check_model_config(name, encoder, "projection_dim", "a transformers CLIPTextModelWithProjection")
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_3 and tokenizer_3 (T5): give both or neither")
        pooled = text_encoder.config.projection_dim + text_encoder_2.config.projection_dim
        if pooled != transformer.config.pooled_projection_dim:
            raise ValueError(f"the CLIP encoders' projections ({pooled} wide together) do not fit transformer "
                             f"(pooled_projection_dim={transformer.config.pooled_projection_dim})")
        if text_encoder_3 is not None and text_encoder_3.config.d_model != transformer.config.joint_attention_dim:
            raise ValueError(f"text_encoder_3 (d_model={text_encoder_3.config.d_model}) does not fit transformer "
                             f"(joint_attention_dim={transformer.config.joint_attention_dim})")
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise TypeError(f"scheduler must be a diffusion_fast FlowMatchEulerDiscreteScheduler (SD3 is a flow "
                            f"model), got {type(scheduler).__name__}")
        self.transformer, self.scheduler, self.vae = transformer, scheduler, vae
        self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2 = (
            text_encoder, tokenizer, text_encoder_2, tokenizer_2)
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.image_encoder, self.feature_extractor = image_encoder, feature_extractor  # (an IP-Adapter's SigLIP)
        self.cuda_graph, self.channels_last = cuda_graph, channels_last
        self._layout = torch.contiguous_format  # the VAE's current memory format
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.default_sample_size = transformer.config.sample_size
        self._progress = {}
        self._graph = self._graphed_for = None
        self._interrupt = False
        self._call_tensors = {}  # a call's tensors beyond the text that a callback may read or replace (inpainting's)

    cuda_graph = auto_or_bool_setting("cuda_graph", '"auto" (capture the transformer call on CUDA), True (CUDA '
                                                     'required) or False.')
    channels_last = auto_or_bool_setting("channels_last", '"auto" (channels_last on the CPU, NCHW on CUDA), True or '
                                                           "False: the VAE's memory format (the transformer's convs "
                                                           "are one patch embedding).")

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None, *, variant=None, cuda_graph="auto", channels_last="auto",
                        **components):
        """Load a diffusers SD3 folder: model_index.json, transformer/, vae/, text_encoder(_2, _3)/,
        tokenizer(_2, _3)/, scheduler/ (a folder saved without T5 loads without it, as diffusers), and an
        IP-Adapter's image_encoder/ and feature_extractor/ where the folder has them. A component passed by name is
        used as it is."""
        import transformers
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        folder, index = read_model_index(folder)
        names = ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                 "text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
        optional = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
        load = ComponentLoader(folder, index, names, optional, components, dtype, device, variant)

        def listed_class(name, default):  # (the transformers class model_index.json names: SigLIP's)
            entry = index.get(name)
            return getattr(transformers, entry[1], default) if isinstance(entry, list) and len(entry) == 2 and \
                isinstance(entry[1], str) else default

        return cls(load("transformer"), load("scheduler"), load("vae"),
                   load("text_encoder", CLIPTextModelWithProjection), load("tokenizer"),
                   load("text_encoder_2", CLIPTextModelWithProjection), load("tokenizer_2"),
                   load("text_encoder_3", T5EncoderModel), load("tokenizer_3", AutoTokenizer),
                   image_encoder=load("image_encoder", listed_class("image_encoder", transformers.SiglipVisionModel)),
                   feature_extractor=load("feature_extractor", listed_class("feature_extractor",
                                                                            transformers.SiglipImageProcessor)),
                   cuda_graph=cuda_graph, channels_last=channels_last)

    @classmethod
    def from_pipe(cls, pipe, **components):
        """This class of pipeline on ``pipe``'s components (shared, not copied), as diffusers' ``from_pipe``:
        ``StableDiffusion3Img2ImgPipeline.from_pipe(pipe)``; ``components`` replace some by name. LoRAs merged into
        the shared weights come along (and unload from either)."""
        if not isinstance(pipe, StableDiffusion3Pipeline):
            raise TypeError(f"pipe must be one of diffusion_fast's SD3 pipelines, got {type(pipe).__name__} (an SD "
                            "or SDXL pipeline's from_pipe takes those)")
        names = cls._component_names
        unknown = sorted(set(components) - set(names))
        if unknown:
            raise TypeError(f"from_pipe got components it does not take: {unknown} (it takes {list(names)})")
        new = cls(**{name: components[name] if name in components else getattr(pipe, name, None) for name in names})
        if hasattr(pipe, "_lora") and new.transformer is pipe.transformer:  # the same merged LoRAs to undo
            new._lora = pipe._lora
        return new

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(self, device=None, dtype=None):
        dtype = resolve_dtype(dtype)
        for module in (self.transformer, self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3,
                       self.image_encoder, getattr(self, "controlnet", None)):
            if module is not None:
                module.to(device=device, dtype=dtype)
        self._graph = self._graphed_for = None
        return self

    def set_progress_bar_config(self, **kwargs):
        self._progress = kwargs

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale is not None and self._guidance_scale > 1

    # ---- the loop -----------------------------------------------------------------------------------------------
    def _vae(self, device):
        """The VAE in the memory format ``channels_last`` asks for on ``device`` (on the CPU by default, as the SD
        pipelines measured), set before its first encode or decode so that every call runs it the same way."""
        wanted = self.channels_last is True or (self.channels_last == "auto" and device.type == "cpu")
        layout = torch.channels_last if wanted else torch.contiguous_format
        if layout != self._layout:
            self.vae.to(memory_format=layout)
            self._layout = layout
        return self.vae

    def _decode(self, latents):
        """Images in [-1, 1] from latents: un-scaled and un-shifted (SD3's VAE centres its latents), decoded (see
        ``_vae``)."""
        self._vae(latents.device)
        c = self.vae.config
        return self.vae.decode(latents / c.scaling_factor + (c.shift_factor or 0.0))

    def _model_input(self, model_input):
        """The transformer's input for the loop's latents (doubled under guidance): the latents themselves; an
        inpainting transformer's takes the mask and the masked image's latents beside them."""
        return model_input

    def _step_inputs(self, i, steps, batch):
        """The transformer call's inputs at step ``i`` of ``steps`` beyond the latents and text, for a model input of
        ``batch`` rows: none; a ControlNet pipeline's control latents and this step's scales."""
        return ()

    def _after_step(self, i, timesteps, latents):
        """The latents after step ``i``'s update: as they are; inpainting with a plain transformer puts the image's
        back outside the mask."""
        return latents

    def _transformer_call(self, latents, t, embeds, pooled, *extra):
        """The transformer on the call's inputs; ``extra``: an IP-Adapter's image features (a tensor: its last rows
        when a callback cut the batch to the prompt's), then the block indices skip-layer guidance skips."""
        ip = next((e for e in extra if torch.is_tensor(e)), None)
        skip = tuple(e for e in extra if not torch.is_tensor(e))
        if ip is not None:
            ip = ip[-latents.shape[0]:]
        return self.transformer(latents, embeds, pooled, t.expand(latents.shape[0]), skip_layers=skip or None,
                                ip_adapter_image_embeds=ip)

    def _graphs_on(self, device):
        """Whether the transformer call replays from CUDA graphs: on CUDA unless ``cuda_graph=False``, and never on
        the reference backend (plain PyTorch)."""
        if self.cuda_graph is True and device.type != "cuda":
            raise ValueError("cuda_graph=True needs the pipeline on a CUDA device")
        return self.cuda_graph is not False and device.type == "cuda" and current_backend() != "reference"

    def _graph_modules(self):
        """What the transformer call reads besides its inputs: the transformer (and a ControlNet pipeline's nets)."""
        return (self.transformer,)

    def _model(self, device):
        """The transformer call: a GraphedCallable where graphs are on (one graph per input shape and skip list,
        recaptured when the weights change, or an IP-Adapter's modules or scale: a scale is baked into the kernels),
        else plain."""
        if not self._graphs_on(device):
            return self._transformer_call
        modules = self._graph_modules()
        if self._graph is None or len(modules) != len(self._graphed_for) or any(
                a is not b for a, b in zip(modules, self._graphed_for)):
            states = [ModuleState(m) for m in modules]
            blocks = self.transformer.transformer_blocks

            def state():
                adapters = tuple((id(b.attn.ip_adapter), getattr(b.attn.ip_adapter, "scale", None)) for b in blocks)
                return tuple(s() for s in states), adapters

            self._graph = GraphedCallable(self._transformer_call, state=state, clone_output=True)
            self._graphed_for = modules
        return self._graph

    def _set_timesteps(self, num_inference_steps, device, sigmas, mu, latent_shape):
        c = self.scheduler.config
        if c.use_dynamic_shifting and mu is None:
            patch = self.transformer.config.patch_size
            mu = calculate_shift((latent_shape[-2] // patch) * (latent_shape[-1] // patch), c.base_image_seq_len,
                                 c.max_image_seq_len, c.base_shift, c.max_shift)
        kwargs = {"mu": mu} if mu is not None else {}
        if sigmas is not None:
            self.scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
        # the index diffusers' first step would look up from the timestep (a read of the device): it is the first
        self.scheduler.set_begin_index(0)
        return len(self.scheduler.timesteps)

    @lora_call_scale(name="joint_attention_kwargs")
    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, prompt_3=None, height=None, width=None, num_inference_steps=28,
                 sigmas=None, guidance_scale=7.0, negative_prompt=None, negative_prompt_2=None,
                 negative_prompt_3=None, num_images_per_prompt=1, generator=None, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 output_type="pil", return_dict=True, clip_skip=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=256,
                 skip_guidance_layers=None, skip_layer_guidance_scale=2.8, skip_layer_guidance_stop=0.2,
                 skip_layer_guidance_start=0.01, mu=None, ip_adapter_image=None, ip_adapter_image_embeds=None):
        height = height if height is not None else self.default_sample_size * self.vae_scale_factor
        width = width if width is not None else self.default_sample_size * self.vae_scale_factor
        text_args = text_arguments(locals())
        batch, text, cond, callback_inputs = self._prepare_text(
            *text_args, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type,
            clip_skip, max_sequence_length, skip_guidance_layers, callback_on_step_end,
            callback_on_step_end_tensor_inputs)
        text, cond = self._with_ip_adapter(text, cond, ip_adapter_image, ip_adapter_image_embeds,
                                           batch * num_images_per_prompt)
        device = self.device
        shape = (batch * num_images_per_prompt, self.transformer.config.in_channels,
                 height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=text[0].dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=text[0].dtype)
        self._set_timesteps(num_inference_steps, device, sigmas, mu, shape)
        slg = (tuple(skip_guidance_layers or ()), skip_layer_guidance_scale, skip_layer_guidance_start,
               skip_layer_guidance_stop)
        return self._denoise(latents, self.scheduler.timesteps, text, cond, slg, callback_on_step_end,
                             callback_inputs, output_type, return_dict)

    def _prepare_text(self, prompts, given, height, width, num_inference_steps, guidance_scale,
                      num_images_per_prompt, output_type, clip_skip, max_sequence_length, skip_guidance_layers,
                      callback, callback_inputs):
        """A call's checks and text: (the batch of prompts, the loop's (embeddings, pooled) with the negative ones
        first under guidance, the prompt's own (skip-layer guidance runs on them), the callback's tensor names)."""
        # (a diffusers PipelineCallback names its own tensors, as diffusers reads them)
        callback_inputs = list(getattr(callback, "tensor_inputs", callback_inputs))
        batch = self._check_inputs(prompts, given["prompt_embeds"], given["pooled_prompt_embeds"],
                                   given["negative_prompt_embeds"], given["negative_pooled_prompt_embeds"], height,
                                   width, num_inference_steps, guidance_scale, num_images_per_prompt, output_type,
                                   max_sequence_length, skip_guidance_layers, callback_inputs)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback_on_step_end must be callable (pipe, step, timestep, tensors) -> dict, got "
                            f"{type(callback).__name__}")
        self._guidance_scale = guidance_scale  # (a step callback may change it: diffusers' SD3CFGCutoffCallback)
        do_cfg = self.do_classifier_free_guidance
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
            prompts["prompt"], prompts["prompt_2"], prompts["prompt_3"], self.device, num_images_per_prompt, do_cfg,
            prompts["negative_prompt"], prompts["negative_prompt_2"], prompts["negative_prompt_3"],
            given["prompt_embeds"], given["negative_prompt_embeds"], given["pooled_prompt_embeds"],
            given["negative_pooled_prompt_embeds"], clip_skip, max_sequence_length)
        cond = (prompt_embeds, pooled)
        if not do_cfg:
            return batch, cond, cond, callback_inputs
        text = (torch.cat([negative_prompt_embeds, prompt_embeds]), torch.cat([negative_pooled, pooled]))
        return batch, text, cond, callback_inputs

    def _predict(self, model, latents, t, i, steps, text, cond, slg):
        """Step ``i``'s guided velocity: the transformer (``model``) on the latents, doubled under guidance (read
        every step, as diffusers does: a callback may turn it off) with ``text`` (the loop's embeddings and pooled
        ones), the classifier-free combine, and skip-layer guidance's."""
        do_cfg = self.do_classifier_free_guidance
        model_input = torch.cat([latents, latents]) if do_cfg else latents
        pred = model(self._model_input(model_input), t, *text, *self._step_inputs(i, steps, model_input.shape[0]))
        if not do_cfg:
            return pred
        uncond, text_pred = pred.chunk(2)
        return self._skip_layer_guidance(uncond + self._guidance_scale * (text_pred - uncond), text_pred, model,
                                         latents, t, i, steps, cond, slg)

    @staticmethod
    def _skip_layer_guidance(pred, text_pred, model, latents, t, i, steps, cond, slg):
        """SD3.5's skip-layer guidance on the guided ``pred`` at step ``i``: the prompt's prediction ``text_pred``
        against one with ``slg``'s layers skipped (a transformer call on the prompt's text ``cond`` alone), within
        its start and stop fractions of the steps."""
        skip, scale, start, stop = slg
        if not skip or not steps * start < i < steps * stop:
            return pred
        return pred + (text_pred - model(latents, t, *cond, *skip)) * scale

    def _denoise(self, latents, timesteps, text, cond, slg, callback, callback_inputs, output_type, return_dict):
        """The loop over ``timesteps`` and the decode. ``text``: the loop's (embeddings, pooled); ``cond``: the
        prompt's alone; ``slg``: skip-layer guidance's (layers, scale, start, stop)."""
        device = self.device
        steps = self._num_timesteps = len(timesteps)
        model = self._model(device)
        prompt_embeds, pooled, *ip = text  # (ip: an IP-Adapter's image features, when it runs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        self._interrupt = False
        for i, t in enumerate(tqdm(timesteps, **{"desc": "denoising", **self._progress})):
            if self._interrupt:
                continue
            pred = self._predict(model, latents, t, i, steps, (prompt_embeds, pooled, *ip), cond, slg)
            latents = self._after_step(i, timesteps, self.scheduler.step(pred, t, latents, return_dict=False)[0])
            if callback is not None:
                named = {"latents": latents, "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled,
                         **self._call_tensors}
                outputs = callback(self, i, t, {k: named[k] for k in callback_inputs})
                if not isinstance(outputs, dict):
                    raise TypeError(f"callback_on_step_end must return a dict (the tensors it replaces, or {{}}), "
                                    f"got {type(outputs).__name__}")
                latents = outputs.get("latents", latents)
                prompt_embeds = outputs.get("prompt_embeds", prompt_embeds)
                pooled = outputs.get("pooled_prompt_embeds", pooled)
                self._call_tensors.update((k, outputs[k]) for k in self._call_tensors if k in outputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        images = latents if output_type == "latent" else postprocess(self._decode(latents), output_type)
        if not return_dict:
            return (images,)
        return StableDiffusionPipelineOutput(images=images, seconds=seconds)
