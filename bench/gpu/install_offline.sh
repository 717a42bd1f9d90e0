#!/usr/bin/env bash
# Runs on the GPU machine, from the working tree that the device tool copied there with .gpu_wheels/
# carried along: installs what bench/gpu/wheels.txt lists into the device's own Python (PYTHON, default
# python3, there the one that holds torch) with no network, leaving its torch and triton alone, then
# imports everything (the device's own packages that the code needs too) and prints versions.
# Exits non-zero, saying what is missing, when anything does not install or import.
#   --dry-run: print what would be installed (the plan for this interpreter when .gpu_wheels/ is here, else
#   the manifest's list) and exit, without pip or imports (bench/gpu/run.sh --cpu-smoke uses it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: bash bench/gpu/install_offline.sh [--dry-run]" >&2; exit 2 ;;
esac

WHEELS=.gpu_wheels
PYTHON=${PYTHON:-python3}
die() { echo "install_offline: ERROR: $*" >&2; exit 1; }
manifest() { "$PYTHON" bench/gpu/wheel_manifest.py "$@"; }

if [ "$DRY_RUN" = 1 ]; then
    if [ -d "$WHEELS" ]; then
        echo "install_offline: dry run: would install from $WHEELS/ into $PYTHON:"
        manifest plan "$WHEELS"
    else
        echo "install_offline: dry run: no $WHEELS/ here (bench/gpu/wheelhouse.sh fills it); the manifest lists:"
        manifest reqs
    fi
    exit 0
fi
[ -d "$WHEELS" ] || die "no $WHEELS/ here: run bench/gpu/wheelhouse.sh before the device call and pass carry=[\"$WHEELS\"]"
command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH (set PYTHON to the device's Python 3.12)"
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' 2>/dev/null \
    || echo "install_offline: warning: $PYTHON is not Python 3.12; the binary wheels are built for 3.12" >&2
torch_triton() { "$PYTHON" -c 'import torch, triton; print(torch.__version__, triton.__version__)' 2>/dev/null; }
before=$(torch_triton) || die "torch and triton do not import with $PYTHON; this script only adds to the device's own"

# The device's pip configuration (index URLs, constraints) plays no part: everything comes from $WHEELS.
# PIP_BREAK_SYSTEM_PACKAGES: the device's Python may be a distribution's, marked externally managed.
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore
# Only read if pip has to build deepspeed from its sdist (no wheel in $WHEELS): no op is compiled then.
export DS_BUILD_OPS=0

# Fills that the device lacks first, then the pins: with --no-deps pip installs exactly these files and
# never resolves torch or triton; --no-build-isolation lets a deepspeed sdist build offline against the
# installed setuptools and torch.
plan=$(manifest plan "$WHEELS") || die "the wheelhouse is incomplete (see above)"
mapfile -t reqs <<<"$plan"
echo "install_offline: installing ${#reqs[@]} packages from $WHEELS/: ${reqs[*]}"
"$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps --no-build-isolation \
    --no-compile --no-cache-dir "${reqs[@]}" \
    || die "pip could not install from $WHEELS/ (see pip's message above)"

after=$(torch_triton) || die "torch or triton no longer imports after the install"
[ "$before" = "$after" ] || die "torch/triton changed from '$before' to '$after'; a wheel in $WHEELS/ must not carry them"

manifest verify || die "installed, but the imports above failed"
echo "install_offline: OK (torch/triton untouched: $after)"
