"""Janus-Pro's text-to-image sequence and its VQ image tokenizer, as arra_ds lays them out.

Sequence (deepseek-ai/Janus ``generation_inference.py``: the "deepseek" SFT template of
``janus/utils/conversation.py`` with an empty system prompt, then ``<begin_of_image>``; the tokenizer adds BOS):

    <｜begin▁of▁sentence｜> <|User|>: {prompt}\\n\\n<|Assistant|>: <begin_of_image> code_0 ... code_{h*w-1}
    \\_______________________________ prompt_len ________________________________/ \\___ supervised ___/

Image codes are not text tokens: they enter the language model through Janus's generation embeddings and
aligner, and the generation head predicts them. A pre-tokenised sample stores them as they are (ids in
[0, codebook size)) after the text ids, and ``prompt_len`` tells the two apart: everything from ``prompt_len`` on
is a code. The unconditional prompt of classifier-free guidance is the same frame with every token between
BOS and ``<begin_of_image>`` replaced by the pad token (``unconditional_prompt``), attended, as Janus samples.

The VQ tokenizer is LlamaGen's VQ-16 architecture (Janus's ``janus/models/vq_model.py`` is LlamaGen's
``vq_model.py``); ``tokens/llamagen_vq.py`` runs it. ``llamagen_vq_config`` / ``llamagen_vq_state`` map a
transformers ``JanusVQVAE`` (config and ``model.vqmodel.*`` tensors of a Janus-Pro checkpoint) onto it. Codes are
quantised as Janus's own ``vq_model.py`` does (l2-normalised latents and codebook); transformers'
``JanusVQVAE.encode`` skips that normalisation (its ``decode`` applies it), so the two agree exactly when the
codebook rows are unit vectors, and decoded pixels agree for any codebook.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from arra_ds.tokens.llamagen_vq import LlamaGenVQConfig
from arra_ds.tokens.vocab import VocabError, read_tokenizer_vocab, token_id

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE_START = "<begin_of_image>"
IMAGE_END = "<end_of_image>"
USER_ROLE = "<|User|>"
ASSISTANT_ROLE = "<|Assistant|>"
TURN_SEPARATOR = "\n\n"  # the "deepseek" template's sep after a user turn
SPECIAL_TOKENS = (BOS, EOS, PAD, IMAGE_START, IMAGE_END)
HF_VQ_PREFIX = "model.vqmodel."  # JanusForConditionalGeneration's VQ tokenizer


def sft_prompt(prompt: str) -> str:
    """Janus's "deepseek" SFT template of one user turn and an empty assistant turn (system prompt "")."""
    return f"{USER_ROLE}: {prompt.strip()}{TURN_SEPARATOR}{ASSISTANT_ROLE}:"


class JanusVocab:
    """Janus-Pro's special token ids by name (from its ``tokenizer.json``) and its sample layout."""

    def __init__(self, token_to_id: Mapping[str, int], source: str = "<in memory>"):
        self.token_to_id = dict(token_to_id)
        self.source = source
        missing = [name for name in SPECIAL_TOKENS if name not in self.token_to_id]
        if missing:
            raise VocabError(
                f"vocabulary from {source} lacks Janus's special tokens {missing}; is it a Janus-Pro tokenizer?"
            )

    @classmethod
    def from_tokenizer_file(cls, path: str | Path) -> "JanusVocab":
        """A ``tokenizers`` JSON (the ``tokenizer.json`` of a Janus-Pro checkpoint), added tokens included."""
        path = Path(path)
        if not path.is_file():
            raise VocabError(f"{path} not found: a Janus-Pro checkpoint directory holds its tokenizer.json")
        return cls(read_tokenizer_vocab(path), source=str(path))

    def id(self, name: str) -> int:
        return token_id(self.token_to_id, name, self.source)

    @property
    def bos_id(self) -> int:
        return self.id(BOS)

    @property
    def pad_id(self) -> int:
        return self.id(PAD)

    @property
    def image_start_id(self) -> int:
        return self.id(IMAGE_START)

    def framed(self, prompt_ids: Sequence[int]) -> list[int]:
        """BOS prompt <begin_of_image>: the conditional prefix of a sample."""
        return [self.bos_id, *prompt_ids, self.image_start_id]

    def unconditional_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt ids replaced by pad tokens (same length): Janus's unconditional branch."""
        return [self.pad_id] * len(prompt_ids)

    def sample_tokens(self, prompt_ids: Sequence[int], codes: torch.Tensor) -> tuple[list[int], int]:
        """(tokens, prompt_len) of one sample: the framed prompt, then the codes [h, w] in raster order."""
        prefix = self.framed(prompt_ids)
        return prefix + [int(c) for c in codes.flatten().tolist()], len(prefix)

    def split_sample(self, tokens: Sequence[int], prompt_len: int) -> tuple[list[int], torch.Tensor]:
        """(prompt ids without the BOS ... <begin_of_image> frame, the codes [n, n]) of a pre-tokenised sample."""
        tokens = [int(t) for t in tokens]
        if tokens[0] != self.bos_id or tokens[prompt_len - 1] != self.image_start_id:
            raise ValueError("prompt is not framed as <｜begin▁of▁sentence｜> ... <begin_of_image>")
        codes = torch.tensor(tokens[prompt_len:], dtype=torch.long)
        side = math.isqrt(codes.numel())
        if side < 1 or side * side != codes.numel():
            raise ValueError(f"{codes.numel()} image codes after the prompt: not a square grid")
        return tokens[1 : prompt_len - 1], codes.view(side, side)


