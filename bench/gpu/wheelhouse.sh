#!/usr/bin/env bash
# Fills .gpu_wheels/ with what the GPU machine lacks (bench/gpu/wheels.txt), for its Python 3.12 on
# x86_64 Linux. That machine has no package index: the folder travels with the working tree as the device
# tool's `carry`, 64 MiB in all, so the wheels must stay under 50 MiB. Idempotent: files already there are
# kept, files no manifest line names are removed. Runs here, with network; PYTHON picks the pip to use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

WHEELS=.gpu_wheels
LIMIT_MIB=50
PYTHON=${PYTHON:-python3}
manifest() { "$PYTHON" bench/gpu/wheel_manifest.py "$@"; }

mkdir -p "$WHEELS"
manifest prune "$WHEELS"

# Binaries for the device's interpreter (CPython 3.12), not this one. pip matches each manylinux tag
# exactly, so every tag up to 2_28 (the device's torch 2.11 wheel already needs glibc 2.28) that the wheels
# use is named. --no-deps: the manifest lists every dependency the device lacks, on purpose.
mapfile -t binary_reqs < <(manifest reqs --skip deepspeed)
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --dest "$WHEELS" "${binary_reqs[@]}"

# DeepSpeed is on PyPI as an sdist only. Building it needs nothing but setuptools: with DS_BUILD_OPS=0 no op
# is compiled (they are JIT-built at run time) and its setup.py works without torch, so the wheel is pure
# Python (py3-none-any) and the device installs it without building. The sdist stays beside it: pip picks
# the wheel, and install_offline.sh could build the sdist offline (--no-build-isolation) if the wheel went.
ds_req=$(manifest reqs --mode pin | grep -i '^deepspeed==')
ds_version=${ds_req#*==}
if ! ls "$WHEELS"/deepspeed-"$ds_version".tar.gz >/dev/null 2>&1; then
    "$PYTHON" -m pip download --quiet --no-deps --no-binary=:all: --dest "$WHEELS" "$ds_req"
fi
if ! ls "$WHEELS"/deepspeed-"$ds_version"-py3-none-any.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" \
        "$WHEELS/deepspeed-$ds_version.tar.gz"
fi

manifest check "$WHEELS"
manifest sizes "$WHEELS" "$LIMIT_MIB"
echo "carry for the device tool: [\"$WHEELS\"]"
