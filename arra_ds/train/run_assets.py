"""A run directory that is self-contained: what inference needs besides the trained weights, in ``<run>/assets/``.

At start the trainer (rank 0) copies into the run what export, generation and evaluation would otherwise read
from outside it, so they keep working after the base checkpoint or the tokenizer files move:

    assets/model/             the backbone's small files of the base checkpoint (config.json, tokenizer files;
                              ``Backbone.inference_files``) and the untrained base tensors an export carries
                              (``base_weights.safetensors``, e.g. Chameleon's VQ encoder)
    assets/image_tokenizer/   the config (and the weights, when small) of the image tokenizer the data was
                              pre-tokenised with: its decoder turns generated codes into pictures
    assets/assets.json        what was copied from where, and the files too large to copy (path, size, sha256
                              and the key that points at a moved copy; ``checkpoints.ExternalFile``)

Files up to ``COPY_LIMIT_BYTES`` are copied; larger ones (a 7B base's VQ weights, a 300 MB VQGAN checkpoint) are
recorded, and a later use checks that the file is still the one the run saw, or fails with one line naming it
and the key to set. The run's data record (``arra_data.json``) then names the copies by paths relative to the run
directory, so a run can also be moved as a whole. The directory is written aside and renamed into place.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from arra_ds.checkpoints import (
    ASSETS_DIR,
    ASSETS_IMAGE_TOKENIZER_DIR,
    ASSETS_MANIFEST,
    ASSETS_MODEL_DIR,
    BASE_WEIGHTS_FILE,
    ExternalFile,
    RunData,
    file_sha256,
    tensors_sha256,
)
from arra_ds.io import atomic_write_json
from arra_ds.model.config import ModelConfig
from arra_ds.train.data_record import inline_image_tokenizer_config

COPY_LIMIT_BYTES = 64 << 20  # files and tensor sets up to this size are copied into the run; larger ones recorded
PARTIAL_SUFFIX = ".partial"
INLINE_TOKENIZER_CONFIG = "image_tokenizer.yaml"  # an image tokenizer config the data's meta held inline


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_run_assets(run_dir: str | Path, model_cfg: ModelConfig, record: RunData,
                     copy_limit: int = COPY_LIMIT_BYTES) -> RunData:
    """Copy or record what inference needs (see the module docstring); returns ``record`` naming the copies."""
    run_dir = Path(run_dir)
    root = run_dir / ASSETS_DIR
    staging = root.with_name(root.name + PARTIAL_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)
    (staging / ASSETS_MODEL_DIR).mkdir(parents=True)
    (staging / ASSETS_IMAGE_TOKENIZER_DIR).mkdir()
    copied: dict[str, str] = {}
    external: dict[str, ExternalFile] = {}
    backbone = model_cfg.backbone

    for path in backbone.inference_files(model_cfg):
        shutil.copy2(path, staging / ASSETS_MODEL_DIR / path.name)
        copied[f"{ASSETS_MODEL_DIR}/{path.name}"] = str(path)
    base = backbone.base_weights(model_cfg)
    if base and _tensor_bytes(base) <= copy_limit:
        save_file({k: v.contiguous() for k, v in base.items()}, str(staging / ASSETS_MODEL_DIR / BASE_WEIGHTS_FILE))
        copied[f"{ASSETS_MODEL_DIR}/{BASE_WEIGHTS_FILE}"] = model_cfg.path or f"built in code (model.source={backbone.name})"
    elif base:
        external["base_weights"] = ExternalFile(
            path=str(Path(model_cfg.path).resolve()), size=_tensor_bytes(base), sha256=tensors_sha256(base),
            key="--base_model", kind="base_weights",
            what="the base checkpoint whose untrained tensors (e.g. Chameleon's VQ encoder) an export carries",
        )

    def in_assets(name: str) -> str:
        return f"{ASSETS_DIR}/{ASSETS_IMAGE_TOKENIZER_DIR}/{name}"  # relative to the run directory

    tokenizer_config, tokenizer_checkpoint = record.vqgan_config, record.vqgan_checkpoint
    inline = inline_image_tokenizer_config(record.source) if record.source else None
    if inline is not None and not tokenizer_config:
        (staging / ASSETS_IMAGE_TOKENIZER_DIR / INLINE_TOKENIZER_CONFIG).write_text(yaml.safe_dump(inline, sort_keys=False))
        tokenizer_config = in_assets(INLINE_TOKENIZER_CONFIG)
    elif tokenizer_config and Path(tokenizer_config).is_file():
        shutil.copy2(tokenizer_config, staging / ASSETS_IMAGE_TOKENIZER_DIR / Path(tokenizer_config).name)
        copied[f"{ASSETS_IMAGE_TOKENIZER_DIR}/{Path(tokenizer_config).name}"] = tokenizer_config
        tokenizer_config = in_assets(Path(tokenizer_config).name)
    if tokenizer_checkpoint and Path(tokenizer_checkpoint).is_file():
        source = Path(tokenizer_checkpoint)
        if source.stat().st_size <= copy_limit:
            shutil.copy2(source, staging / ASSETS_IMAGE_TOKENIZER_DIR / source.name)
            copied[f"{ASSETS_IMAGE_TOKENIZER_DIR}/{source.name}"] = str(source)
            tokenizer_checkpoint = in_assets(source.name)
        else:
            external["vqgan_checkpoint"] = ExternalFile(
                path=str(source.resolve()), size=source.stat().st_size, sha256=file_sha256(source),
                key="vqgan_checkpoint", what="the image tokenizer's weights",
            )
    atomic_write_json(staging / ASSETS_MANIFEST, {
        "copied": copied, "external": {name: asdict(entry) for name, entry in external.items()},
    })
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return replace(record, vqgan_config=tokenizer_config, vqgan_checkpoint=tokenizer_checkpoint)
