#!/usr/bin/env bash
# One command on a CUDA machine: build the extension (CUDA kernels included), check that the C++ ops' argument errors
# reach Python on this build (benchmarks/diagnose_op_errors.py), run the test suite on the GPU, then the kernel
# benchmark and the end-to-end benchmark. Results append to benchmarks/results/*.jsonl.
#   bash benchmarks/run_gpu.sh [diagnose] [tests] [kernels] [e2e] [tune]   (default: the first four; "tune" sweeps
#   the attention tiles, benchmarks/tune_attention.py, a few minutes). On a lent machine with a per-command time limit,
#   run the steps as separate commands.
set -uo pipefail
cd "$(dirname "$0")/.."
steps=("$@"); [[ ${#steps[@]} -eq 0 ]] && steps=(diagnose tests kernels e2e)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
python3 -c "import diffusion_fast._C" 2>/dev/null || \
  python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . || exit 1
python3 -c "import torch, diffusion_fast; print('CUDA kernels in the extension:', diffusion_fast._cpp.has_cuda(), torch.cuda.get_device_name())"
status=0
for step in "${steps[@]}"; do
  case $step in
    diagnose) python3 benchmarks/diagnose_op_errors.py || status=1 ;;
    tests) python3 -m pytest tests -q -p no:cacheprovider -n 8 || status=1 ;;
    kernels) python3 benchmarks/gpu_kernels.py || status=1 ;;
    e2e) python3 benchmarks/gpu_e2e.py || status=1 ;;
    tune) python3 benchmarks/tune_attention.py || status=1 ;;
  esac
done
exit $status
