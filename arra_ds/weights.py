"""Reading weights from a checkpoint folder, and loading them strictly: every key the module has, no other, each
with the module's shape.

``torch.nn.Module.load_state_dict(strict=True)`` already refuses a missing or extra key, but its message
lists every key of a 7B model and says nothing of where the file came from or what to change. Every
loader of released or trained weights (VQ tokenizers, LlamaGen, the FID networks) goes through
``load_strict``, so they all name the file, count and show the offending keys, and end with the hint of
their domain (which key of the config to check).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

KEYS_SHOWN = 8  # keys an error message lists before "..."


def read_safetensors_prefixed(folder: str | Path, prefixes: str | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors whose names start with one of ``prefixes`` in every ``*.safetensors`` file of ``folder`` (sharded
    Hugging Face checkpoints), under their full names, on the CPU; only those tensors are read."""
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.startswith(prefixes):
                    tensors[name] = f.get_tensor(name)
    return tensors


def describe_keys(keys: list[str]) -> str:
    """``3 [a, b, c]`` (at most KEYS_SHOWN names, then ``...``)."""
    shown = ", ".join(keys[:KEYS_SHOWN])
    return f"{len(keys)} [{shown}{', ...' if len(keys) > KEYS_SHOWN else ''}]"


def check_state(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    what: str,
    error: type[Exception],
    hint: str = "",
    optional_suffixes: tuple[str, ...] = (),
) -> None:
    """Raise ``error`` unless ``state`` has exactly the keys of ``expected`` (those ending with one of
    ``optional_suffixes`` may be missing), each with its shape. ``source`` names where the tensors came from
    (a file), ``what`` what they must fit (a module and its config), ``hint`` what to change."""
    missing = sorted(k for k in set(expected) - set(state) if not (optional_suffixes and k.endswith(optional_suffixes)))
    unexpected = sorted(set(state) - set(expected))
    suffix = f". {hint}" if hint else ""
    if missing or unexpected:
        raise error(
            f"{source} does not match {what}: missing keys {describe_keys(missing)}, "
            f"unexpected keys {describe_keys(unexpected)}{suffix}"
        )
    mis_shaped = [
        f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[key].shape)}"
        for key, tensor in state.items()
        if tuple(tensor.shape) != tuple(expected[key].shape)
    ]
    if mis_shaped:
        raise error(f"{source}: tensor shapes differ from {what}: {describe_keys(mis_shaped)}{suffix}")


def load_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    what: str,
    error: type[Exception],
    hint: str = "",
    optional_suffixes: tuple[str, ...] = (),
    assign: bool = False,
) -> None:
    """``check_state`` against ``module``'s own state dict, then copy ``state`` into it (``assign``: take the
    tensors as they are, e.g. into a module built on the meta device, so the weights exist once in memory)."""
    check_state(module.state_dict(), state, source=source, what=what, error=error, hint=hint,
                optional_suffixes=optional_suffixes)
    module.load_state_dict(state, strict=not optional_suffixes, assign=assign)
