"""Reading LlamaGen checkpoints (released ``c2i_*.pt`` files and upstream training checkpoints) into ``LlamaGenGPT``
with ``strict=True``: every key present, no extra, same shapes (``arra_ds.weights.load_strict``)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch

from arra_ds.errors import InputNotFoundError, UserError
from arra_ds.model.llamagen.gpt import LlamaGenGPT
from arra_ds.weights import describe_keys, load_strict

# Checkpoint containers upstream writes or reads (sample_c2i.py): DDP "model", DeepSpeed "module",
# Lightning-style "state_dict"; otherwise the file is the state dict itself (FSDP export).
CHECKPOINT_WEIGHT_KEYS = ("model", "module", "state_dict")
# Tensors that some LlamaGen variants save but that are recomputed here: the RoPE table (a buffer in
# upstream's serve/ and HF variants, dropped by their loaders) and KV-cache buffers of a model saved
# after `setup_caches`.
DERIVED_KEY_NAMES = ("freqs_cis",)
DERIVED_KEY_FRAGMENT = ".attention.kv_cache."


class LlamaGenCheckpointError(UserError, ValueError):
    """A LlamaGen checkpoint whose tensors do not match the configured model; the message names the keys."""


def _read_checkpoint_file(path: Path) -> object:
    """torch.load with weights_only=True; upstream training checkpoints also pickle their argparse ``args``."""
    if not path.is_file():
        raise InputNotFoundError(f"LlamaGen checkpoint {path} not found (e.g. c2i_B_256.pt from the LlamaGen release)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for foreign objects, RuntimeError / EOFError for damaged files
        raise LlamaGenCheckpointError(
            f"cannot read LlamaGen checkpoint {path}: {error}. It must be a torch.save file of tensors "
            "(optionally under 'model' / 'module' / 'state_dict'); re-save just the state dict if it pickles other objects"
        ) from error


def extract_llamagen_state_dict(
    checkpoint: Mapping[str, object], source: str, weights_key: str | None = None
) -> dict[str, torch.Tensor]:
    """The model tensors of a loaded checkpoint: under `weights_key` if given, else 'model' / 'module' /
    'state_dict', else the mapping itself; RoPE / KV-cache tensors that some variants save are dropped."""
    if weights_key is not None:
        if not isinstance(checkpoint.get(weights_key), Mapping):
            raise LlamaGenCheckpointError(
                f"{source} has no tensor mapping under {weights_key!r}; its top-level keys are {describe_keys(sorted(checkpoint))}"
            )
        state = checkpoint[weights_key]
    else:
        containers = [key for key in CHECKPOINT_WEIGHT_KEYS if isinstance(checkpoint.get(key), Mapping)]
        state = checkpoint[containers[0]] if containers else checkpoint
    not_tensors = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise LlamaGenCheckpointError(
            f"{source}: entries {describe_keys(not_tensors)} are not tensors; point weights_key at the "
            f"model weights (upstream saves them under one of {list(CHECKPOINT_WEIGHT_KEYS)})"
        )
    return {
        key: value
        for key, value in state.items()
        if key not in DERIVED_KEY_NAMES and DERIVED_KEY_FRAGMENT not in key
    }


def load_llamagen_checkpoint(
    model: LlamaGenGPT,
    path_or_state: str | Path | Mapping[str, object],
    weights_key: str | None = None,
) -> None:
    """Load upstream-layout weights into `model` with strict=True (every key present, no extra, same shapes).

    `path_or_state`: a checkpoint file, or an already loaded checkpoint / state dict. Raises
    LlamaGenCheckpointError naming the missing / unexpected / mis-shaped keys.
    """
    if isinstance(path_or_state, (str, Path)):
        source = str(path_or_state)
        checkpoint = _read_checkpoint_file(Path(path_or_state))
    else:
        source, checkpoint = "the given LlamaGen state dict", path_or_state
    if not isinstance(checkpoint, Mapping):
        raise LlamaGenCheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a mapping of tensors")
    state = extract_llamagen_state_dict(checkpoint, source, weights_key)
    config = model.config
    load_strict(
        model, state, source=source, error=LlamaGenCheckpointError,
        what=f"LlamaGenGPT(size={config.size!r}, n_layer={config.resolved_n_layer}, dim={config.resolved_dim})",
        hint="Check model.llamagen.size / n_layer / dim / vocab_size / num_classes / class_dropout_prob against the checkpoint",
    )
