"""Tiny ARRA-Base assets for the class-to-image tests: a LlamaGen VQ, a GPT, an ImageFolder tree, an MDS set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from streaming import MDSWriter

from arra_ds.data.schema import CLASS_COLUMN, columns_for, feature_column
from arra_ds.model.llamagen.config import LlamaGenConfig
from arra_ds.model.llamagen.gpt import LlamaGenGPT
from arra_ds.tokens.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig

# VQ-16's five levels (stride 16) with few channels; a 64 px image is a 4 x 4 code grid.
TINY_VQ = LlamaGenVQConfig(
    codebook_size=64, codebook_embed_dim=8, base_channels=32, encoder_ch_mult=(1, 1, 2, 2, 2),
    decoder_ch_mult=(1, 1, 2, 2, 2), z_channels=32, num_res_blocks=1,
)
IMAGE_SIZE = 64
GRID = IMAGE_SIZE // 16
NUM_CLASSES = 3
# The GPT over that tokenizer: head_dim 8 (two row and two column rotation pairs).
TINY_GPT = dict(n_layer=2, n_head=2, dim=16, vocab_size=TINY_VQ.codebook_size, block_size=GRID * GRID,
                num_classes=NUM_CLASSES, multiple_of=8)
TINY_GPT_OVERRIDES = [f"model.llamagen.{k}={v}" for k, v in TINY_GPT.items()]


def save_tiny_vq(path: Path, seed: int = 0) -> LlamaGenVQ:
    """A random tiny VQ saved as upstream does ({"model": state_dict})."""
    torch.manual_seed(seed)
    vq = LlamaGenVQ(TINY_VQ)
    torch.save({"model": vq.state_dict()}, path)
    return vq


def tiny_gpt(seed: int = 0, head_std: float = 0.5, **overrides) -> LlamaGenGPT:
    """A c2i GPT (tiny unless ``overrides`` size it) with non-zero weights everywhere: upstream init leaves the
    head at zero, a trained head is not; ``head_std`` draws it. Shared by tests and bench/c2i_sampling.py."""
    torch.manual_seed(seed)
    model = LlamaGenGPT(LlamaGenConfig(**{**TINY_GPT, **overrides}))
    with torch.no_grad():
        model.output.weight.normal_(0.0, head_std)
    return model.eval()


def write_image_folder(root: Path, per_class: int = 2, seed: int = 0) -> list[tuple[str, int]]:
    """``root/class_<k>/img_<i>.JPEG`` smooth random images of varied sizes; returns (relative path, class)."""
    rng = np.random.default_rng(seed)
    written = []
    for k in range(NUM_CLASSES):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            width, height = int(rng.integers(70, 140)), int(rng.integers(70, 140))
            small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((width, height), Image.BICUBIC).save(folder / f"img_{i}.JPEG", quality=95)
            written.append((f"class_{k}/img_{i}.JPEG", k))
    return written


def write_c2i_mds(out: Path, num_samples: int, feature_dim: int = 8, seed: int = 0) -> Path:
    """Class-to-image samples whose codes a model can learn: each class has its own code pattern, with
    some codes redrawn at random, and a feature that depends on the class."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, TINY_VQ.codebook_size, (NUM_CLASSES, GRID * GRID))
    class_features = rng.normal(size=(NUM_CLASSES, feature_dim))
    with MDSWriter(out=str(out), columns=columns_for(["clip"], class_conditional=True), progress_bar=False) as writer:
        for i in range(num_samples):
            label = i % NUM_CLASSES
            codes = patterns[label].copy()
            noisy = rng.random(codes.shape) < 0.1
            codes[noisy] = rng.integers(0, TINY_VQ.codebook_size, int(noisy.sum()))
            writer.write({
                "tokens": codes.astype(np.int32), "prompt_len": np.int32(0), "caption": f"class {label}",
                "uid": f"sample-{i}", CLASS_COLUMN: np.int32(label),
                feature_column("clip"): (class_features[label] + 0.1 * rng.normal(size=feature_dim)).astype(np.float16),
            })
    return out
