"""The trainer's record of its data (``<run dir>/arra_data.json``, read back by ``arra_ds.checkpoints.read_run_data``).

Generation and evaluation need to know what the model was trained on: the image grid (sampling
defaults to it), the VQGAN that turned pictures into codes (its decoder turns generated codes into
pictures), the alignment encoder and, for the demo, held-out prompts and an evaluation that works
offline on its domain. The trainer knows all of it:

- the grid from the first training sample (text-to-image or class-to-image);
- for the built-in demo data: its models (``<demo dir>/models``) and held-out split;
- for pre-tokenised data on a local path: ``pretokenize_meta.json`` next to the shards (the image tokenizer,
  text tokenizer and encoder files the pre-tokenizer used, as absolute paths). Data read from a remote
  store has no such file here: those fields stay empty and generation asks for them.

The trainer then copies the small files among them into the run (``train/run_assets.py``), so the record it
writes points at the copies.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from arra_ds.checkpoints import RUN_DATA_FILE, RunData
from arra_ds.data.features import OPEN_CLIP_CONFIG
from arra_ds.data.pretokenize.config import META_FILE, PretokenizeError
from arra_ds.demo.dataset import demo_heldout_dir, demo_models
from arra_ds.generate.prompts import load_prompts
from arra_ds.io import atomic_write_json, read_json
from arra_ds.tokens.vocab import ChameleonVocab

# FID on the demo: Frechet distance of 8 x 8 mean-colour thumbnails (arra_ds/eval/extractors.py). No
# Inception or XRV weights exist offline, and the demo encoder is the alignment target itself.
DEMO_FID_EXTRACTORS = ["thumbnail"]
DEMO_NOTES = {
    "extractors": "demo data: FID uses 8x8 mean-colour thumbnails (the demo's flat shapes: colour and layout are "
    "its content), not Inception features; its values are not comparable with published FIDs",
    "clip_model": "demo data: CLIP-Score uses the demo encoder, a random tiny open_clip (image tower centred on the "
    "demo images, text tower untrained): the score checks the pipeline, not prompt fidelity, and near or below 0 is "
    "what an untrained text tower gives",
}


def _grid_of_first_sample(source: str, dataset, vocab: ChameleonVocab | None) -> tuple[int, int]:
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
    (the demo's cache directory), the open ``dataset`` and the model's text ``vocab`` (None: a class-conditional
    backbone, whose data holds class labels and the image's codes)."""
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
    meta = read_json(meta_path, PretokenizeError, hint="it is the pre-tokenizer's record of its settings")
    tokenizer_config, tokenizer_checkpoint = image_tokenizer_files(meta)
    if tokenizer_checkpoint and Path(tokenizer_checkpoint).is_file() and (not tokenizer_config or Path(tokenizer_config).is_file()):
        record.vqgan_config, record.vqgan_checkpoint = tokenizer_config, tokenizer_checkpoint
    record.tokenizer = meta.get("tokenizer", "")
    record.rep_token = bool(meta.get("rep_token", False))
    encoder = next((e for e in meta.get("encoders", []) if e.get("name") == encoder_name), {})
    record.encoder = encoder
    record.clip_model = _open_clip_model(encoder)
    return record


def image_tokenizer_files(meta: dict) -> tuple[str, str]:
    """(config, weights) of the image tokenizer a pre-tokenizer's meta names: Chameleon's ``vqgan`` [yaml, ckpt]
    (launch/pretokenize.py), or LlamaGen's ``vq_ckpt`` with its architecture inline (``vq``, written by the run's
    assets as a yaml; launch/pretokenize_imagefolder.py)."""
    if meta.get("vqgan"):
        config, checkpoint = (list(meta["vqgan"]) + ["", ""])[:2]
        return config, checkpoint
    return "", meta.get("vq_ckpt", "")


def inline_image_tokenizer_config(data_path: str) -> dict | None:
    """The image tokenizer's architecture that a pre-tokenizer's meta holds inline (LlamaGen's ``vq``), if any."""
    meta_path = Path(data_path) / META_FILE
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path, PretokenizeError, hint="it is the pre-tokenizer's record of its settings")
    return meta.get("vq") if isinstance(meta.get("vq"), dict) else None


def write_data_record(run_dir: str | Path, record: RunData) -> Path:
    path = Path(run_dir) / RUN_DATA_FILE
    atomic_write_json(path, asdict(record))
    return path
