"""Model FLOPs per token (PaLM appendix B) and peak device throughput, for MFU.

    flops/token = 6 * N + 12 * L * H * T   (training: forward + backward, no recompute counted)

N counts every parameter except the input embeddings (the LM head is in), L layers, H hidden size,
T the sequence length (the attention score and value matmuls).
"""

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


def training_flops_per_token(num_params_no_embedding: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    return 6.0 * num_params_no_embedding + 12.0 * num_layers * hidden_size * seq_len


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
