"""The study's target encoder: a tiny open_clip CLIP trained contrastively on the train split.

ARRA aligns the LLM with a *foundation* encoder's global feature, one that knows the domain. A
random encoder carries little to learn (with the demo's random tiny CLIP the alignment cosine is
0.94 after 100 steps), so the study trains one: open_clip's own ``CLIP`` (ViT image tower, text
transformer, open_clip's BPE tokenizer) on (picture, caption) pairs of the train split, with the
symmetric InfoNCE loss. Pictures that share a caption are all positives of each other (soft
targets), so repeated captions ("three red squares") are not pushed apart. Part of the pictures are
shown as 16-px patch means, which is what decoded VQ codes look like, so the encoder also reads the
generated pictures it scores (CLIP-Score).

It is saved in open_clip's local-directory format (``open_clip_config.json`` + safetensors), the
layout of BiomedCLIP's release: pre-tokenization loads it as the encoder of ``feat_<name>``
(``arra_ds.data.features``), the evaluation as ``clip_model=local-dir:<dir>``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from arra_ds.data.features import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, OpenClipPreprocess
from arra_ds.study.config import ClipTrainConfig
from arra_ds.tokens.layout import CODE_PATCH_PX

HEAD_WIDTH = 16  # attention head width of both towers
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25  # the preprocessing of arra_ds's tiny open_clip encoders


def clip_configs(cfg: ClipTrainConfig, vocab_size: int) -> tuple[dict, dict]:
    """(open_clip model_cfg, preprocess_cfg) of the study's CLIP."""
    model_cfg = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": cfg.image_size, "layers": cfg.layers, "width": cfg.width,
                       "patch_size": cfg.patch_size, "head_width": HEAD_WIDTH},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": vocab_size, "width": cfg.text_width,
                     "heads": max(1, cfg.text_width // HEAD_WIDTH), "layers": cfg.text_layers},
    }
    preprocess_cfg = {"size": cfg.image_size, "mean": [PIXEL_MEAN] * 3, "std": [PIXEL_STD] * 3,
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    return model_cfg, preprocess_cfg


def blocky(image: Image.Image) -> Image.Image:
    """The picture as 16-px patch means (what a decoded demo VQ code grid looks like)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = pixels.shape[0] // CODE_PATCH_PX, pixels.shape[1] // CODE_PATCH_PX
    means = pixels[: h * CODE_PATCH_PX, : w * CODE_PATCH_PX].reshape(h, CODE_PATCH_PX, w, CODE_PATCH_PX, 3).mean(axis=(1, 3))
    blocks = np.repeat(np.repeat(means, CODE_PATCH_PX, axis=0), CODE_PATCH_PX, axis=1)
    return Image.fromarray(np.clip(blocks + 0.5, 0, 255).astype(np.uint8))


def _lr(step: int, cfg: ClipTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only (not biases, norms, embeddings' scale or the logit scale)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    rest = [p for p in trained if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train_clip(cfg: ClipTrainConfig, image_paths: list[Path], captions: list[str], out_dir: Path, seed: int,
               progress: bool = True) -> dict:
    """Train the CLIP on (picture, caption) pairs and save it to ``out_dir``; returns a summary."""
    # open_clip (and timm behind it) costs seconds to import: only where the study's CLIP is built
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer(context_length=cfg.context_length)
    model_cfg, preprocess_cfg = clip_configs(cfg, tokenizer.vocab_size)
    too_long = [c for c in captions if len(tokenizer.encode(c)) + 2 > cfg.context_length]
    if too_long:
        raise ValueError(f"{len(too_long)} captions exceed clip.context_length={cfg.context_length}, e.g. {too_long[0]!r}")
    preprocess = OpenClipPreprocess(preprocess_cfg)
    views = []  # [2, N, 3, S, S] float16: the drawn picture and its blocky version
    for path in tqdm(image_paths, desc="clip: read pictures", disable=not progress, dynamic_ncols=True):
        with Image.open(path) as image:
            image = image.convert("RGB")
            views.append(torch.stack([preprocess(image), preprocess(blocky(image))]).half())
    pictures = torch.stack(views, dim=1)
    tokens = tokenizer(captions)  # [N, context]
    caption_ids = torch.tensor(np.unique(np.asarray(captions), return_inverse=True)[1])  # [N]

    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    model.train()
    # The token embeddings stay at their random init: the captions use ~40 of the BPE vocabulary's
    # ids, and Adam on the whole [vocab, width] table would cost more than the rest of the model.
    model.token_embedding.requires_grad_(False)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    generator = torch.Generator().manual_seed(seed)
    batch = min(cfg.batch_size, len(captions))
    losses = []
    bar = tqdm(range(cfg.steps), desc="clip: train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, cfg)
        index = torch.randperm(len(captions), generator=generator)[:batch]
        view = (torch.rand(batch, generator=generator) < cfg.blocky_fraction).long()
        images = pictures[view, index].float()
        image_emb = model.encode_image(images, normalize=True)  # [B, D]
        text_emb = model.encode_text(tokens[index], normalize=True)  # [B, D]
        logits = model.logit_scale.exp() * image_emb @ text_emb.t()  # [B, B]
        same = (caption_ids[index][:, None] == caption_ids[index][None]).float()
        targets = same / same.sum(dim=1, keepdim=True)  # symmetric: equal captions are mutual positives
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    bar.close()

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out_dir / OPEN_CLIP_WEIGHTS[0]))
    return {"steps": cfg.steps, "pairs": len(captions), "final_loss": float(np.mean(losses[-20:])),
            "first_loss": float(np.mean(losses[:20]))}


@torch.inference_mode()
def retrieval_accuracy(clip_dir: Path, images: list[Image.Image], captions: list[str]) -> float:
    """Top-1 picture -> caption retrieval among ``captions`` (distinct): does the CLIP know the domain?"""
    # open_clip (and timm behind it) costs seconds to import: only where the study's CLIP is used
    import open_clip

    model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    model.eval()
    image_emb = model.encode_image(torch.stack([preprocess(image) for image in images]), normalize=True)
    text_emb = model.encode_text(tokenizer(captions), normalize=True)
    best = (image_emb @ text_emb.t()).argmax(dim=1)
    return float((best == torch.arange(len(captions))).float().mean())
