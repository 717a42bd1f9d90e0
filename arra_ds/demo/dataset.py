"""Built-in demo data set for the embedded default run: images drawn in code, pre-tokenised for real.

A few hundred small pictures of coloured circles, squares and triangles on a plain background,
each with a caption that states its global content (shapes, colours, positions, counts, sizes):

    "a large red circle at the top left on a black background"
    "a green square at the center and a blue triangle at the bottom right on a gray background"
    "three yellow triangles on a white background"

They are written as a conversation JSON + PNG files and go through ``run_pretokenize`` (the same
crop, VQGAN, text layout, feature encoders and MDS writer as real data) with tiny models built here:
the debug tokenizer (``build_debug_tokenizer``; the captions only use its words), a tiny VQGAN and
a tiny open_clip ViT whose [CLS] embedding is ``feat_demo`` and whose patch features are ``patch_demo``
(4 x 4 patches, for ``align.feature=patch``). Everything lives under
``$ARRA_DS_CACHE/demo/<hash of the config>/`` (``models/`` holds the tiny VQGAN, tokenizer and
encoder, e.g. ``load_demo_vqgan`` to decode generated demo images).

A held-out split (``heldout/``, ``demo.num_heldout`` scenes) goes through the same pipeline with the
same models: its captions occur nowhere in the training split, and as an MDS directory it gives the
evaluation the exact prompt ids and the real images' VQ codes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from arra_ds.data.images import ImagePreprocessConfig
from arra_ds.data.pretokenize import PretokenizeConfig, run_pretokenize
from arra_ds.demo.config import DEMO_VERSION, DemoDataConfig
from arra_ds.demo.models import DemoModels, build_demo_models, demo_model_paths
from arra_ds.demo.scenes import draw_scene, random_scene
from arra_ds.errors import ConfigError
from arra_ds.tokens.layout import IMAGE_PLACEHOLDER
from arra_ds.tokens.vqgan import VQGAN

HELDOUT_DIR = "heldout"  # the held-out split, an MDS directory inside the demo data directory
MODELS_DIR = "models"  # the tiny tokenizer, VQGAN and encoder the data was pre-tokenised with
HELDOUT_STREAM = 1  # the held-out scenes draw from their own random stream: (seed, HELDOUT_STREAM)
HELDOUT_DRAWS_PER_SCENE = 200  # give up (the caption space is used up) after this many draws per wanted scene


def conversation_item(uid: str, caption: str, image_name: str) -> dict:
    return {
        "id": uid,
        "conversations": [{"from": "human", "value": caption}, {"from": "gpt", "value": IMAGE_PLACEHOLDER}],
        "image": [image_name],
    }


def _write_items(source_dir: Path, items: list[dict]) -> Path:
    path = source_dir / "conversations.json"
    path.write_text(json.dumps(items, indent=1))
    return path


def write_demo_images(source_dir: Path, cfg: DemoDataConfig, seed: int) -> Path:
    """PNG files + the conversation JSON (ARRA / Lumina-mGPT format); returns the JSON path."""
    images_dir = source_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for index in range(cfg.num_samples):
        shapes, background, caption = random_scene(rng)
        name = f"images/demo-{index:05d}.png"
        draw_scene(shapes, background, cfg.image_size, rng).save(source_dir / name)
        items.append(conversation_item(f"demo-{index:05d}", caption, name))
    return _write_items(source_dir, items)


def write_heldout_images(source_dir: Path, cfg: DemoDataConfig, seed: int, training_captions: set[str]) -> Path:
    """``cfg.num_heldout`` scenes whose captions differ from every training caption and from each other.

    They come from their own random stream, so the training set does not depend on ``num_heldout``.
    """
    images_dir = source_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, HELDOUT_STREAM])
    items: list[dict] = []
    seen = set(training_captions)
    for _ in range(HELDOUT_DRAWS_PER_SCENE * cfg.num_heldout):
        if len(items) == cfg.num_heldout:
            break
        shapes, background, caption = random_scene(rng)
        if caption in seen:
            continue
        seen.add(caption)
        index = len(items)
        name = f"images/heldout-{index:05d}.png"
        draw_scene(shapes, background, cfg.image_size, rng).save(source_dir / name)
        items.append(conversation_item(f"heldout-{index:05d}", caption, name))
    if len(items) < cfg.num_heldout:
        raise ConfigError(
            f"demo.num_heldout={cfg.num_heldout}: only {len(items)} scene captions are left that the "
            f"{cfg.num_samples} training scenes do not use; lower demo.num_heldout or demo.num_samples"
        )
    return _write_items(source_dir, items)


def cache_root() -> Path:
    return Path(os.environ.get("ARRA_DS_CACHE", Path.home() / ".cache" / "arra_ds"))


def demo_dir(cfg: DemoDataConfig, seed: int) -> Path:
    key = json.dumps({**asdict(cfg), "seed": seed, "version": DEMO_VERSION}, sort_keys=True)
    return cache_root() / "demo" / hashlib.sha256(key.encode()).hexdigest()[:12]


def check_captions_in_vocabulary(captions: list[str], tokenizer) -> None:
    unknown = tokenizer.token_to_id("<unk>")
    for caption in captions:
        ids = tokenizer.encode(caption, add_special_tokens=False).ids
        if unknown in ids:
            words = [w for w, i in zip(caption.split(), ids) if i == unknown]
            raise ValueError(f"demo caption {caption!r} has words {words} outside the debug tokenizer's vocabulary")


def _pretokenize(json_path: Path, out_dir: Path, models: DemoModels, cfg: DemoDataConfig) -> dict:
    """The real pre-tokenization pipeline on a demo split; every item must make it."""
    summary = run_pretokenize(PretokenizeConfig(
        input=str(json_path), out_dir=str(out_dir), tokenizer=str(models.tokenizer),
        vqgan_yaml=str(models.vqgan_yaml), vqgan_ckpt=str(models.vqgan_ckpt), encoders=models.encoders,
        image=ImagePreprocessConfig(target_size=cfg.image_size, crop="square"), min_image_size=cfg.image_size,
        patch_features=True,  # patch_demo too: align.feature=patch runs on the default data
        # one part (= one shard) per samples_per_shard items: exact shard sizes, merged by merge_index
        batch_size=64, num_workers=0, items_per_part=cfg.samples_per_shard, channels_last=True, progress=False,
    ))
    if summary["skipped"]:
        raise RuntimeError(f"the demo data set lost {summary['skipped']} items: {summary['skipped_by_reason']}")
    return summary


def write_demo_dataset(out_dir: str | Path, cfg: DemoDataConfig, seed: int = 0) -> Path:
    """Draw, pre-tokenise and write the demo MDS data set to ``out_dir`` (built aside, then renamed).

    ``out_dir`` holds the training split (``index.json`` and its shards), the held-out split
    (``heldout/``, an MDS directory of ``demo.num_heldout`` scenes whose captions no training scene
    has), the tiny models (``models/``) and the drawn pictures with their conversation JSON.
    """
    out_dir = Path(out_dir)
    if (out_dir / "index.json").is_file():
        return out_dir
    cfg.validate()
    # Unique per writer: nodes of a multi-node job share the cache directory, and pids repeat across hosts.
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    json_path = write_demo_images(tmp / "source", cfg, seed)
    items = json.loads(json_path.read_text())
    captions = [it["conversations"][0]["value"] for it in items]
    models = build_demo_models(tmp / MODELS_DIR, cfg, seed, [tmp / "source" / it["image"][0] for it in items])
    tokenizer = Tokenizer.from_file(str(models.tokenizer))
    check_captions_in_vocabulary(captions, tokenizer)
    summary = _pretokenize(json_path, tmp, models, cfg)
    if cfg.num_heldout:
        heldout_json = write_heldout_images(tmp / "heldout_source", cfg, seed, set(captions))
        check_captions_in_vocabulary([it["conversations"][0]["value"] for it in json.loads(heldout_json.read_text())], tokenizer)
        _pretokenize(heldout_json, tmp / HELDOUT_DIR, models, cfg)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    heldout = f" (+ {cfg.num_heldout} held-out scenes in {out_dir / HELDOUT_DIR})" if cfg.num_heldout else ""
    print(f"demo data: {summary['written']} drawn images pre-tokenised into {out_dir}{heldout}", flush=True)
    return out_dir


def demo_models(data_dir: str | Path) -> DemoModels:
    """The tokenizer, VQGAN and encoder files a demo data set was pre-tokenised with."""
    return demo_model_paths(Path(data_dir) / MODELS_DIR)


def demo_heldout_dir(data_dir: str | Path) -> Path:
    """The held-out split of a demo data set (an MDS directory; absent with demo.num_heldout=0)."""
    return Path(data_dir) / HELDOUT_DIR


def load_demo_vqgan(data_dir: str | Path) -> VQGAN:
    """The tiny VQGAN a demo data set was tokenised with (e.g. to decode generated demo images)."""
    paths = demo_models(data_dir)
    return VQGAN.from_original(paths.vqgan_yaml, paths.vqgan_ckpt)
