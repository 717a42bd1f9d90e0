"""Which path computes a loss: the Triton kernel or its torch counterpart (``model.fused_kernels``).

  ``off``  always the torch code;
  ``on``   always the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
  ``auto`` the Triton kernels for CUDA tensors, the torch code for anything else.
"""

from __future__ import annotations

import os

import torch

FUSED_KERNEL_MODES = ("auto", "on", "off")

# Widest projector output the fused alignment kernel takes: one program keeps a [BLOCK_N, D] fp32
# tile of fc1's output in registers (BLOCK_N >= 16, the smallest tl.dot tile). Wider projectors
# (no encoder we use has D > 1024) run the torch path under ``auto`` and are refused under ``on``.
ALIGN_MAX_FEATURE_DIM = 1024


def triton_interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET asks for the CPU interpreter (same spellings Triton accepts)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def use_fused_kernel(mode: str, tensor: torch.Tensor) -> bool:
    """Resolve ``model.fused_kernels`` for one call, given a tensor the kernel would read."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    if mode == "auto":
        return tensor.is_cuda
    raise ValueError(f"fused kernel mode {mode!r} is not one of {FUSED_KERNEL_MODES}")


def check_launchable(tensor: torch.Tensor, kernel, module: str) -> None:
    """CPU tensors need ``kernel`` *and* triton.language's own jit helpers built for the interpreter."""
    if tensor.is_cuda:
        return
    # Triton is imported only where a kernel would run: importing it fixes compile-vs-interpret
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction) and isinstance(standard.zeros, InterpretedFunction):
        return
    raise RuntimeError(
        f"{module}: got a {tensor.device} tensor, but Triton was imported for CUDA (TRITON_INTERPRET was not "
        "set when triton.language or this module were first imported). Use CUDA tensors, or set "
        "TRITON_INTERPRET=1 at process start (before torch or Triton are imported) to run the kernels in the "
        "CPU interpreter (slow; for tests), or use model.fused_kernels=off."
    )
