"""Token layout of one (prompt, image) sample and the image-grid geometry, in one place.

    <s> prompt <eot> | [<REP>] <racm3:break> <grid h> <grid w> (w codes, <row end>) x h <eoss> <eot>
    \\___ prompt_len ___/ \\__________________________ supervised __________________________________/

<eot> is <reserved08706>, <row end> is <reserved08799>. <REP> (<reserved08795>) is there only in data
pre-tokenised for the `rep` alignment ablation (``rep_token=true``): the ARRA reference puts it at the
start of the assistant turn, so it is supervised and ``prompt_len`` does not change.

Geometry (Lumina-mGPT's): the Chameleon VQGAN gives one code per ``CODE_PATCH_PX`` = 16 pixels, and a
grid token counts ``GRID_CELL_PX`` = 32-px cells, i.e. ``CODES_PER_GRID_CELL`` = 2 codes per side. A
512 x 512 image has 32 x 32 codes and 3 + 32 * 33 + 1 = 1060 image-part tokens. ``ImageGrid`` is the code
grid of one image: what the pre-tokenizer writes, what the sampler draws and forces, what the decoder
turns into pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# tokens_to_image and CODES_PER_GRID_CELL live with the vocabulary (ChameleonVocab.split_sample reads a sample with
# them); import them from arra_ds.tokens.vocab.
from arra_ds.tokens.vocab import CODES_PER_GRID_CELL, REP_TOKEN, ChameleonVocab

IGNORE_INDEX = -100  # label of tokens that are not trained (the prompt, padding)
CODE_PATCH_PX = 16  # pixels per VQ code side (the Chameleon VQGAN's downsampling factor)
GRID_CELL_PX = CODE_PATCH_PX * CODES_PER_GRID_CELL  # 32: pixels per side of one grid-token cell
IMAGE_PLACEHOLDER = "<|image|>"  # marks where an image goes in the conversation JSON


@dataclass(frozen=True)
class ImageGrid:
    """The h x w code grid of one image, and where its part of the sequence draws or forces tokens.

    Image part: <racm3:break> <grid h> <grid w>, then for each of h rows: w codes, <row end>; then <eoss>.
    """

    code_height: int
    code_width: int

    def __post_init__(self) -> None:
        if min(self.code_height, self.code_width) < 1:
            raise ValueError(f"code grid {self.code_height}x{self.code_width} must have at least one code per side")

    def check_grid_cells(self) -> None:
        """The Chameleon layout counts the grid in cells of 2 x 2 codes (its grid tokens): raise unless it fits."""
        if self.code_height % CODES_PER_GRID_CELL or self.code_width % CODES_PER_GRID_CELL:
            raise ValueError(
                f"code grid {self.code_height}x{self.code_width} must be a positive multiple of "
                f"{CODES_PER_GRID_CELL} per side ({GRID_CELL_PX}-px cells of {CODE_PATCH_PX}-px codes)"
            )

    @classmethod
    def for_pixels(cls, height: int, width: int) -> "ImageGrid":
        return cls(height // CODE_PATCH_PX, width // CODE_PATCH_PX)

    @property
    def height_px(self) -> int:
        return self.code_height * CODE_PATCH_PX

    @property
    def width_px(self) -> int:
        return self.code_width * CODE_PATCH_PX

    @property
    def part_length(self) -> int:
        """Tokens in the image part: start + 2 grid tokens + rows (codes + row end) + end."""
        return 3 + self.body_length

    @property
    def body_length(self) -> int:
        """Tokens after the grid tokens: h rows of (w codes + row end), then <eoss>."""
        return self.code_height * (self.code_width + 1) + 1

    def prefix(self, vocab: ChameleonVocab) -> list[int]:
        self.check_grid_cells()
        return [
            vocab.image_start_id,
            vocab.grid_token_id(self.code_height // CODES_PER_GRID_CELL),
            vocab.grid_token_id(self.code_width // CODES_PER_GRID_CELL),
        ]

    def forced_token(self, step: int, vocab: ChameleonVocab) -> int | None:
        """The token forced at body position ``step`` (row end or <eoss>), None where a code is drawn."""
        if step == self.body_length - 1:
            return vocab.image_end_id
        if step % (self.code_width + 1) == self.code_width:
            return vocab.row_end_id
        return None


def is_valid_pixel_size(pixels: int) -> bool:
    return pixels >= GRID_CELL_PX and pixels % GRID_CELL_PX == 0


def image_part_length(code_height: int, code_width: int) -> int:
    """Tokens in the image part of an h x w code grid (see ``ImageGrid.part_length``)."""
    return ImageGrid(code_height, code_width).part_length


def image_to_tokens(codes: torch.Tensor, vocab: ChameleonVocab) -> list[int]:
    """VQ codes [h, w] (h, w even) -> the image part of the sequence, as BPE ids."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [h, w], got shape {tuple(codes.shape)}")
    grid = ImageGrid(*codes.shape)
    bpe = vocab.codes_to_tokens(codes.long().cpu())  # [h, w]
    row_end = torch.full((grid.code_height, 1), vocab.row_end_id, dtype=torch.long)
    body = torch.cat([bpe, row_end], dim=1).flatten().tolist()
    return [*grid.prefix(vocab), *body, vocab.image_end_id]


def image_grid_of_sample(tokens: Sequence[int], vocab: ChameleonVocab) -> ImageGrid:
    """The code grid of the (first) image in a pre-tokenised sample, read from its grid tokens."""
    tokens = [int(t) for t in tokens]
    try:
        start = tokens.index(vocab.image_start_id)
    except ValueError:
        raise ValueError("the sample has no image (<racm3:break> not found)") from None
    if start + 2 >= len(tokens):
        raise ValueError("the sample ends right after <racm3:break>: no grid tokens")
    return ImageGrid(
        vocab.grid_count(tokens[start + 1]) * CODES_PER_GRID_CELL, vocab.grid_count(tokens[start + 2]) * CODES_PER_GRID_CELL
    )


def conversation_tokens(
    prompt_ids: list[int], image_tokens: list[int], vocab: ChameleonVocab, rep_token: bool = False
) -> tuple[list[int], int]:
    """(tokens, prompt_len) for one human prompt followed by the assistant's image (``rep_token``: the
    assistant turn opens with <REP>, as the ARRA reference's `rep` data does)."""
    prefix = [vocab.bos_id, *prompt_ids, vocab.end_of_turn_id]
    rep = [vocab.id(REP_TOKEN)] if rep_token else []
    return prefix + rep + list(image_tokens) + [vocab.end_of_turn_id], len(prefix)


def labels_for(tokens: Sequence[int], prompt_len: int) -> list[int]:
    """Training labels of a (tokens, prompt_len) sample: -100 over the prompt, the tokens after it."""
    return [IGNORE_INDEX] * prompt_len + list(tokens[prompt_len:])
