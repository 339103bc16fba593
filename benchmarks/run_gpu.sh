#!/usr/bin/env bash
# One command on a CUDA machine: build the extension (CUDA kernels included), check that the C++ ops' argument errors
# reach Python on this build (benchmarks/diagnose_op_errors.py), run the test suite on the GPU, then the kernel
# benchmark and the end-to-end benchmark. Results append to benchmarks/results/*.jsonl.
#   bash benchmarks/run_gpu.sh [diagnose] [tests] [kernels] [e2e] [sd3] [tune]   (default: the first four; "sd3" is
#   the SD3.5 Medium-shaped end-to-end benchmark, benchmarks/gpu_e2e_sd3.py; "tune" sweeps the attention tile sizes,
#   benchmarks/tune_attention.py, a few minutes; "alignment" launches the attention kernel on views whose rows are not
#   16 bytes apart, benchmarks/diagnose_attention_alignment.py, a minute). On a lent machine with a per-command time
#   limit, run the steps as separate commands.
#   bash benchmarks/run_gpu.sh lease   one short lease (the device tool lends 15 minutes, machine start included): the
#   most telling steps first, each cut off at LEASE_SECONDS (default 510) from the start: the end-to-end benchmark
#   (with LEASE_E2E_ARGS, default "--repeats 2": torch.compile included; add --no-compile to save its ~80 s), the
#   quick kernel benchmark, the test files in LEASE_FIRST_TESTS (default: torch.compile's and the kernel files whose
#   code changed since the last GPU run, tests/test_compile.py, test_kernel_group_norm_silu.py,
#   test_kernel_attention.py, test_kernel_host.py and the step kernels' test_kernel_ddim.py, test_kernel_ddpm.py,
#   test_kernel_euler.py), then the rest of the GPU tests in whatever time is left.
#   Results (in /tmp/lease_results) and logs are copied to $OUT (the device tool brings that folder back) after
#   every step.
# Offline machines: pure-Python wheels in .whl/ (diffusers, importlib_metadata, ...) are installed into /tmp/site;
# where pip cannot install the package without an index, the extension is built in place instead.
set -uo pipefail
cd "$(dirname "$0")/.."
steps=("$@"); [[ ${#steps[@]} -eq 0 ]] && steps=(diagnose tests kernels e2e)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if ! python3 -c "import diffusion_fast._C" 2>/dev/null; then
  if ! python3 -m pip install -q --no-build-isolation --no-deps --no-index -e .; then
    echo "pip could not install the package offline: building the extension in place" >&2
    python3 setup.py -q build_ext --inplace || exit 1
    ln -sfn ../kernels diffusion_fast/kernels
    export PYTHONPATH=$PWD:${PYTHONPATH:-}
  fi
fi
python3 -c "import torch, diffusion_fast; print('CUDA kernels in the extension:', diffusion_fast._cpp.has_cuda(), torch.cuda.get_device_name())"

status=0
out=${OUT:-}
deadline=${LEASE_SECONDS:-510}  # from the script's start: the build counts too
save() {  # lease: copy the results and logs written so far to $OUT
  [[ -n $out ]] && cp /tmp/lease_results/*.jsonl /tmp/lease_*.log "$out"/ 2>/dev/null
  return 0
}
left() { echo $((deadline - SECONDS)); }
first_default="tests/test_compile.py tests/test_kernel_group_norm_silu.py tests/test_kernel_attention.py"
first_default+=" tests/test_kernel_host.py tests/test_kernel_ddim.py tests/test_kernel_ddpm.py tests/test_kernel_euler.py"
read -ra first_tests <<<"${LEASE_FIRST_TESTS:-$first_default}"  # lease: the files run before the rest
read -ra e2e_args <<<"${LEASE_E2E_ARGS:---repeats 2}"  # lease: gpu_e2e.py's options
bounded() {  # bounded NAME CMD...: run under the time left, log to /tmp/lease_NAME.log, then save
  local name=$1; shift
  if (($(left) < 30)); then echo "lease: no time left for $name" | tee -a /tmp/lease_skipped.log; status=1; return; fi
  echo "== $name ($(left) s left)"
  timeout --signal=INT --kill-after=20 "$(left)" "$@" 2>&1 | tee "/tmp/lease_$name.log"  # INT: pytest still reports
  local rc=${PIPESTATUS[0]}
  ((rc == 124)) && echo "lease: $name cut off at the deadline" | tee -a "/tmp/lease_$name.log"
  ((rc != 0)) && status=1
  save
}

for step in "${steps[@]}"; do
  case $step in
    diagnose) python3 benchmarks/diagnose_op_errors.py || status=1 ;;
    tests) python3 -m pytest tests -q -p no:cacheprovider -n 8 || status=1 ;;
    kernels) python3 benchmarks/gpu_kernels.py || status=1 ;;
    e2e) python3 benchmarks/gpu_e2e.py || status=1 ;;
    sd3) python3 benchmarks/gpu_e2e_sd3.py || status=1 ;;
    tune) python3 benchmarks/tune_attention.py || status=1 ;;
    alignment) python3 benchmarks/diagnose_attention_alignment.py || status=1 ;;
    lease)
      mkdir -p /tmp/lease_results  # (not the committed files, which the README renders and the tests check)
      bounded e2e python3 benchmarks/gpu_e2e.py "${e2e_args[@]}" --out /tmp/lease_results/gpu_e2e.jsonl
      bounded kernels python3 benchmarks/gpu_kernels.py --quick --out /tmp/lease_results/gpu_kernels.jsonl
      bounded tests_first python3 -m pytest "${first_tests[@]}" -q -p no:cacheprovider -rfE
      bounded tests python3 -m pytest tests "${first_tests[@]/#/--ignore=}" -q -p no:cacheprovider -n 8 -rfE
      ;;
    *) echo "unknown step '$step' (diagnose, tests, kernels, e2e, sd3, tune, alignment, lease)" >&2; exit 2 ;;
  esac
done
exit $status
