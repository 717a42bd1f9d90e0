"""Token layout of one (prompt, image) sample, compatible with Lumina-mGPT pre-tokenization.

    <s> prompt <eot> | <racm3:break> <grid h> <grid w> (w codes, <row end>) x h <eoss> <eot>
    \\___ prompt_len ___/ \\______________________ supervised ______________________________/

<eot> is <reserved08706>, <row end> is <reserved08799>. Grid tokens count 32-px cells; the Chameleon
VQGAN downsamples by 16, so a cell is 2 x 2 codes and a 512 x 512 image has 32 x 32 codes and
3 + 32 * 33 + 1 = 1060 image-part tokens.
"""

from __future__ import annotations

import torch

from arra_ds.model.vocab import ChameleonVocab

CODES_PER_GRID_CELL = 2  # 32-px grid cell / 16-px VQ patch


def image_part_length(code_height: int, code_width: int) -> int:
    """Tokens in the image part: start + 2 grid tokens + rows (codes + row end) + end."""
    return 3 + code_height * (code_width + 1) + 1


def image_to_tokens(codes: torch.Tensor, vocab: ChameleonVocab) -> list[int]:
    """VQ codes [h, w] (h, w even) -> the image part of the sequence, as BPE ids."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [h, w], got shape {tuple(codes.shape)}")
    h, w = codes.shape
    if h % CODES_PER_GRID_CELL or w % CODES_PER_GRID_CELL:
        raise ValueError(f"code grid {h}x{w} must be a multiple of {CODES_PER_GRID_CELL} (32-px cells of 16-px codes)")
    bpe = vocab.codes_to_tokens(codes.long().cpu())  # [h, w]
    row_end = torch.full((h, 1), vocab.row_end_id, dtype=torch.long)
    body = torch.cat([bpe, row_end], dim=1).flatten().tolist()
    return [
        vocab.image_start_id,
        vocab.grid_token_id(h // CODES_PER_GRID_CELL),
        vocab.grid_token_id(w // CODES_PER_GRID_CELL),
        *body,
        vocab.image_end_id,
    ]


def tokens_to_image(tokens: list[int] | torch.Tensor, vocab: ChameleonVocab) -> torch.Tensor:
    """Inverse of ``image_to_tokens``: the image part (start .. end) -> codes [h, w]."""
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
    grid = body.view(h, w + 1)
    if not bool((grid[:, -1] == vocab.row_end_id).all()):
        raise ValueError("image rows must each end with the row-end token <reserved08799>")
    return vocab.tokens_to_codes(grid[:, :-1])


def conversation_tokens(prompt_ids: list[int], image_tokens: list[int], vocab: ChameleonVocab) -> tuple[list[int], int]:
    """(tokens, prompt_len) for one human prompt followed by the assistant's image."""
    prefix = [vocab.bos_id, *prompt_ids, vocab.end_of_turn_id]
    return prefix + list(image_tokens) + [vocab.end_of_turn_id], len(prefix)