def encode_prompt(tokenizer, vocab: JanusVocab, text: str) -> list[int]:
    """Prompt text -> the ids between BOS and <begin_of_image>, as Janus tokenises ``sft_prompt(text) +
    "<begin_of_image>"`` (``tokenizer``: a ``tokenizers.Tokenizer``; BOS is added by the frame, not here)."""
    ids = tokenizer.encode(sft_prompt(text) + IMAGE_START, add_special_tokens=False).ids
    if not ids or ids[-1] != vocab.image_start_id:
        raise VocabError(
            f"the tokenizer does not encode {IMAGE_START} as its single id {vocab.image_start_id}; use the "
            "tokenizer.json of the Janus-Pro checkpoint"
        )
    return ids[:-1]


# ------------------------------------------------------------------------------------------------
# The VQ tokenizer: transformers' JanusVQVAE -> tokens/llamagen_vq.py
# ------------------------------------------------------------------------------------------------

# transformers' JanusVQVAE names -> LlamaGen's (= Janus's own vq_model.py; the inverse of transformers'
# convert_janus_weights_to_hf.py mapping), applied in order to the names below ``model.vqmodel.``
_VQ_RENAMES = (
    (re.compile(r"^encoder\.down\.(\d+)\.block\."), r"encoder.conv_blocks.\1.res."),
    (re.compile(r"^encoder\.down\.(\d+)\."), r"encoder.conv_blocks.\1."),
    (re.compile(r"^decoder\.up\.(\d+)\.block\."), r"decoder.conv_blocks.\1.res."),
    (re.compile(r"^decoder\.up\.(\d+)\."), r"decoder.conv_blocks.\1."),
    (re.compile(r"^(encoder|decoder)\.mid\.block_1\."), r"\1.mid.0."),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\."), r"\1.mid.1."),
    (re.compile(r"^(encoder|decoder)\.mid\.block_2\."), r"\1.mid.2."),
)


def llamagen_vq_name(hf_name: str) -> str:
    for pattern, replacement in _VQ_RENAMES:
        hf_name = pattern.sub(replacement, hf_name)
    return hf_name


def llamagen_vq_state(hf_state: Mapping[str, torch.Tensor], prefix: str = HF_VQ_PREFIX) -> dict[str, torch.Tensor]:
    """The ``<prefix>*`` tensors of a Janus checkpoint under ``LlamaGenVQ``'s parameter names."""
    return {llamagen_vq_name(name[len(prefix):]): tensor for name, tensor in hf_state.items() if name.startswith(prefix)}


def llamagen_vq_config(vq_config: Mapping) -> LlamaGenVQConfig:
    """The ``LlamaGenVQConfig`` of a transformers ``JanusVQVAEConfig`` (as a dict: the ``vq_config`` of config.json)."""
    if vq_config.get("double_latent", False):
        raise VocabError("a Janus VQ config with double_latent=true has no LlamaGen VQ-16 counterpart")
    multiplier = tuple(vq_config.get("channel_multiplier", (1, 1, 2, 2, 4)))
    return LlamaGenVQConfig(
        codebook_size=int(vq_config.get("num_embeddings", 16384)),
        codebook_embed_dim=int(vq_config.get("embed_dim", 8)),
        codebook_l2_norm=True,  # Janus's vq_model.py: codebook_l2_norm=True
        codebook_show_usage=False,  # the transformers checkpoint drops upstream's codebook_used buffer
        base_channels=int(vq_config.get("base_channels", 128)),
        encoder_ch_mult=multiplier,
        decoder_ch_mult=multiplier,
        z_channels=int(vq_config.get("latent_channels", 256)),
        num_res_blocks=int(vq_config.get("num_res_blocks", 2)),
        dropout_p=float(vq_config.get("dropout", 0.0)),
        in_channels=int(vq_config.get("in_channels", 3)),
        out_channels=int(vq_config.get("out_channels", 3)),
    )
