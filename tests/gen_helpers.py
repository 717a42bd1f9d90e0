"""Tiny models and data for the generation / evaluation tests (built in tmp dirs, nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from arra_ds.generate.sampler import Sampler
from arra_ds.generate.sampling import SamplingConfig
from arra_ds.model.config import ModelConfig
from arra_ds.model.debug import DEBUG, DebugModelConfig
from arra_ds.tokens.layout import ImageGrid
from arra_ds.tokens.vocab import build_debug_tokenizer
from arra_ds.tokens.vqgan import VQGAN, VQGANConfig

NUM_CODES = 64
# f = 16 like Chameleon's VQGAN (5 levels), so a 64 x 64 image is 4 x 4 codes.
TINY_VQ = dict(n_embed=NUM_CODES, embed_dim=8, z_channels=16, ch=32, ch_mult=(1, 1, 2, 1, 1), num_res_blocks=1,
               attn_resolutions=(), resolution=32)
TINY_BACKBONE = DebugModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 num_image_codes=NUM_CODES, max_position_embeddings=512)
PROMPTS = [
    "a red circle at the top left",
    "two blue squares",
    "a green cross in the center",
    "a yellow ring on a dark background",
    "three small orange stars at the bottom right corner",
    "a purple bar",
]


def load_backbone(cfg: ModelConfig, **kwargs):
    """(model, vocab) of a Chameleon-family model config (``ChameleonFamily.load_backbone``)."""
    return cfg.backbone.load_backbone(cfg, **kwargs)


def backbone_skeleton(cfg: ModelConfig, dtype=torch.float32):
    """(the backbone of ``cfg`` on the meta device, its vocabulary): what a trained state dict is loaded into."""
    return cfg.backbone.skeleton(cfg, dtype), cfg.backbone.vocab(cfg)


def ImageSampler(backbone, vocab, cfg: SamplingConfig) -> Sampler:
    """The one sampler on a debug-backbone model, at the config's size."""
    return Sampler(DEBUG, backbone, vocab, cfg, DEBUG.sampling_grid(ModelConfig(), cfg.height, cfg.width))


def image_tokens(batch, i: int, vocab, cfg: SamplingConfig) -> list[int]:
    """Sample i's image part: the grid prefix, then every token the sampler drew or forced."""
    return ImageGrid.for_pixels(cfg.height, cfg.width).prefix(vocab) + batch.tokens[i].tolist()


def tiny_backbone(seed: int = 0, attn: str = "auto"):
    torch.manual_seed(seed)
    model, vocab = load_backbone(ModelConfig(source="debug", debug=TINY_BACKBONE, attn_implementation=attn))
    return model.eval(), vocab


def save_backbone_dir(path: Path, seed: int = 0) -> Path:
    """A Hugging Face model directory (config.json + safetensors + tokenizer.json) of a tiny Chameleon."""
    model, _ = tiny_backbone(seed)
    model.save_pretrained(path)
    build_debug_tokenizer(num_image_codes=NUM_CODES).save(str(path / "tokenizer.json"))
    return path


def tiny_vqgan(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(**TINY_VQ))


def save_vqgan(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    yaml_path, ckpt_path = folder / "vqgan.yaml", folder / "vqgan.ckpt"
    tiny_vqgan(seed).save_original(yaml_path, ckpt_path)
    return yaml_path, ckpt_path


def drawn_image(index: int, size: int = 64) -> np.ndarray:
    """A uint8 [size, size, 3] picture: a coloured disk on a gradient, different for each index."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.zeros((size, size, 3), np.float64)
    image[..., 0] = xx / size * 255
    image[..., 1] = yy / size * 255
    cy, cx, r = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size, rng.uniform(0.1, 0.3) * size
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    image[disk] = rng.uniform(0, 255, 3)
    return image.astype(np.uint8)


def write_prompt_json(folder: Path, prompts=PROMPTS, size: int = 64) -> Path:
    """ARRA conversation JSON + one real PNG per prompt (relative paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i, text in enumerate(prompts):
        name = f"real_{i:03d}.png"
        Image.fromarray(drawn_image(i, size)).save(folder / name)
        items.append({"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "<|image|>"}],
                      "image": [name]})
    path = folder / "prompts.json"
    path.write_text(json.dumps(items))
    return path


def write_mds(folder: Path, prompts=PROMPTS, code_size: int = 4, seed: int = 0, feature_dim: int = 0,
              repeat: int = 1) -> Path:
    """A tiny pre-tokenised MDS split (tokens, prompt_len, caption, uid) with random image codes; ``feature_dim``:
    also a random target feature ``feat_demo`` [D]; ``repeat``: the prompts that many times (other codes)."""
    from streaming import MDSWriter

    from arra_ds.data.schema import columns_for
    from arra_ds.tokens.layout import conversation_tokens, image_to_tokens
    from arra_ds.tokens.vocab import build_debug_vocab

    vocab = build_debug_vocab(num_image_codes=NUM_CODES)
    g = torch.Generator().manual_seed(seed)
    encoders = ["demo"] if feature_dim else []
    with MDSWriter(out=str(folder), columns=columns_for(encoders)) as writer:
        for i, text in enumerate(list(prompts) * repeat):
            codes = torch.randint(0, NUM_CODES, (code_size, code_size), generator=g)
            prompt_ids = [vocab.id(w) for w in text.split() if w in vocab.token_to_id]
            tokens, prompt_len = conversation_tokens(prompt_ids, image_to_tokens(codes, vocab), vocab)
            sample = {"tokens": np.asarray(tokens, np.int32), "prompt_len": np.int32(prompt_len), "caption": text,
                      "uid": f"img{i}"}
            if feature_dim:
                sample["feat_demo"] = torch.randn(feature_dim, generator=g).numpy().astype(np.float16)
            writer.write(sample)
    return folder


def packed_batch(vocab, batch_size: int, seq_len: int, code_side: int, prompt_len: int, feature_dim: int, seed: int):
    """(prompt + code_side x code_side image) conversations packed back to back to seq_len, as the trainer's packed
    data: attention_mask all ones (the case flash attention serves). Shared by tests and bench/train_throughput.py."""
    from arra_ds.tokens.layout import IGNORE_INDEX, conversation_tokens, image_to_tokens

    g = torch.Generator().manual_seed(seed)
    text_ids = torch.tensor([i for n, i in vocab.token_to_id.items() if not n.startswith(("<", "IMGIMG"))])
    rows_ids, rows_labels = [], []
    for _ in range(batch_size):
        ids, labels = [], []
        while len(ids) < seq_len:
            prompt = text_ids[torch.randint(0, len(text_ids), (prompt_len,), generator=g)].tolist()
            codes = torch.randint(0, vocab.num_image_codes, (code_side, code_side), generator=g)
            tokens, n_prompt = conversation_tokens(prompt, image_to_tokens(codes, vocab), vocab)
            ids += tokens
            labels += [IGNORE_INDEX] * n_prompt + tokens[n_prompt:]
        rows_ids.append(ids[:seq_len])
        rows_labels.append(labels[:seq_len])
    return {
        "input_ids": torch.tensor(rows_ids),
        "labels": torch.tensor(rows_labels),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "target_features": torch.randn(batch_size, feature_dim, generator=g),
    }
