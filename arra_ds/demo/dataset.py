"""Built-in demo data set for the embedded default run: images drawn in code, pre-tokenised for real.

A few hundred small pictures of coloured circles, squares and triangles on a plain background,
each with a caption that states its global content (shapes, colours, positions, counts, sizes):

    "a large red circle at the top left on a black background"
    "a green square at the center and a blue triangle at the bottom right on a gray background"
    "three yellow triangles on a white background"

They are written as a conversation JSON + PNG files and go through ``run_pretokenize`` (the same
crop, VQGAN, text layout, feature encoders and MDS writer as real data) with tiny models built here:
the debug tokenizer (``build_debug_tokenizer``; the captions only use its words), a tiny VQGAN and
a tiny open_clip ViT whose [CLS] embedding is ``feat_demo``. Everything lives under
``$ARRA_DS_CACHE/demo/<hash of the config>/`` (``models/`` holds the tiny VQGAN, tokenizer and
encoder, e.g. ``load_demo_vqgan`` to decode generated demo images).
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

from arra_ds.data.pretokenize import PretokenizeConfig, run_pretokenize
from arra_ds.data.images import ImagePreprocessConfig
from arra_ds.demo.config import DEMO_VERSION, DemoDataConfig
from arra_ds.demo.models import build_demo_models, demo_model_paths
from arra_ds.demo.scenes import draw_scene, random_scene
from arra_ds.tokens.layout import IMAGE_PLACEHOLDER
from arra_ds.tokens.vqgan import VQGAN


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
        items.append({
            "id": f"demo-{index:05d}",
            "conversations": [{"from": "human", "value": caption}, {"from": "gpt", "value": IMAGE_PLACEHOLDER}],
            "image": [name],
        })
    path = source_dir / "conversations.json"
    path.write_text(json.dumps(items, indent=1))
    return path




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


def write_demo_dataset(out_dir: str | Path, cfg: DemoDataConfig, seed: int = 0) -> Path:
    """Draw, pre-tokenise and write the demo MDS data set to ``out_dir`` (built aside, then renamed)."""
    out_dir = Path(out_dir)
    if (out_dir / "index.json").is_file():
        return out_dir
    cfg.validate()
    # Unique per writer: nodes of a multi-node job share the cache directory, and pids repeat across hosts.
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    json_path = write_demo_images(tmp / "source", cfg, seed)
    items = json.loads(json_path.read_text())
    models = build_demo_models(tmp / "models", cfg, seed, [tmp / "source" / it["image"][0] for it in items])
    check_captions_in_vocabulary([it["conversations"][0]["value"] for it in items], Tokenizer.from_file(str(models.tokenizer)))
    summary = run_pretokenize(PretokenizeConfig(
        input=str(json_path), out_dir=str(tmp), tokenizer=str(models.tokenizer),
        vqgan_yaml=str(models.vqgan_yaml), vqgan_ckpt=str(models.vqgan_ckpt), encoders=models.encoders,
        image=ImagePreprocessConfig(target_size=cfg.image_size, crop="square"), min_image_size=cfg.image_size,
        # one part (= one shard) per samples_per_shard items: exact shard sizes, merged by merge_index
        batch_size=64, num_workers=0, items_per_part=cfg.samples_per_shard, channels_last=True, progress=False,
    ))
    if summary["skipped"]:
        raise RuntimeError(f"the demo data set lost {summary['skipped']} items: {summary['skipped_by_reason']}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"demo data: {summary['written']} drawn images pre-tokenised into {out_dir}", flush=True)
    return out_dir


def load_demo_vqgan(data_dir: str | Path) -> VQGAN:
    """The tiny VQGAN a demo data set was tokenised with (e.g. to decode generated demo images)."""
    paths = demo_model_paths(Path(data_dir) / "models")
    return VQGAN.from_original(paths.vqgan_yaml, paths.vqgan_ckpt)
