"""Running from the source tree: its ``kernels/`` folder (installed as ``diffusion_fast.kernels``) is importable as a
top-level ``kernels`` whenever the tree's root is on sys.path: ``python -m pytest`` from the root, pytest-xdist's
workers (which put their working directory first), a script run from the root, ``PYTHONPATH=.``. That name belongs to
Hugging Face's ``kernels`` package, which transformers >= 5.25 installs and diffusers then imports: it got our folder
and failed ("cannot import name 'CUDAProperties' from 'kernels'"), breaking every diffusers model. Where both are
there, the Hugging Face package is imported first, from the rest of sys.path, so every later ``import kernels`` gets
it; an installed wheel (no top-level ``kernels/``) and a machine without that package are left as they are."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_root(entry: str) -> bool:
    return os.path.abspath(entry or os.curdir) == ROOT


def unshadow_hf_kernels() -> None:
    if "kernels" in sys.modules or not os.path.isfile(os.path.join(ROOT, "kernels", "__init__.py")):
        return
    if not any(_is_root(entry) for entry in sys.path):
        return
    spec = importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if not _is_root(p)])
    if spec is None or spec.loader is None:
        return  # (no Hugging Face `kernels` installed: nothing imports the name)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - a broken install of theirs: leave the name as Python would resolve it
        del sys.modules["kernels"]
