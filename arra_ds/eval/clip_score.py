"""CLIP-Score with open_clip: cosine similarity of image and prompt embeddings.

The score of a sample is ``cos(E_img(image), E_txt(prompt))``; the reported CLIP-Score is its mean
over samples, as a raw cosine (ARRA's tables: BiomedCLIP, ~0.45), not the ``100 * max(cos, 0)``
variant of Hessel et al.

Model spec (``clip_model``), weights from local files or the Hugging Face cache only:
- ``biomedclip``: ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` from the cache;
- ``hf-hub:org/repo`` (from the cache), ``local-dir:/path`` (open_clip_config.json + weights +
  tokenizer files), or ``ARCH:PRETRAINED`` (an open_clip architecture and a weights file or tag);
- ``random``: a tiny randomly initialised CLIP (ViT + text transformer, context 16) for tests.

Text longer than the text tower's context (77 BPE tokens for OpenAI CLIP, 256 for BiomedCLIP) is
truncated by the tokenizer, keeping its beginning; the scorer counts those prompts and the report
shows how many were cut.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import huggingface_hub.constants as hub_constants
import numpy as np
import torch
from PIL import Image
from torch import nn

from arra_ds.errors import ConfigError, InputNotFoundError

BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
ALIASES = {"biomedclip": BIOMEDCLIP}
RANDOM_CLIP = "random"
RANDOM_CLIP_CONTEXT = 16


@contextlib.contextmanager
def _hub_offline():
    """Resolve hf-hub names from the local cache only (no network)."""
    previous_env, previous = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous
        if previous_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env


def count_tokens(tokenizer, text: str) -> int:
    """Tokens ``text`` needs in the text tower, special tokens included, before truncation."""
    # open_clip (and timm behind it) costs seconds to import: only where an open_clip model is built
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if isinstance(tokenizer, SimpleTokenizer):
        return len(tokenizer.encode(text)) + 2  # <start_of_text> ... <end_of_text>
    if isinstance(tokenizer, HFTokenizer):
        return len(tokenizer.tokenizer(tokenizer.clean_fn(text))["input_ids"])
    raise TypeError(f"cannot count tokens for a {type(tokenizer).__name__}")


@dataclass
class ClipScorer:
    model: nn.Module  # open_clip model with encode_image / encode_text
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable  # open_clip tokenizer: list[str] -> [N, context] ids
    name: str

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        return [count_tokens(self.tokenizer, t) > self.context_length for t in texts]

    @torch.inference_mode()
    def scores(self, images: torch.Tensor, texts: Sequence[str]) -> np.ndarray:
        """uint8 [N, 3, H, W] images and N prompts -> cosine similarity per pair, float64 [N]."""
        if images.shape[0] != len(texts):
            raise ValueError(f"{images.shape[0]} images but {len(texts)} prompts")
        pixels = torch.stack(
            [self.preprocess(Image.fromarray(img.permute(1, 2, 0).cpu().numpy())) for img in images]
        ).to(self.device)
        tokens = self.tokenizer(list(texts)).to(self.device)
        image_emb = nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_emb = nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (image_emb * text_emb).sum(dim=-1).double().cpu().numpy()


def _random_clip() -> ClipScorer:
    # open_clip (and timm behind it) costs seconds to import: only where an open_clip model is built
    from open_clip.model import CLIP
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transform import image_transform

    image_size = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIP(
            embed_dim=32,
            vision_cfg=dict(image_size=image_size, layers=1, width=32, head_width=16, patch_size=8),
            text_cfg=dict(context_length=RANDOM_CLIP_CONTEXT, vocab_size=49408, width=32, heads=2, layers=1),
        )
    tokenizer = SimpleTokenizer(context_length=RANDOM_CLIP_CONTEXT)
    return ClipScorer(model.eval(), image_transform(image_size, is_train=False), tokenizer, RANDOM_CLIP)


def build_clip_scorer(spec: str, device: torch.device | str = "cpu") -> ClipScorer:
    """Load the CLIP model named by ``spec`` (see the module docstring) from local files."""
    # open_clip (and timm behind it) costs seconds to import: only where an open_clip model is built
    import open_clip

    if spec == RANDOM_CLIP:
        scorer = _random_clip()
    else:
        name = ALIASES.get(spec, spec)
        try:
            with _hub_offline():
                if name.startswith(("hf-hub:", "local-dir:")):
                    model, preprocess = open_clip.create_model_from_pretrained(name)
                    tokenizer = open_clip.get_tokenizer(name)
                else:
                    arch, sep, pretrained = name.partition(":")
                    if not sep or not pretrained:
                        raise ConfigError(
                            f"clip_model={spec!r}: use biomedclip, hf-hub:org/repo, local-dir:/path, ARCH:WEIGHTS or random"
                        )
                    model, preprocess = open_clip.create_model_from_pretrained(arch, pretrained=pretrained)
                    tokenizer = open_clip.get_tokenizer(arch)
        except (OSError, RuntimeError) as e:
            raise InputNotFoundError(
                f"could not load CLIP model {spec!r} from local files ({e}). Nothing is downloaded at run time: "
                "put the model in the Hugging Face cache, or pass local-dir:/path or ARCH:/path/to/weights"
            ) from e
        scorer = ClipScorer(model.eval(), preprocess, tokenizer, spec)
    scorer.model.to(device).requires_grad_(False)
    return scorer
