"""The trainer's record of its data (``<run dir>/arra_data.json``, read back by ``arra_ds.checkpoints.read_run_data``).

Generation and evaluation need to know what the model was trained on: the image grid (sampling
defaults to it), the VQGAN that turned pictures into codes (its decoder turns generated codes into
pictures), the alignment encoder and, for the demo, held-out prompts and an evaluation that works
offline on its domain. The trainer knows all of it:

- the grid from the first training sample;
- for the built-in demo data: its models (``<demo dir>/models``) and held-out split;
- for pre-tokenised data on a local path: ``pretokenize_meta.json`` next to the shards (the VQGAN,
  tokenizer and encoder files the pre-tokenizer used, as absolute paths). Data read from a remote
  store has no such file here: those fields stay empty and generation asks for them.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from arra_ds.checkpoints import RUN_DATA_FILE, RunData
from arra_ds.data.features import OPEN_CLIP_CONFIG
from arra_ds.data.pretokenize.config import META_FILE
from arra_ds.demo.dataset import demo_heldout_dir, demo_models
from arra_ds.generate.prompts import load_prompts
from arra_ds.io import atomic_write_json
from arra_ds.tokens.vocab import ChameleonVocab

# FID on the demo: Frechet distance of 8 x 8 mean-colour thumbnails (arra_ds/eval/extractors.py). No
# Inception or XRV weights exist offline, and the demo encoder is the alignment target itself.
DEMO_FID_EXTRACTORS = ["thumbnail"]
DEMO_NOTES = {
    "extractors": "demo data: FID uses 8x8 mean-colour thumbnails (the demo's flat shapes: colour and layout are "
    "its content), not Inception features; its values are not comparable with published FIDs",
    "clip_model": "demo data: CLIP-Score uses the demo encoder, a random tiny open_clip (image tower centred on the "
    "demo images, text tower untrained); the score checks the pipeline, not prompt fidelity",
}


def _grid_of_first_sample(source: str, dataset, vocab: ChameleonVocab) -> tuple[int, int]:
    prompts = load_prompts(source, vocab, 1, dataset=dataset).prompts
    if not prompts or prompts[0].real_codes is None:
        return 0, 0
    height, width = prompts[0].real_codes.shape
    return int(height), int(width)


def _open_clip_model(encoder: dict) -> str:
    """clip_model= for an open_clip encoder saved as a local directory, else "" (unknown)."""
    path = Path(encoder.get("path", ""))
    if encoder.get("kind") == "open_clip" and encoder.get("path") and (path / OPEN_CLIP_CONFIG).is_file():
        return f"local-dir:{path}"
    return ""


def describe_training_data(
    data_path: str, is_demo: bool, local_dir: str, dataset, vocab: ChameleonVocab | None, encoder_name: str
) -> RunData:
    """What the run learns from: ``data_path`` as configured, ``local_dir`` where its shards are read
    (the demo's cache directory), the open ``dataset`` and the model's ``vocab`` (None: a class-conditional
    backbone, whose generation and evaluation read their settings from the c2i configs, not from this record)."""
    if vocab is None:
        return RunData(source=data_path)
    code_height, code_width = _grid_of_first_sample(local_dir, dataset, vocab)
    record = RunData(source=local_dir if is_demo else data_path, code_height=code_height, code_width=code_width)
    if is_demo:
        models = demo_models(local_dir)
        encoder = next((asdict(e) for e in models.encoders if e.name == encoder_name), asdict(models.encoders[0]))
        heldout = demo_heldout_dir(local_dir)
        record.vqgan_config, record.vqgan_checkpoint = str(models.vqgan_yaml), str(models.vqgan_ckpt)
        record.tokenizer = str(models.tokenizer)
        record.encoder = encoder
        record.heldout_prompts = str(heldout) if (heldout / "index.json").is_file() else ""
        record.extractors = list(DEMO_FID_EXTRACTORS)
        record.clip_model = _open_clip_model(encoder)
        record.notes = dict(DEMO_NOTES)
        return record
    meta_path = Path(data_path) / META_FILE
    if not meta_path.is_file():
        return record
    meta = json.loads(meta_path.read_text())
    vqgan_yaml, vqgan_ckpt = (meta.get("vqgan") or ["", ""])[:2]
    if vqgan_yaml and vqgan_ckpt and Path(vqgan_yaml).is_file() and Path(vqgan_ckpt).is_file():
        record.vqgan_config, record.vqgan_checkpoint = vqgan_yaml, vqgan_ckpt
    record.tokenizer = meta.get("tokenizer", "")
    encoder = next((e for e in meta.get("encoders", []) if e.get("name") == encoder_name), {})
    record.encoder = encoder
    record.clip_model = _open_clip_model(encoder)
    return record


def write_data_record(run_dir: str | Path, record: RunData) -> Path:
    path = Path(run_dir) / RUN_DATA_FILE
    atomic_write_json(path, asdict(record))
    return path
