"""The demo's drawn scenes written as a user's own data would be: every input format of
``launch/pretokenize.py``, and the tiny models to pre-tokenise them with (``launch/demo_data.py``).

    <out_dir>/images/scene-00000.png      the pictures, each with its caption beside it
    <out_dir>/images/scene-00000.txt      (input_format=pairs: input=<out_dir>/images)
    <out_dir>/captions.jsonl              a caption table: {"image": "images/scene-00000.png", "caption": ...}
    <out_dir>/captions.csv                the same table as CSV (columns image, caption)
    <out_dir>/conversations.json          the ARRA / Lumina-mGPT conversation JSON
    <out_dir>/shards/scenes-000000.tar    WebDataset shards: scene-00000.png + scene-00000.txt, ...
    <out_dir>/models/                     the demo's tiny tokenizer, VQGAN and CLIP encoder (copied)
    <out_dir>/pretokenize.yaml            pre-tokenization settings for those models (as
                                          configs/pretokenize_arra512.yaml names Chameleon's files)

The scenes come from their own random stream (none is a training scene of the demo set). The
models are those the demo data set was pre-tokenised with (built first if the cache has none), so
samples pre-tokenised from here share the demo run's VQGAN codes, vocabulary and ``feat_demo`` encoder.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from arra_ds.demo.config import DEMO_ENCODER, DemoDataConfig
from arra_ds.demo.dataset import MODELS_DIR, conversation_item, demo_dir, demo_models, write_demo_dataset
from arra_ds.demo.scenes import draw_scene, random_scene
from arra_ds.errors import ConfigError

OWN_DATA_STREAM = 2  # random stream of these scenes: (seed, OWN_DATA_STREAM); the demo set uses 0 and 1
IMAGE_COLUMN, TEXT_COLUMN = "image", "caption"  # the table's columns (the pre-tokenizer's defaults)


@dataclass
class OwnDataConfig:
    out_dir: str = "my_data"
    num_samples: int = 64  # scenes drawn; every format holds all of them
    samples_per_shard: int = 32  # WebDataset shard size
    seed: int = 0  # the scenes' seed, and the demo data set whose models are copied (the run's seed)
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)  # the demo data set whose tiny models are copied

    def validate(self) -> None:
        if not self.out_dir:
            raise ConfigError("out_dir is empty: set the folder to write the example data set to")
        if min(self.num_samples, self.samples_per_shard) < 1:
            raise ConfigError("num_samples and samples_per_shard must be >= 1")
        self.demo.validate()


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _pretokenize_settings(out_dir: Path, image_size: int) -> dict:
    models = demo_models(out_dir)
    return {
        "tokenizer": str(models.tokenizer),
        "vqgan_yaml": str(models.vqgan_yaml),
        "vqgan_ckpt": str(models.vqgan_ckpt),
        # feat_demo: the column the demo run aligns to (align.encoder=demo)
        "encoders": [{"name": DEMO_ENCODER, "kind": "open_clip", "path": models.encoders[0].path}],
        "image": {"target_size": image_size, "crop": "square"},
        "min_image_size": image_size // 2,
        "num_workers": 0,  # a few dozen small pictures: worker processes would cost more than they save
    }


def write_own_data(cfg: OwnDataConfig) -> dict:
    """Draw the scenes and write every format, the models and ``pretokenize.yaml``; returns what was written."""
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    source = write_demo_dataset(demo_dir(cfg.demo, cfg.seed), cfg.demo, cfg.seed)  # the models to copy
    images_dir, shards_dir = out_dir / "images", out_dir / "shards"
    for folder in (images_dir, shards_dir):
        shutil.rmtree(folder, ignore_errors=True)  # a rerun replaces the example, never mixes two
        folder.mkdir(parents=True)
    rng = np.random.default_rng([cfg.seed, OWN_DATA_STREAM])
    rows = []
    for index in range(cfg.num_samples):
        shapes, background, caption = random_scene(rng)
        name = f"scene-{index:05d}"
        draw_scene(shapes, background, cfg.demo.image_size, rng).save(images_dir / f"{name}.png")
        (images_dir / f"{name}.txt").write_text(caption + "\n")
        rows.append({IMAGE_COLUMN: f"images/{name}.png", TEXT_COLUMN: caption})
    with open(out_dir / "captions.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    with open(out_dir / "captions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[IMAGE_COLUMN, TEXT_COLUMN])
        writer.writeheader()
        writer.writerows(rows)
    conversations = [conversation_item(Path(r[IMAGE_COLUMN]).stem, r[TEXT_COLUMN], r[IMAGE_COLUMN]) for r in rows]
    (out_dir / "conversations.json").write_text(json.dumps(conversations, indent=1))
    for shard, start in enumerate(range(0, len(rows), cfg.samples_per_shard)):
        with tarfile.open(shards_dir / f"scenes-{shard:06d}.tar", "w") as tar:
            for row in rows[start : start + cfg.samples_per_shard]:
                key = Path(row[IMAGE_COLUMN]).stem
                _add_file(tar, f"{key}.png", (out_dir / row[IMAGE_COLUMN]).read_bytes())
                _add_file(tar, f"{key}.txt", row[TEXT_COLUMN].encode())
    models_dir = out_dir / MODELS_DIR
    shutil.rmtree(models_dir, ignore_errors=True)
    shutil.copytree(source / MODELS_DIR, models_dir)
    settings = _pretokenize_settings(out_dir, cfg.demo.image_size)
    header = "# The demo's tiny models (launch/demo_data.py), as configs/pretokenize_arra512.yaml names Chameleon's files.\n"
    (out_dir / "pretokenize.yaml").write_text(header + yaml.safe_dump(settings, sort_keys=False))
    return {"out_dir": str(out_dir), "samples": len(rows), "shards": -(-len(rows) // cfg.samples_per_shard),
            "models": str(models_dir)}  # fmt: skip
