"""How the SD pipelines' loop runs on a device: the memory format the models take (``channels_last``) and the CUDA
graphs of a step or of the UNet call (``cuda_graph``), captured per component set and dropped when one changes."""
from __future__ import annotations

import torch

from ._backend import current_backend
from .cuda_graph import GraphedCallable, ModuleState
from .schedulers import DDIMScheduler


def wants_channels_last(setting, device: torch.device) -> bool:
    """Whether a ``channels_last`` setting ("auto", True or False) means channels_last on ``device``: "auto" picks it
    where it measured faster end to end, the CPU (``diffusion-fast bench``) and CUDA (the H200's gpu_e2e.py runs)."""
    return setting is True or (setting == "auto" and device.type in ("cpu", "cuda"))


class GraphedLoop:
    """Mixed into StableDiffusionPipeline: ``_models()`` names what a graph reads and what ``channels_last``
    converts; ``_denoise_step`` and ``_model_call`` (the UNet call) are what the graphs capture."""

    def _graph_step(self, latents, t, embeds, guidance_scale, do_cfg, num_inference_steps, *cond):
        """The step as captured in a CUDA graph: deterministic (eta = 0), no generator, no host state.

        ``num_inference_steps`` is unused here but part of the graph's key: the step bakes ``N // n`` into the
        captured kernels, so a different step count needs its own graph. ``cond`` (SDXL's added conditioning) are
        graph inputs like the others.
        """
        return self._denoise_step(latents, t, embeds, cond, guidance_scale, do_cfg, 0.0, None)

    def _apply_layout(self, device):
        """Put the UNet's and VAE's weights in the memory format ``channels_last`` asks for on ``device`` (once)."""
        layout = torch.channels_last if wants_channels_last(self.channels_last, device) else torch.contiguous_format
        if layout != self._layout:
            for module in self._models()["converted"]:
                module.to(memory_format=layout)
            self._layout = layout
            self._graphs = self._graphed_for = None  # the weights are new tensors: graphs must be recaptured

    def _graph_mode(self, device, eta):
        """"step" (the whole step in one CUDA graph), "unet" (the UNet call graphed, the scheduler eager) or None."""
        if self.cuda_graph is False or device.type != "cuda":
            if self.cuda_graph is True and device.type != "cuda":
                raise ValueError("cuda_graph=True needs the pipeline on a CUDA device")
            return None
        if current_backend() == "reference":  # the reference path stays plain PyTorch
            return None
        # A graph replays fixed kernels: a whole step needs no host-side state (DDIM) and no fresh noise (eta=0);
        # with guidance rescale the step is not the fused one, so its value is never baked into a graph either.
        # Any other step still spends nearly all its time in the UNet, whose call is a pure function of its tensors.
        whole = isinstance(self.scheduler, DDIMScheduler) and eta == 0 and not self._guidance_rescale > 0
        return "step" if whole else "unet"

    def _graphs_for_components(self):
        """The GraphedCallables for the current UNet and scheduler: a graph reads their weights and device tables by
        address, so a swapped-in UNet or scheduler gets fresh graphs (dropping the old ones frees their memory)."""
        components = (*self._models()["graphed"], self.scheduler)
        if self._graphs is None or any(a is not b for a, b in zip(self._graphed_for, components)):
            states = [ModuleState(m) for m in components[:-1]]  # weights replaced in place (unet.to, a new LoRA)
            weights = lambda: tuple(state() for state in states)  # noqa: E731  (recapture when any changes)
            self._graphs = {"step": GraphedCallable(self._graph_step, state=weights),
                            "unet": GraphedCallable(self._model_call, state=weights, clone_output=True)}
            self._graphed_for = components
        return self._graphs
