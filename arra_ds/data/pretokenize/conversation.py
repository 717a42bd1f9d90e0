"""Text-to-image pre-tokenization: the ARRA / Lumina-mGPT conversation JSON -> MDS samples.

Items are ``{"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value":
"<|image|>"}], "image": [path]}``. A DataLoader worker checks the item, tokenises the text and crops
the image (``items.ItemDataset``); the main process encodes batches of one crop size with the
Chameleon VQGAN and the feature encoders and lays the codes out as tokens (``tokens.layout``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from arra_ds.data.features import FeatureEncoder, load_encoder
from arra_ds.data.images import VQImagePreprocessor
from arra_ds.data.pretokenize.config import PretokenizeConfig, PretokenizeError
from arra_ds.data.pretokenize.items import BadItem, ItemDataset
from arra_ds.data.pretokenize.task import PretokenizeTask
from arra_ds.data.pretokenize.writer import stack
from arra_ds.data.schema import columns_for, feature_column
from arra_ds.distributed import compute_dtype
from arra_ds.tokens.conversation import ConversationTokenizer, TokenizedConversation, load_text_tokenizer
from arra_ds.tokens.layout import image_to_tokens
from arra_ds.tokens.vocab import ChameleonVocab
from arra_ds.tokens.vqgan import VQGAN


@dataclass
class Models:
    vqgan: VQGAN
    encoders: dict[str, FeatureEncoder]
    vocab: ChameleonVocab
    conversation_tokenizer: ConversationTokenizer


def load_models(cfg: PretokenizeConfig, device: torch.device) -> Models:
    dtype = compute_dtype(cfg.dtype, device)
    tokenizer = load_text_tokenizer(cfg.tokenizer)
    vocab = ChameleonVocab(tokenizer.get_vocab(with_added_tokens=True), source=cfg.tokenizer)
    vqgan = VQGAN.from_hf(cfg.vqgan_hf) if cfg.vqgan_hf else VQGAN.from_original(cfg.vqgan_yaml, cfg.vqgan_ckpt)
    if vqgan.num_codes > vocab.num_image_codes:
        raise PretokenizeError(
            f"the VQGAN has {vqgan.num_codes} codes but {cfg.tokenizer} has only {vocab.num_image_codes} image "
            "code tokens (IMGIMG...); use the tokenizer that belongs to this VQGAN"
        )
    vqgan = vqgan.to(device=device, dtype=dtype)
    if cfg.channels_last:
        vqgan.use_channels_last()
    encoders = {spec.name: load_encoder(spec, device=device, dtype=dtype) for spec in cfg.encoders}
    return Models(vqgan, encoders, vocab, ConversationTokenizer(tokenizer, vocab))


def read_items(path: str | Path) -> list:
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PretokenizeError(f"cannot read the conversation JSON {path}: {e}") from e
    if not isinstance(items, list):
        raise PretokenizeError(f"{path} must hold a JSON list of items, got {type(items).__name__}")
    return items


class ConversationTask(PretokenizeTask):
    cfg: PretokenizeConfig

    def items(self) -> list:
        return read_items(self.cfg.input)

    def content_key(self) -> dict:
        return self.cfg.content_key()

    def columns(self) -> dict[str, str]:
        return columns_for([s.name for s in self.cfg.encoders])

    def load_models(self, device: torch.device) -> Models:
        return load_models(self.cfg, device)

    def item_dataset(self, selected, models: Models) -> ItemDataset:
        cfg = self.cfg
        image_root = Path(cfg.image_root) if cfg.image_root else Path(cfg.input).resolve().parent
        return ItemDataset(
            selected, models.conversation_tokenizer, VQImagePreprocessor(cfg.image),
            {name: enc.preprocess for name, enc in models.encoders.items()}, image_root, cfg.min_image_size,
            rep_token=cfg.rep_token,
        )

    def bucket_key(self, record: dict) -> tuple:
        return tuple(record["pixels"].shape[1:])  # the crop size: Lumina-mGPT crops keep the aspect ratio

    def encode(self, records: list[dict], models: Models) -> list[list[dict] | BadItem]:
        codes = models.vqgan.encode(stack([r["pixels"] for r in records]))  # [B, h, w]
        features = {
            name: encoder.encode(stack([r["encoder_pixels"][name] for r in records]))  # [B, D] fp16
            for name, encoder in models.encoders.items()
        }
        results: list[list[dict] | BadItem] = []
        for i, record in enumerate(records):
            text: TokenizedConversation = record["text"]
            tokens, _ = text.with_images([image_to_tokens(codes[i].cpu(), models.vocab)])
            if self.cfg.max_seq_len and len(tokens) > self.cfg.max_seq_len:
                results.append(BadItem("too_long", f"{len(tokens)} tokens > max_seq_len={self.cfg.max_seq_len}"))
                continue
            sample = {
                "tokens": np.asarray(tokens, dtype=np.int32),
                "prompt_len": np.int32(text.prompt_len),
                "caption": record["caption"],
                "uid": record["uid"],
            }
            for name, values in features.items():
                sample[feature_column(name)] = values[i].numpy()
            results.append([sample])
        return results
