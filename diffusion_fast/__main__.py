"""``python -m diffusion_fast``: the ``diffusion-fast`` command (diffusion_fast.cli) where the console script is not
on PATH (a venv not activated, an install with --no-deps --target)."""
import sys

from .cli import main

sys.exit(main())
