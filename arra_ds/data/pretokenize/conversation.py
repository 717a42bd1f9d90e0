"""Text-to-image pre-tokenization: a conversation JSON, caption table, image + caption pairs or
WebDataset shards (``sources.py``) -> MDS samples.

A conversation item is ``{"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value":
"<|image|>"}], "image": [path]}``; the other formats give the same (prompt, image) pair. A DataLoader
worker checks the item, tokenises the text and crops the image (``items.ItemDataset``); the main process
encodes batches of one crop size with the Chameleon VQGAN and the feature encoders and lays the codes
out as tokens (``tokens.layout``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from arra_ds.data.features import FeatureEncoder, load_encoder
from arra_ds.data.images import VQImagePreprocessor
from arra_ds.data.pretokenize.config import PretokenizeConfig, PretokenizeError
from arra_ds.data.pretokenize.items import BadItem, ItemDataset
from arra_ds.data.pretokenize.sources import image_root, input_identity, read_input, resolve_input_format
from arra_ds.data.pretokenize.task import PretokenizeTask
from arra_ds.data.pretokenize.writer import encode_patches, patch_preprocessors, stack
from arra_ds.data.schema import columns_for, feature_column, patch_column
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


def load_text_models(cfg: PretokenizeConfig) -> tuple[ChameleonVocab, ConversationTokenizer]:
    """The vocabulary and prompt tokenizer (all a dry run loads)."""
    tokenizer = load_text_tokenizer(cfg.tokenizer)
    vocab = ChameleonVocab(tokenizer.get_vocab(with_added_tokens=True), source=cfg.tokenizer)
    return vocab, ConversationTokenizer(tokenizer, vocab)


def load_models(cfg: PretokenizeConfig, device: torch.device) -> Models:
    dtype = compute_dtype(cfg.dtype, device)
    vocab, conversation_tokenizer = load_text_models(cfg)
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
    return Models(vqgan, encoders, vocab, conversation_tokenizer)


def text_to_image_sample(tokens: list[int], text: TokenizedConversation, caption: str, uid: str,
                         features: dict[str, np.ndarray], patches: dict[str, np.ndarray] | None = None) -> dict:
    """One MDS sample (``arra_ds.data.schema``); ``features``: encoder name -> fp16 feature [D]; ``patches``:
    encoder name -> fp16 patch features [P, D] (``patch_features=true``)."""
    sample = {
        "tokens": np.asarray(tokens, dtype=np.int32),
        "prompt_len": np.int32(text.prompt_len),
        "caption": caption,
        "uid": uid,
    }
    for name, values in features.items():
        sample[feature_column(name)] = values
    for name, values in (patches or {}).items():
        sample[patch_column(name)] = values
    return sample


class ConversationTask(PretokenizeTask):
    """Text-to-image samples from any ``input_format`` (``validate`` resolves auto)."""

    cfg: PretokenizeConfig

    def __init__(self, cfg: PretokenizeConfig):
        super().__init__(cfg)
        self._items: list | None = None

    def __getstate__(self) -> dict:
        # A spawned process lists the input itself rather than unpickling every item.
        return {**self.__dict__, "_items": None}

    def validate(self) -> None:
        self.cfg.validate()
        self.cfg.input_format = resolve_input_format(self.cfg)

    def validate_input(self) -> None:
        """The checks a dry run needs: no VQGAN or encoder weights."""
        self.cfg.validate_input()
        self.cfg.input_format = resolve_input_format(self.cfg)

    def items(self) -> list:
        if self._items is None:
            self._items = read_input(self.cfg, self.cfg.input_format)
        return self._items

    def content_key(self) -> dict:
        return self.cfg.content_key(input_identity(self.cfg, self.cfg.input_format, self.items()))

    def columns(self) -> dict[str, str]:
        return columns_for([s.name for s in self.cfg.encoders], patch_features=self.cfg.patch_features)

    def load_models(self, device: torch.device) -> Models:
        return load_models(self.cfg, device)

    def item_dataset(self, selected, models: Models) -> ItemDataset:
        return self._dataset(selected, models.conversation_tokenizer,
                             {name: enc.preprocess for name, enc in models.encoders.items()},
                             patch_preprocess=patch_preprocessors(self.cfg, models.encoders))

    def measure_dataset(self, selected, conversation_tokenizer: ConversationTokenizer) -> ItemDataset:
        """The dry run's records: every check of ``item_dataset``, image and crop sizes instead of pixels."""
        return self._dataset(selected, conversation_tokenizer, {}, measure_only=True)

    def _dataset(self, selected, conversation_tokenizer, encoder_preprocess: dict, measure_only: bool = False,
                 patch_preprocess: dict | None = None) -> ItemDataset:
        cfg = self.cfg
        return ItemDataset(
            selected, conversation_tokenizer, VQImagePreprocessor(cfg.image), encoder_preprocess,
            image_root(cfg, cfg.input_format), cfg.min_image_size, rep_token=cfg.rep_token, measure_only=measure_only,
            patch_preprocess=patch_preprocess,
        )

    def bucket_key(self, record: dict) -> tuple:
        return tuple(record["pixels"].shape[1:])  # the crop size: Lumina-mGPT crops keep the aspect ratio

    def encode(self, records: list[dict], models: Models) -> list[list[dict] | BadItem]:
        codes = models.vqgan.encode(stack([r["pixels"] for r in records]))  # [B, h, w]
        features = {
            name: encoder.encode(stack([r["encoder_pixels"][name] for r in records]))  # [B, D] fp16
            for name, encoder in models.encoders.items()
        }
        patches = encode_patches(records, models.encoders, self.cfg.patch_features)  # name -> [B, P, D] fp16
        results: list[list[dict] | BadItem] = []
        for i, record in enumerate(records):
            text: TokenizedConversation = record["text"]
            tokens, _ = text.with_images([image_to_tokens(codes[i].cpu(), models.vocab)])
            if self.cfg.max_seq_len and len(tokens) > self.cfg.max_seq_len:
                results.append(BadItem("too_long", f"{len(tokens)} tokens > max_seq_len={self.cfg.max_seq_len}"))
                continue
            sample_features = {name: values[i].numpy() for name, values in features.items()}
            sample_patches = {name: values[i].numpy() for name, values in patches.items()}
            results.append([text_to_image_sample(tokens, text, record["caption"], record["uid"], sample_features,
                                                 sample_patches)])
        return results

    def report_extras(self) -> dict:
        return {"input_format": self.cfg.input_format}
