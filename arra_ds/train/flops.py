"""Peak device throughput, for MFU (the model's FLOPs per token: ``ARRAModel.flops_per_token``)."""

from __future__ import annotations

import torch

# Dense bf16 peak (no sparsity), TFLOP/s, matched by substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "A6000 Ada": 182.0,
    "RTX 6000 Ada": 182.0,
}


def peak_flops(device_name: str | None = None) -> float | None:
    """Peak bf16 FLOP/s of the current CUDA device, or None when unknown / on CPU."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None
