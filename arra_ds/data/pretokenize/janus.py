"""Janus-Pro pre-tokenization: the ARRA / Lumina-mGPT conversation JSON -> MDS samples in Janus's layout.

    python launch/pretokenize_janus.py input=train.json out_dir=data/janus_mds model=checkpoints/Janus-Pro-1B \
        encoders=[biomedclip=/models/BiomedCLIP] num_procs=8

Items are those of ``launch/pretokenize.py`` (one human prompt, an answer that is the image alone). Each image is
centre-cropped to ``image_size`` (resize the short side, as ADM / LlamaGen crop; by default the size the model
draws: 384 x 384 for Janus-Pro) and encoded with Janus's own VQ tokenizer; the prompt is framed as Janus samples
it (``tokens/janus.py``):

    tokens      BOS <|User|>: {prompt}\\n\\n<|Assistant|>: <begin_of_image> code_0 ... code_{n*n-1}
    prompt_len  the framed prompt's length (everything after it is a code, raw code ids)

``feat_<encoder>`` is each encoder's feature of the same crop. The VQ tokenizer's weights are taken from the
Janus checkpoint (``model.vqmodel.*``) once, into ``<out_dir>/janus_vq.pt`` (LlamaGen VQ-16 names) with its
architecture in ``<out_dir>/janus_vq.yaml``: the trainer's data record points generation and evaluation at the
pair, as it does for Chameleon's vqgan.yaml + vqgan.ckpt. Prompt dropout for classifier-free guidance happens in training
(``model.janus.prompt_dropout``), not here: the data keeps every prompt, so held-out MDS prompts evaluate as
they are.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tokenizers import Tokenizer
from torch.utils.data import Dataset
from transformers import JanusConfig

from arra_ds.data.features import FeatureEncoder, load_encoder
from arra_ds.data.images import pil_to_pixels, resize_and_center_crop, to_rgb
from arra_ds.data.pretokenize.config import PretokenizeError, PretokenizeRunConfig
from arra_ds.data.pretokenize.items import BadItem, item_uid, open_image, parse_item
from arra_ds.data.pretokenize.sources import read_conversations
from arra_ds.data.pretokenize.task import PretokenizeTask
from arra_ds.data.pretokenize.writer import stack
from arra_ds.data.schema import columns_for, feature_column
from arra_ds.distributed import compute_dtype
from arra_ds.errors import ConfigError
from arra_ds.model.janus import is_janus_dir
from arra_ds.io import atomic_write, temporary_sibling
from arra_ds.tokens import janus as layout
from arra_ds.tokens.janus import JanusVocab
from arra_ds.tokens.layout import IMAGE_PLACEHOLDER
from arra_ds.tokens.llamagen_vq import CHECKPOINT_WEIGHTS_KEY, LlamaGenVQ, LlamaGenVQConfig
from arra_ds.weights import read_safetensors_prefixed

VQ_FILE = "janus_vq.pt"  # in out_dir: Janus's VQ tokenizer under LlamaGen VQ-16 names ({"model": state dict})
VQ_CONFIG_FILE = "janus_vq.yaml"  # in out_dir: its architecture (LlamaGenVQConfig fields)
CONFIG_FILE = "config.json"
CODE_PATCH_PX = 16  # pixels per code side of Janus's VQ tokenizer
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class JanusPretokenizeConfig(PretokenizeRunConfig):
    """Text-to-image pre-tokenization for Janus-Pro: ``input`` is a conversation JSON (a list of items)."""

    # deepseek-community/Janus-Pro-1B / -7B: its tokenizer.json frames the prompts, its VQ (model.vqmodel.*) encodes
    model: str = ""  # the Janus-Pro checkpoint directory (transformers layout) whose tokenizer and VQ are used
    image_size: int = 0  # square centre crop in px, (image_size / 16) ** 2 codes; 0 = the model's (Janus-Pro: 384)
    image_root: str = ""  # relative image paths are relative to this ("" = the JSON file's directory)
    max_seq_len: int = 0  # > 0: samples with more tokens are skipped

    def validate(self) -> None:
        if not self.input or not Path(self.input).is_file():
            raise ConfigError(f"input={self.input!r}: the conversation JSON file does not exist")
        self.validate_run()
        model = Path(self.model)
        if not self.model or not (model / CONFIG_FILE).is_file() or not (model / TOKENIZER_FILE).is_file():
            raise ConfigError(
                f"model={self.model!r}: pass the local Janus-Pro directory in the transformers layout (config.json, "
                "tokenizer.json and the safetensors holding its VQ tokenizer)"
            )
        if not is_janus_dir(model):
            raise ConfigError(f"model={self.model}: its config.json is not a Janus model's (model_type janus)")
        if self.image_size < 0 or self.image_size % CODE_PATCH_PX:
            raise ConfigError(f"image_size={self.image_size} must be a multiple of {CODE_PATCH_PX} (one code per "
                              f"{CODE_PATCH_PX} px), or 0 (the size the model draws)")
        if self.max_seq_len < 0:
            raise ConfigError("max_seq_len must be >= 0")

    def model_config(self) -> JanusConfig:
        return JanusConfig.from_pretrained(self.model, local_files_only=True)

    @property
    def crop_size(self) -> int:
        """``image_size``, or the model's own: its code grid (``vq_config.num_patches``) x 16 px."""
        return self.image_size or int(self.model_config().vq_config.num_patches) * CODE_PATCH_PX

    @property
    def vq_checkpoint(self) -> Path:
        return Path(self.out_dir) / VQ_FILE

    @property
    def vq_config_file(self) -> Path:
        return Path(self.out_dir) / VQ_CONFIG_FILE

    def vq_config(self) -> LlamaGenVQConfig:
        return layout.llamagen_vq_config(self.model_config().vq_config.to_dict())

    def content_key(self) -> dict:
        """Settings that change the written samples; a resumed run must use the same ones. ``vqgan`` (config and
        weights, as launch/pretokenize.py records Chameleon's) and ``tokenizer`` also tell the trainer's data record
        which image tokenizer decodes the codes."""
        stat = Path(self.input).stat()
        return {
            "input": str(Path(self.input).resolve()),
            "input_size": stat.st_size,
            "input_mtime_ns": stat.st_mtime_ns,
            "model": str(Path(self.model).resolve()),
            "tokenizer": str((Path(self.model) / TOKENIZER_FILE).resolve()),
            "vqgan": [str(self.vq_config_file.resolve()), str(self.vq_checkpoint.resolve())],
            "vq": asdict(self.vq_config()),
            "image_size": self.crop_size,
            "image_root": self.image_root,
            "max_seq_len": self.max_seq_len,
            **self.run_content_key(),
        }


