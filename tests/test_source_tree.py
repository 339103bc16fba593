"""Run from the source tree, our kernels/ folder must not stand in for Hugging Face's `kernels` package (which
transformers >= 5.25 installs and diffusers imports): CI broke on that the day transformers 5.25 reached its mirror.
Checked in a fresh interpreter started in the repo root, as `python -m pytest` and pytest-xdist's workers are, with a
stand-in for the Hugging Face package on the path."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_in_root(tmp_path, with_hf_package):
    site = tmp_path / "site"
    if with_hf_package:
        (site / "kernels").mkdir(parents=True)
        (site / "kernels" / "__init__.py").write_text("WHOSE = 'huggingface'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), ROOT]))  # (the root on the path, as -m puts it)
    code = ("import diffusion_fast, sys, importlib.util; import kernels; "
            "print(getattr(kernels, 'WHOSE', 'ours'), importlib.util.find_spec('kernels').origin)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_hugging_faces_kernels_package_wins_over_our_folder(tmp_path):
    whose, origin = _import_in_root(tmp_path, True)
    assert whose == "huggingface" and origin.startswith(str(tmp_path))


def test_without_that_package_nothing_is_imported_in_its_name(tmp_path):
    whose, _ = _import_in_root(tmp_path, False)
    assert whose == "ours"  # (Python's own resolution, left alone: no one imports the name then)
