#!/usr/bin/env bash
# Builds here (CPU, with network) a venv that stands in for the GPU machine: its Python 3.12, torch 2.11,
# triton 3.6, torchvision 0.26 and transformers 5.x stack, then the wheelhouse installed the way the device
# does it (install_offline.sh, no index), then setup.py's pins for scipy, numpy, pyyaml, tensorboard, tqdm
# and pytest. Tests run in it (TRITON_INTERPRET=1 on CPU) find what the device's versions break before any
# device time is spent. About 5 GiB. Usage: bench/gpu/compat_venv.sh DIR   (PYTHON: a Python 3.12)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

VENV=${1:?usage: bench/gpu/compat_venv.sh DIR}
PYTHON=${PYTHON:-python3.12}
[ -d .gpu_wheels ] || bash bench/gpu/wheelhouse.sh

"$PYTHON" -m venv "$VENV"
VPY="$VENV/bin/python"
pip() { "$VPY" -m pip "$@"; }
pip install --quiet --upgrade pip

# torch's CUDA wheel imports only with the CUDA libraries its shared objects link (cublas, cudnn, cufft,
# cufile, curand, cusparse, cusparselt, nccl, nvshmem, nvjitlink, cudart: 2.2 GiB); cusolver, nvrtc,
# cupti, nvtx and cuda-bindings are loaded lazily, so --no-deps and this list skip them.
pip install --quiet --no-deps torch==2.11.0 triton==3.6.0 torchvision==0.26.0 \
    nvidia-cublas==13.1.0.3 nvidia-cufft==12.0.0.61 nvidia-cufile==1.15.1.6 nvidia-curand==10.4.0.35 \
    nvidia-cusparse==12.6.3.3 nvidia-nvjitlink==13.0.88 nvidia-cuda-runtime==13.0.96 \
    nvidia-cudnn-cu13==9.19.0.56 nvidia-cusparselt-cu13==0.8.0 nvidia-nccl-cu13==2.28.9 nvidia-nvshmem-cu13==3.4.5

# The device's other packages (the versions its package list gives where it gives one) and what they
# need, resolved with a dry run and installed without torch, triton and the CUDA wheels.
report="$VENV/device-report.json"
pip install --quiet --dry-run --ignore-installed --report "$report" torch==2.11.0 torchvision==0.26.0 \
    transformers==5.17.0 huggingface_hub==1.33.0 tokenizers==0.23.2 numpy==2.5.2 accelerate==1.15.0 \
    timm tensorboard scipy pillow requests pytest psutil einops msgpack py-cpuinfo ninja nvidia-ml-py \
    xxhash regex safetensors pyyaml tqdm filelock fsspec
mapfile -t base < <("$VPY" - "$report" <<'EOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    cuda = name.lower().startswith(("nvidia-", "cuda-")) and name.lower() != "nvidia-ml-py"
    if name.lower() not in ("torch", "triton", "torchvision") and not cuda:
        print(f"{name}=={version}")
EOF
)
pip install --quiet --no-deps "${base[@]}"

# The wheelhouse, as on the device: no index, torch and triton left alone.
PYTHON="$VPY" bash bench/gpu/install_offline.sh

# setup.py's pins for what the code imports beyond the wheelhouse.
pip install --quiet --no-deps scipy==1.17.1 numpy==2.1.3 pyyaml==6.0.3 tensorboard==2.21.0 tqdm==4.70.1 \
    pytest==9.2.0
TRITON_INTERPRET=1 "$VPY" -c 'import torch, triton; print("compat venv:", torch.__version__, triton.__version__)'
