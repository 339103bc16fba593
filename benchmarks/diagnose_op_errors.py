"""Does a C++ op's argument error reach Python as an exception, or kill the process? One case per subprocess.

    python benchmarks/diagnose_op_errors.py

On the CUDA build (H100, torch 2.11) tests/test_cpp_ops.py::test_the_op_itself_also_checks killed its pytest
worker twice, where the CPU build raises ValueError. This runs that call and its neighbours each in a fresh
interpreter with faulthandler on, and prints how each ended (exception text, or the signal and the Python stack), so
one GPU run says whether every C++ throw dies on that build or only one path does. Exit status 1 if any case died.
"""
import os
import subprocess
import sys

CASES = {
    "cpu ddim_step, alpha of the wrong length (the test's call)":
        "x = torch.randn(3, 4, 5, 5); torch.ops.diffusion_fast.ddim_step(x, x, torch.ones(2), torch.ones(3), 0.0, "
        "None, 'epsilon', None, False)",
    "cpu ddim_step, unknown prediction type":
        "x = torch.randn(3, 4, 5, 5); torch.ops.diffusion_fast.ddim_step(x, x, torch.ones(3), torch.ones(3), 0.0, "
        "None, 'eps', None, False)",
    "cpu group_norm_silu, groups not dividing C":
        "torch.ops.diffusion_fast.group_norm_silu(torch.randn(1, 6, 2, 2), 4, None, None, 1e-5, True)",
    "cpu TORCH_CHECK from ATen itself (control: not our library)":
        "torch.ones(2) + torch.ones(3)",
    "cuda ddim_step, alpha of the wrong length":
        "x = torch.randn(3, 4, 5, 5, device='cuda'); torch.ops.diffusion_fast.ddim_step(x, x, "
        "torch.ones(2, device='cuda'), torch.ones(3, device='cuda'), 0.0, None, 'epsilon', None, False)",
}


def run(name, statement):
    code = ("import faulthandler, torch, diffusion_fast\nfaulthandler.enable()\n"
            f"try:\n    {statement}\n    print('NO ERROR RAISED')\n"
            "except Exception as exc:\n    print(f'raised {type(exc).__name__}: {str(exc).splitlines()[0][:160]}')\n")
    result = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    died = result.returncode < 0 or result.returncode > 1
    how = f"died (exit {result.returncode})" if died else result.stdout.strip().splitlines()[-1]
    print(f"{name}: {how}", flush=True)
    if died:
        print("    " + "\n    ".join((result.stdout + result.stderr).strip().splitlines()[-25:]), flush=True)
    return died


def main():
    import torch

    cases = {k: v for k, v in CASES.items() if torch.cuda.is_available() or not k.startswith("cuda")}
    deaths = sum(run(name, statement) for name, statement in cases.items())
    print(f"{len(cases)} cases, {deaths} died")
    return 1 if deaths else 0


if __name__ == "__main__":
    sys.exit(main())
