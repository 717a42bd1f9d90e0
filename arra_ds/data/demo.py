"""Built-in demo data set for the embedded default run: synthetic, learnable token sequences.

Each sample picks a colour, a shape and a position; the caption says so ("a red circle at the top
left"), the image codes follow a colour-specific code range laid out in a shape- and
position-specific pattern, and the global feature is a fixed class vector plus noise. A tiny model
can learn all three relations in a few hundred steps, so "loss goes down" and "cos goes up" are
visible on a laptop. The layout and MDS schema are those of real pre-tokenised data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from arra_ds.data.schema import columns_for
from arra_ds.data.sequence import conversation_tokens, image_to_tokens
from arra_ds.model.vocab import ChameleonVocab, build_debug_tokenizer

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "cross", "ring", "bar")
POSITIONS = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
DEMO_ENCODER = "demo"


@dataclass
class DemoDataConfig:
    num_samples: int = 512
    code_size: int = 8  # the image is code_size x code_size VQ codes
    feature_dim: int = 32  # width of the synthetic global feature (feat_demo)
    num_image_codes: int = 256  # must match model.debug.num_image_codes
    samples_per_shard: int = 128

    def validate(self) -> None:
        from arra_ds.config import ConfigError

        if self.code_size % 4 or self.code_size < 4:
            raise ConfigError(f"data.demo.code_size={self.code_size} must be a positive multiple of 4")
        if self.num_image_codes < 2 * len(COLOURS):
            raise ConfigError(f"data.demo.num_image_codes={self.num_image_codes} must be >= {2 * len(COLOURS)}")
        if self.num_samples < 1 or self.feature_dim < 1 or self.samples_per_shard < 1:
            raise ConfigError("data.demo sizes must be positive")


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """[size, size] bool pattern of one shape inside a quadrant."""
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "cross":
        return (np.abs(yy - c) < 1) | (np.abs(xx - c) < 1)
    if shape == "ring":
        r = np.hypot(yy - c, xx - c)
        return (r > size / 4) & (r < size / 2 + 0.5)
    if shape == "bar":
        return np.abs(yy - c) < 1
    raise ValueError(shape)


def make_demo_sample(index: int, cfg: DemoDataConfig, vocab: ChameleonVocab, tokenizer, class_vectors: np.ndarray, rng):
    colour = int(rng.integers(len(COLOURS)))
    shape = int(rng.integers(len(SHAPES)))
    position = int(rng.integers(len(POSITIONS)))
    caption = f"a {COLOURS[colour]} {SHAPES[shape]} at the {POSITIONS[position][0]} {POSITIONS[position][1]}"

    size, half = cfg.code_size, cfg.code_size // 2
    band = cfg.num_image_codes // (2 * len(COLOURS))  # codes per colour band; the upper half is background
    background = rng.integers(cfg.num_image_codes // 2, cfg.num_image_codes, size=(size, size))
    foreground = colour * band + rng.integers(0, band, size=(size, size))
    mask = np.zeros((size, size), bool)
    y0, x0 = (position // 2) * half, (position % 2) * half
    mask[y0 : y0 + half, x0 : x0 + half] = _shape_mask(SHAPES[shape], half)
    codes = torch.from_numpy(np.where(mask, foreground, background))

    class_id = (colour * len(SHAPES) + shape) * len(POSITIONS) + position
    feature = class_vectors[class_id] + 0.1 * rng.standard_normal(cfg.feature_dim)
    prompt_ids = tokenizer.encode(caption, add_special_tokens=False).ids
    tokens, prompt_len = conversation_tokens(prompt_ids, image_to_tokens(codes, vocab), vocab)
    return {
        "tokens": np.asarray(tokens, dtype=np.int32),
        "prompt_len": np.int32(prompt_len),
        f"feat_{DEMO_ENCODER}": feature.astype(np.float16),
        "caption": caption,
        "uid": f"demo-{index:06d}",
    }


def cache_root() -> Path:
    return Path(os.environ.get("ARRA_DS_CACHE", Path.home() / ".cache" / "arra_ds"))


def demo_dir(cfg: DemoDataConfig, seed: int) -> Path:
    key = json.dumps({**asdict(cfg), "seed": seed, "version": 1}, sort_keys=True)
    return cache_root() / "demo" / hashlib.sha256(key.encode()).hexdigest()[:12]


def write_demo_dataset(out_dir: str | Path, cfg: DemoDataConfig, seed: int = 0) -> Path:
    """Write the demo MDS data set to ``out_dir`` (atomically: built aside, then renamed)."""
    from streaming import MDSWriter

    out_dir = Path(out_dir)
    if (out_dir / "index.json").is_file():
        return out_dir
    # Unique per writer: nodes of a multi-node job share the cache directory, and pids repeat across hosts.
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = build_debug_tokenizer(num_image_codes=cfg.num_image_codes)
    vocab = ChameleonVocab(tokenizer.get_vocab(with_added_tokens=True), source="debug tokenizer")
    rng = np.random.default_rng(seed)
    num_classes = len(COLOURS) * len(SHAPES) * len(POSITIONS)
    class_vectors = rng.standard_normal((num_classes, cfg.feature_dim))
    class_vectors /= np.linalg.norm(class_vectors, axis=1, keepdims=True)
    samples = [make_demo_sample(i, cfg, vocab, tokenizer, class_vectors, rng) for i in range(cfg.num_samples)]
    sample_bytes = max(len(s["tokens"]) * 4 + cfg.feature_dim * 2 + 128 for s in samples)
    with MDSWriter(
        out=str(tmp),
        columns=columns_for([DEMO_ENCODER]),
        size_limit=sample_bytes * cfg.samples_per_shard,
        progress_bar=False,
    ) as writer:
        for sample in samples:
            writer.write(sample)
    (tmp / "tokenizer.json").write_text(tokenizer.to_str())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
