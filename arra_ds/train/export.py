"""Export a training checkpoint in its backbone's released format (``Backbone.export``): a plain Hugging Face
Chameleon directory for the Chameleon family, an upstream-layout ``c2i.pt`` for LlamaGen.

ARRA's projector ``A_phi`` (``align_head.*``) exists only for training: the export keeps the backbone alone, as
the paper does at inference. ``ARRAModel`` holds the backbone under ``backbone.``, whose names are the family's
own, so the prefix is stripped and nothing is renamed. Tensors the run did not train but the format carries
(Chameleon's VQ image tokenizer, ``model.vqmodel.*``) come from the run's assets (copied there at the start, or
recorded there and read from the base checkpoint, which must still be the one the run saw; ``--base_model``
points at a moved one). The run's data record (``arra_data.json``) and assets go along, so generation from the
export needs no more arguments than generation from the run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from arra_ds.checkpoints import (
    ASSETS_DIR,
    BASE_WEIGHTS_FILE,
    RUN_DATA_FILE,
    CheckpointError,
    TrainedBackbone,
    read_run_assets,
    read_trained_backbone,
    tensors_sha256,
)
from arra_ds.model.arra import resolved_lora
from arra_ds.model.interface import ExportResult
from arra_ds.model.trainable import TRAIN_ALL, adapter_state_dict, write_adapter

EXPORT_SUMMARY = "arra_export.json"


def base_weights_of(trained: TrainedBackbone, base_model: str = "") -> dict[str, torch.Tensor]:
    """The untrained base tensors the export carries: the run's copy, else the base checkpoint it recorded (checked:
    the same tensors), else (runs without assets) the base checkpoint of the run config."""
    model_cfg = trained.model_cfg
    assets = read_run_assets(trained.ref.run_dir)
    if assets is not None and (assets.model_dir / BASE_WEIGHTS_FILE).is_file():
        return load_file(str(assets.model_dir / BASE_WEIGHTS_FILE))
    entry = assets.external_file("base_weights") if assets is not None else None
    if entry is None:
        if assets is not None:
            return {}  # the base has none (a Chameleon directory without VQ weights)
        return model_cfg.backbone.base_weights(replace(model_cfg, path=base_model) if base_model else model_cfg)
    where = Path(base_model or entry.path)
    tensors = model_cfg.backbone.base_weights(replace(model_cfg, path=str(where))) if where.is_dir() else {}
    if not tensors or tensors_sha256(tensors) != entry.sha256:
        found = "is missing" if not where.is_dir() else "does not hold the same tensors"
        raise CheckpointError(
            f"{entry.what} {where} {found}: the run recorded {entry.path} (sha256 of its tensors {entry.sha256[:16]}...); "
            f"pass {entry.key} <the base checkpoint directory's new path>"
        )
    return tensors


def export_hf(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None, base_model: str = "",
              adapter_only: bool = False) -> dict:
    """Write ``out_dir`` from a training checkpoint in its backbone's released format.

    ``checkpoint``: a run directory, its ``checkpoints`` directory or one ``step_<n>`` directory; only the ``model``
    section of the run's config.yaml is read (the training data need not be there). ``dtype``: weights dtype in the
    export (None keeps the fp32 master weights). ``base_model``: where the base checkpoint is now, if it moved.
    A run that trained LoRA adapters (``model.trainable``) is exported with them merged into the base weights, or
    (``adapter_only``) as the adapter alone in peft's format, for users who keep one base model.
    Returns a summary (also written to ``out_dir/arra_export.json``).
    """
    trained = read_trained_backbone(checkpoint, dtype, merge=not adapter_only)
    ref, model_cfg = trained.ref, trained.model_cfg
    out_dir = Path(out_dir)
    if adapter_only:
        if model_cfg.trainable == TRAIN_ALL:
            raise CheckpointError(
                f"{ref.path} trained every parameter (model.trainable=all): it has no adapter to write alone; "
                "export the whole model (without --adapter_only)"
            )
        write_adapter(out_dir, trained.state_dict, resolved_lora(model_cfg), base_model=base_model or model_cfg.path)
        files = sorted(p.name for p in out_dir.iterdir())
        result = ExportResult(files=files, summary={
            "format": "peft adapter (adapter_config.json + adapter_model.safetensors): "
                      "peft.PeftModel.from_pretrained(<base model>, <this directory>)",
            "parameters": int(sum(t.numel() for t in adapter_state_dict(trained.state_dict).values())),
        })
    else:
        base = base_weights_of(trained, base_model)
        result = model_cfg.backbone.export(model_cfg, trained.state_dict, base, out_dir, dtype)
    data_record = ref.run_dir / RUN_DATA_FILE
    if data_record.is_file():
        shutil.copy2(data_record, out_dir / RUN_DATA_FILE)
    if (ref.run_dir / ASSETS_DIR).is_dir():
        shutil.copytree(ref.run_dir / ASSETS_DIR, out_dir / ASSETS_DIR, dirs_exist_ok=True)
    summary = {
        "checkpoint": str(ref.path),
        "step": ref.step,
        "source": model_cfg.source,
        "dtype": str(dtype or torch.float32).replace("torch.", ""),
        "dropped": trained.dropped,
        **result.summary,
        "data_record": RUN_DATA_FILE if data_record.is_file() else None,
    }
    (out_dir / EXPORT_SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary
