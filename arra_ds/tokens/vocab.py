"""Chameleon token vocabulary: special token ids by name and the BPE id <-> VQ code map.

Every id used by the library comes from here, resolved by *name* from the tokenizer vocabulary (the
``vocabulary_map`` of a Hugging Face Chameleon ``config.json`` or a ``text_tokenizer.json``). Names
follow Chameleon / Lumina-mGPT:

    <s> <pad> </s>        begin / pad / end of sequence
    <racm3:break>         image start            <eoss>            image end
    <reserved08799>       end of an image row    <reserved08706>   end of a conversation turn
    <reserved{8800+n}>    "n grids" (32-px cells) for the image height and width
    <reserved08795>       <REP>: the ARRA reference's token for the `rep` alignment ablation (opens the
                          assistant turn, right before <racm3:break>; only in data pre-tokenised with it)
    IMGIMG<digits as A-J>Z   image code tokens; the digits spell the VQ code index

The debug preset builds a small vocabulary with the same names (``build_debug_tokenizer``) so that
every code path (sequence layout, sampling constraints, HF export) is exercised on CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

from arra_ds.errors import UserError

BOS = "<s>"
PAD = "<pad>"
EOS = "</s>"
IMAGE_START = "<racm3:break>"
IMAGE_END = "<eoss>"
ROW_END = "<reserved08799>"
END_OF_TURN = "<reserved08706>"
# <REP>: the ARRA reference's `rep` ablation prefixes the assistant turn with this token
# (xllmx/data/item_processor_new.py) and aligns the hidden state at its position (token_id = 8799 in
# modeling_xllmx_chameleon_align.py: Chameleon's id of <reserved08795>, since <reservedN> has id N + 4).
REP_TOKEN = "<reserved08795>"
IMAGE_CODE_PREFIX = "IMGIMG"
GRID_TOKEN_BASE = 8800
CODES_PER_GRID_CELL = 2  # codes per side of one grid-token cell (a 32-px cell of 16-px codes)
DEBUG_MAX_GRID = 32  # grid-size tokens of the debug vocabulary: images up to 32 cells (1024 px) per side


def grid_token_name(num_grids: int) -> str:
    """Name of the token that says "num_grids 32-px cells" (Lumina-mGPT's size tokens)."""
    return f"<reserved{GRID_TOKEN_BASE + num_grids:05d}>"


def image_code_token_name(code: int) -> str:
    """Chameleon spells VQ code 1234 as IMGIMG + 'BCDE' + 'Z' (digit d -> chr(ord('A') + d))."""
    return IMAGE_CODE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def image_code_from_token_name(name: str) -> int:
    digits = name[len(IMAGE_CODE_PREFIX) : -1]
    return int("".join(str(ord(c) - ord("A")) for c in digits))


class VocabError(UserError, ValueError):
    """A vocabulary that lacks what Chameleon's layout needs (special tokens, image codes)."""


def read_tokenizer_vocab(path: str | Path) -> dict[str, int]:
    """Token name -> id of a ``tokenizers`` JSON file, added (special) tokens included."""
    data = json.loads(Path(path).read_text())
    vocab = dict(data["model"]["vocab"])
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    return vocab


def token_id(token_to_id: Mapping[str, int], name: str, source: str) -> int:
    """The id of token ``name``; VocabError naming the vocabulary's ``source`` if it has none."""
    try:
        return token_to_id[name]
    except KeyError:
        raise VocabError(f"token {name!r} is not in the vocabulary from {source}") from None


@dataclass
class ChameleonVocab:
    """Token ids by name plus the image-code maps, built from a name -> id mapping."""

    token_to_id: Mapping[str, int]
    source: str = "<in memory>"
    id_to_token: dict[int, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.token_to_id = dict(self.token_to_id)
        self.id_to_token = {i: n for n, i in self.token_to_id.items()}
        missing = [n for n in (BOS, PAD, IMAGE_START, IMAGE_END, ROW_END, END_OF_TURN) if n not in self.token_to_id]
        if missing:
            raise VocabError(
                f"vocabulary from {self.source} lacks the Chameleon special tokens {missing}; "
                "is it a Chameleon / Lumina-mGPT tokenizer?"
            )
        if not self.image_token_ids.numel():
            raise VocabError(f"vocabulary from {self.source} has no '{IMAGE_CODE_PREFIX}...' image code tokens")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_vocabulary_map(cls, vocabulary_map: Mapping[str, int], source: str = "<vocabulary_map>") -> "ChameleonVocab":
        return cls(vocabulary_map, source=source)

    @classmethod
    def from_tokenizer_file(cls, path: str | Path) -> "ChameleonVocab":
        """Read a ``tokenizers`` JSON (Chameleon's ``text_tokenizer.json``), added tokens included."""
        return cls(read_tokenizer_vocab(path), source=str(path))

    @classmethod
    def from_model_config(cls, config) -> "ChameleonVocab":
        vocabulary_map = getattr(config, "vocabulary_map", None)
        if not vocabulary_map:
            raise VocabError("model config has no 'vocabulary_map'; pass a tokenizer file instead")
        return cls(vocabulary_map, source="config.vocabulary_map")

    # ---- special ids --------------------------------------------------------------------------
    def id(self, name: str) -> int:
        return token_id(self.token_to_id, name, self.source)

    @property
    def bos_id(self) -> int:
        return self.id(BOS)

    @property
    def pad_id(self) -> int:
        return self.id(PAD)

    @property
    def eos_id(self) -> int:
        return self.id(EOS)

    @property
    def image_start_id(self) -> int:
        return self.id(IMAGE_START)

    @property
    def image_end_id(self) -> int:
        return self.id(IMAGE_END)

    @property
    def row_end_id(self) -> int:
        return self.id(ROW_END)

    @property
    def end_of_turn_id(self) -> int:
        return self.id(END_OF_TURN)

    def grid_token_id(self, num_grids: int) -> int:
        return self.id(grid_token_name(num_grids))

    def grid_count(self, token_id: int) -> int:
        """Inverse of ``grid_token_id``: the number of 32-px cells a grid token stands for."""
        name = self.id_to_token.get(int(token_id), "")
        if not (name.startswith("<reserved") and name.endswith(">")):
            raise VocabError(f"token id {token_id} ({name!r}) is not a grid-size token")
        count = int(name[len("<reserved") : -1]) - GRID_TOKEN_BASE
        if count < 1:
            raise VocabError(f"token id {token_id} ({name!r}) is not a grid-size token")
        return count

    # ---- image codes --------------------------------------------------------------------------
    @cached_property
    def _image_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = sorted(
            (image_code_from_token_name(name), tid)
            for name, tid in self.token_to_id.items()
            if name.startswith(IMAGE_CODE_PREFIX)
        )
        codes = torch.tensor([c for c, _ in pairs], dtype=torch.long)
        bpe = torch.tensor([t for _, t in pairs], dtype=torch.long)
        return codes, bpe

    @property
    def image_token_ids(self) -> torch.Tensor:
        """BPE ids of all image code tokens, ordered by VQ code. Shape [K]."""
        return self._image_tokens[1]

    @property
    def num_image_codes(self) -> int:
        return int(self._image_tokens[0].max().item()) + 1

    @cached_property
    def vocab_size(self) -> int:
        return max(self.token_to_id.values()) + 1

    @cached_property
    def code_to_bpe(self) -> torch.Tensor:
        """Look-up table [num_image_codes] VQ code -> BPE id."""
        codes, bpe = self._image_tokens
        lut = torch.full((self.num_image_codes,), -1, dtype=torch.long)
        lut[codes] = bpe
        if (lut < 0).any():
            raise VocabError(f"vocabulary from {self.source} skips some image codes below {self.num_image_codes}")
        return lut

    @cached_property
    def bpe_to_code(self) -> torch.Tensor:
        """Look-up table [vocab_size] BPE id -> VQ code, -1 for tokens that are not image codes."""
        codes, bpe = self._image_tokens
        lut = torch.full((self.vocab_size,), -1, dtype=torch.long)
        lut[bpe] = codes
        return lut

    @cached_property
    def image_token_mask(self) -> torch.Tensor:
        """Bool [vocab_size]: True for image code tokens."""
        return self.bpe_to_code >= 0

    def is_image_code(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Elementwise: is each id an image code token? Ids < 0 (e.g. -100 labels) give False."""
        mask = self.image_token_mask.to(token_ids.device)
        safe = token_ids.clamp(min=0, max=mask.numel() - 1)
        return mask[safe] & (token_ids >= 0) & (token_ids < mask.numel())

    def codes_to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        return self.code_to_bpe.to(codes.device)[codes]

    def tokens_to_codes(self, token_ids: torch.Tensor) -> torch.Tensor:
        codes = self.bpe_to_code.to(token_ids.device)[token_ids]
        if (codes < 0).any():
            raise VocabError("tokens_to_codes got ids that are not image code tokens")
        return codes

    # ---- a pre-tokenised sample ----------------------------------------------------------------
    def split_sample(self, tokens: Sequence[int], prompt_len: int) -> tuple[list[int], torch.Tensor]:
        """(prompt ids without the <s> ... <eot> frame, the image's codes [h, w]) of a pre-tokenised text-to-image
        sample in Lumina-mGPT's layout (``tokens/layout.py``); ValueError (or IndexError) if it is not one.

        Every text vocabulary has this method: it is how generation and evaluation read MDS prompts whatever the
        backbone's layout (``tokens/janus.py`` for Janus-Pro's)."""
        tokens = [int(t) for t in tokens]
        if tokens[0] != self.bos_id or tokens[prompt_len - 1] != self.end_of_turn_id:
            raise ValueError("prompt is not framed as <s> ... <eot>")
        start = tokens.index(self.image_start_id, prompt_len)
        end = tokens.index(self.image_end_id, start)
        return tokens[1 : prompt_len - 1], tokens_to_image(tokens[start : end + 1], self)


def tokens_to_image(tokens: list[int] | torch.Tensor, vocab: ChameleonVocab) -> torch.Tensor:
    """Inverse of ``tokens/layout.py``'s ``image_to_tokens``: the image part (start .. end) -> codes [h, w]."""
    tokens = [int(t) for t in tokens]
    if tokens and tokens[0] == vocab.image_start_id:
        tokens = tokens[1:]
    if tokens and tokens[-1] == vocab.image_end_id:
        tokens = tokens[:-1]
    if len(tokens) < 2:
        raise ValueError("image part too short: expected grid tokens after <racm3:break>")
    h = vocab.grid_count(tokens[0]) * CODES_PER_GRID_CELL
    w = vocab.grid_count(tokens[1]) * CODES_PER_GRID_CELL
    body = torch.tensor(tokens[2:], dtype=torch.long)
    if body.numel() != h * (w + 1):
        raise ValueError(f"image part has {body.numel()} body tokens, expected {h} rows of {w} codes + row end")
    rows = body.view(h, w + 1)
    if not bool((rows[:, -1] == vocab.row_end_id).all()):
        raise ValueError("image rows must each end with the row-end token <reserved08799>")
    return vocab.tokens_to_codes(rows[:, :-1])


# ------------------------------------------------------------------------------------------------
# Debug vocabulary: same token names as Chameleon, a few hundred ids, a word-level text tokenizer.
# ------------------------------------------------------------------------------------------------

DEBUG_WORDS: tuple[str, ...] = tuple(
    """
    a an the one two three four five six seven eight nine zero no and of on in at with without
    image picture photo drawing scene x-ray chest view ap pa lateral of
    red green blue yellow orange purple pink cyan magenta white black gray grey brown dark light
    circle circles square squares triangle triangles disk disks ring rings bar bars cross crosses
    dot dots stripe stripes shape shapes star stars line lines
    left right top bottom center centre middle upper lower corner edge side
    small large big tiny huge medium
    background foreground bright dim
    horizontal vertical diagonal
    is are there
    , .
    """.split()
)


def build_debug_tokenizer(
    num_image_codes: int = 256,
    max_grid: int = DEBUG_MAX_GRID,
    words: Sequence[str] = DEBUG_WORDS,
):
    """A ``tokenizers.Tokenizer`` with Chameleon's special-token names and a small word vocabulary.

    Ids: 0 <s>, 1 <pad>, 2 </s>, 3 <unk>, then the image codes (as in Chameleon, image codes come
    right after the first specials), then the remaining specials, grid tokens, words and <REP>.
    """
    names: list[str] = [BOS, PAD, EOS, "<unk>"]
    names += [image_code_token_name(c) for c in range(num_image_codes)]
    names += [IMAGE_END, IMAGE_START, END_OF_TURN, ROW_END, "<image>"]
    names += [grid_token_name(n) for n in range(1, max_grid + 1)]
    seen = set(names)
    for w in words:
        if w not in seen:
            names.append(w)
            seen.add(w)
    names.append(REP_TOKEN)  # last, so that adding it left every other id unchanged
    vocab = {n: i for i, n in enumerate(names)}
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    specials = [n for n in names if n.startswith("<")]
    tokenizer.add_special_tokens(specials)
    return tokenizer


def build_debug_vocab(num_image_codes: int = 256, max_grid: int = DEBUG_MAX_GRID) -> ChameleonVocab:
    tok = build_debug_tokenizer(num_image_codes=num_image_codes, max_grid=max_grid)
    return ChameleonVocab(tok.get_vocab(with_added_tokens=True), source="debug tokenizer")