def janus_vq_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The VQ tokenizer of a Janus checkpoint (``model.vqmodel.*`` of its safetensors) under LlamaGen's names."""
    tensors = read_safetensors_prefixed(model_dir, layout.HF_VQ_PREFIX)
    if not tensors:
        raise PretokenizeError(f"{model_dir} holds no {layout.HF_VQ_PREFIX}* tensors: is it a Janus checkpoint in the "
                               "transformers layout (safetensors)?")
    return layout.llamagen_vq_state(tensors)


def write_janus_vq(cfg: JanusPretokenizeConfig) -> Path:
    """``<out_dir>/janus_vq.pt`` from the Janus checkpoint, checked against its config by a strict load, and its
    architecture ``<out_dir>/janus_vq.yaml``; written once (atomically), kept on reruns."""
    target, vq_config = cfg.vq_checkpoint, cfg.vq_config()
    atomic_write(cfg.vq_config_file, yaml.safe_dump(json.loads(json.dumps(asdict(vq_config))), sort_keys=False))
    if target.is_file():
        return target
    state = janus_vq_tensors(cfg.model)
    LlamaGenVQ(vq_config).load_upstream_state(state, source=f"{cfg.model} ({layout.HF_VQ_PREFIX}*)")
    tmp = temporary_sibling(target)
    try:
        torch.save({CHECKPOINT_WEIGHTS_KEY: state}, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


@dataclass
class JanusModels:
    vq: LlamaGenVQ
    encoders: dict[str, FeatureEncoder]
    vocab: JanusVocab


class JanusItems(Dataset):
    """(index, conversation item) -> a record with the framed prompt ids and the crop's VQ / encoder inputs, or a
    bad-item record. Runs in DataLoader workers; never raises."""

    def __init__(self, selected: list, cfg: JanusPretokenizeConfig, tokenizer: Tokenizer, vocab: JanusVocab,
                 encoder_preprocess: dict):
        self.selected = selected
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.encoder_preprocess = encoder_preprocess
        self.image_root = Path(cfg.image_root) if cfg.image_root else Path(cfg.input).resolve().parent

    def __len__(self) -> int:
        return len(self.selected)

    def __getitem__(self, position: int) -> dict:
        index, item = self.selected[position]
        record = {"index": index, "uid": item_uid(item, index)}
        try:
            prompt, answer, images = parse_item(item)
            record["image"] = images[0]
            if answer.strip() != IMAGE_PLACEHOLDER:
                raise BadItem("unsupported_conversation", f"the answer must be the image alone ({IMAGE_PLACEHOLDER})")
            size = self.cfg.crop_size
            crop = resize_and_center_crop(to_rgb(open_image(self.image_root / images[0], self.cfg.min_image_size)),
                                          (size, size))
            record.update(
                caption=prompt,
                prompt_ids=layout.encode_prompt(self.tokenizer, self.vocab, prompt),
                pixels=pil_to_pixels(crop),  # [3, S, S] in [-1, 1]
                encoder_pixels={name: pre(crop) for name, pre in self.encoder_preprocess.items()},
            )
        except BadItem as e:
            record.update(reason=e.reason, detail=e.detail)
        except Exception as e:  # a bad item must never stop the job; the report keeps the cause
            record.update(reason="error", detail=f"{type(e).__name__}: {e}")
        return record


class JanusTask(PretokenizeTask):
    cfg: JanusPretokenizeConfig

    def items(self) -> list:
        return read_conversations(self.cfg.input)

    def content_key(self) -> dict:
        return self.cfg.content_key()

    def columns(self) -> dict[str, str]:
        return columns_for([s.name for s in self.cfg.encoders])

    def load_models(self, device: torch.device) -> JanusModels:
        dtype = compute_dtype(self.cfg.dtype, device)
        vq = LlamaGenVQ.from_checkpoint(self.cfg.vq_checkpoint, self.cfg.vq_config()).to(device=device, dtype=dtype)
        encoders = {spec.name: load_encoder(spec, device=device, dtype=dtype) for spec in self.cfg.encoders}
        return JanusModels(vq, encoders, JanusVocab.from_tokenizer_file(Path(self.cfg.model) / TOKENIZER_FILE))

    def item_dataset(self, selected, models: JanusModels) -> JanusItems:
        tokenizer = Tokenizer.from_file(str(Path(self.cfg.model) / TOKENIZER_FILE))
        return JanusItems(selected, self.cfg, tokenizer, models.vocab,
                          {name: enc.preprocess for name, enc in models.encoders.items()})

    def encode(self, records: list[dict], models: JanusModels) -> list[list[dict] | BadItem]:
        codes = models.vq.encode(stack([r["pixels"] for r in records])).cpu()  # [B, n, n]
        features = {
            name: encoder.encode(stack([r["encoder_pixels"][name] for r in records]))  # [B, D] fp16
            for name, encoder in models.encoders.items()
        }
        results: list[list[dict] | BadItem] = []
        for i, record in enumerate(records):
            tokens, prompt_len = models.vocab.sample_tokens(record["prompt_ids"], codes[i])
            if self.cfg.max_seq_len and len(tokens) > self.cfg.max_seq_len:
                results.append(BadItem("too_long", f"{len(tokens)} tokens > max_seq_len={self.cfg.max_seq_len}"))
                continue
            sample = {
                "tokens": np.asarray(tokens, dtype=np.int32),
                "prompt_len": np.int32(prompt_len),
                "caption": record["caption"],
                "uid": record["uid"],
            }
            for name, values in features.items():
                sample[feature_column(name)] = values[i].numpy()
            results.append([sample])
        return results
