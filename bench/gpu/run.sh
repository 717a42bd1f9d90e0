#!/usr/bin/env bash
# The whole GPU check in one device call (bench/gpu/README.md): offline install of .gpu_wheels/, versions and
# nvidia-smi, then the gpu-marked tests, the kernel benchmarks at the 7B shapes, the Chameleon-7B training
# step's MFU (ARRA on and off) and real-size generation / pre-tokenization, each step with its own timeout,
# everything into one folder: $OUT on the GPU machine, or --out DIR.
#
#   device tool: carry=[".gpu_wheels"], timeout_s=510, command: bash bench/gpu/run.sh
#   here:        bash bench/gpu/run.sh --cpu-smoke --out /tmp/gpu_smoke   (tiny sizes, CPU, install dry-run)
#
# Other options go to bench/gpu/suite.py: --parts tests,kernels,train,generate (a rerun of what failed; the
# install always runs), --train-layers N, --plan (print steps, commands and budgets; run nothing).
# PYTHON picks the interpreter (default python3: on the device, the one that holds its torch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PYTHON=${PYTHON:-python3}
args=("$@")
have_out=0
for a in "$@"; do
    case "$a" in --out|--out=*|--plan) have_out=1 ;; esac
done
if [ "$have_out" = 0 ]; then
    [ -n "${OUT:-}" ] || { echo "run.sh: no output folder: set OUT or pass --out DIR" >&2; exit 2; }
    args+=(--out "$OUT")
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu/suite.py --command "bash bench/gpu/run.sh${*:+ $*}" "${args[@]}"
