"""Token layout of one (prompt, image) sample, compatible with Lumina-mGPT pre-tokenization.

    <s> prompt <eot> | <racm3:break> <grid h> <grid w> (w codes, <row end>) x h <eoss> <eot>
    \\___ prompt_len ___/ \\______________________ supervised ______________________________/

<eot> is <reserved08706>, <row end> is <reserved08799>. Grid tokens count 32-px cells; the Chameleon
VQGAN downsamples by 16, so a cell is 2 x 2 codes and a 512 x 512 image has 32 x 32 codes and
3 + 32 * 33 + 1 = 1060 image-part tokens.

Text follows Lumina-mGPT's conversation format (``lumina_mgpt/data/convertsation.py`` and xllmx's
``MMConvItemProcessor``): each turn's text is followed by <eot>, the whole conversation string is
tokenised in one call after <s> with no space added in front (xllmx re-tokenises each turn, with
its prefix-space handling, only to assert that the pieces agree with the full string and to place
the label boundaries), ``<|image|>`` is an added token replaced by the image part, and labels are
-100 over human turns and the tokens themselves over assistant turns. ``ConversationTokenizer``
reproduces that for any conversation and any ``tokenizers`` tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from arra_ds.model.losses import IGNORE_INDEX
from arra_ds.model.vocab import END_OF_TURN, ChameleonVocab

IMAGE_PLACEHOLDER = "<|image|>"  # marks where an image goes in the conversation JSON
HUMAN_ROLES = ("human",)
ASSISTANT_ROLES = ("gpt", "assistant")

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


def labels_for(tokens: Sequence[int], prompt_len: int) -> list[int]:
    """Training labels of a (tokens, prompt_len) sample: -100 over the prompt, the tokens after it."""
    return [IGNORE_INDEX] * prompt_len + list(tokens[prompt_len:])


# ------------------------------------------------------------------------------------------------
# Text: Chameleon's text_tokenizer.json and Lumina-mGPT's conversation layout
# ------------------------------------------------------------------------------------------------


class ConversationError(ValueError):
    """A conversation that cannot be tokenised as asked; the message says what is wrong."""


def load_text_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a local JSON file (Chameleon's ``tokenizer/text_tokenizer.json``)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"text tokenizer {path} not found; pass the local text_tokenizer.json of the Chameleon / "
            "Lumina-mGPT checkpoint (nothing is downloaded)"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a `tokenizers` JSON file: {e}") from e


@dataclass
class TokenizedConversation:
    """Text tokens of one conversation with one placeholder id per image, and which tokens are trained."""

    tokens: list[int]  # includes <s>; each image is one placeholder id, replaced by ``with_images``
    supervised: list[bool]  # per token: True inside assistant turns
    placeholder_id: int

    @property
    def num_images(self) -> int:
        return sum(1 for t in self.tokens if t == self.placeholder_id)

    @property
    def prompt_len(self) -> int:
        """Leading tokens that are not trained (the human turn); len(tokens) when nothing is trained."""
        return next((i for i, s in enumerate(self.supervised) if s), len(self.tokens))

    def with_images(self, image_parts: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
        """Replace placeholders by image parts (``image_to_tokens``) -> (tokens, labels)."""
        if len(image_parts) != self.num_images:
            raise ConversationError(f"{self.num_images} {IMAGE_PLACEHOLDER} placeholders but {len(image_parts)} images")
        parts = iter(image_parts)
        tokens: list[int] = []
        labels: list[int] = []
        for token, trained in zip(self.tokens, self.supervised):
            piece = list(next(parts)) if token == self.placeholder_id else [token]
            tokens += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        return tokens, labels


class ConversationTokenizer:
    """Lumina-mGPT's conversation -> tokens for a ``tokenizers.Tokenizer`` with Chameleon's token names.

    Picklable (DataLoader workers tokenise in parallel).
    """

    def __init__(self, tokenizer, vocab: ChameleonVocab):
        from tokenizers import Tokenizer

        # A private copy with the placeholder as an added token, as MMConvItemProcessor adds it: the
        # text on both sides of it is then tokenised exactly as Lumina-mGPT's full-string encode does.
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
        if self.tokenizer.token_to_id(IMAGE_PLACEHOLDER) is None:
            self.tokenizer.add_tokens([IMAGE_PLACEHOLDER])
        self.placeholder_id = self.tokenizer.token_to_id(IMAGE_PLACEHOLDER)
        self.vocab = vocab
        eot = self.encode(END_OF_TURN)
        if eot != [vocab.end_of_turn_id]:
            raise ConversationError(
                f"the tokenizer encodes the end-of-turn text {END_OF_TURN!r} as {eot}, not as the single id "
                f"{vocab.end_of_turn_id}; it must be an added (special) token as in Chameleon's text_tokenizer.json"
            )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize(self, turns: Sequence[tuple[str, str]]) -> TokenizedConversation:
        """turns: (role, text) pairs alternating human / assistant ("gpt"), starting with human."""
        if not turns:
            raise ConversationError("the conversation has no turns")
        texts = []
        for i, (role, text) in enumerate(turns):
            expected = HUMAN_ROLES if i % 2 == 0 else ASSISTANT_ROLES
            if str(role).lower() not in expected:
                raise ConversationError(f"turn {i} is from {role!r}; turns must alternate {HUMAN_ROLES} / {ASSISTANT_ROLES}")
            if not isinstance(text, str):
                raise ConversationError(f"turn {i} text must be a string, got {type(text).__name__}")
            texts.append(text + END_OF_TURN)
        conversation = "".join(texts)
        turn_ends, end = [], 0
        for text in texts:
            end += len(text)
            turn_ends.append(end)
        encoding = self.tokenizer.encode(conversation, add_special_tokens=False)
        tokens = [self.vocab.bos_id]
        supervised = [False]
        turn = 0
        for token_id, (start, stop) in zip(encoding.ids, encoding.offsets):
            while start >= turn_ends[turn]:
                turn += 1
            if stop > turn_ends[turn]:
                raise ConversationError(f"token {token_id} spans the end of turn {turn}; is {END_OF_TURN} an added token?")
            tokens.append(token_id)
            supervised.append(turn % 2 == 1)
        return TokenizedConversation(tokens, supervised, self.placeholder_id)


def text_to_image_sample(
    prompt: str, image_part: Sequence[int], conversation_tokenizer: ConversationTokenizer
) -> tuple[list[int], int]:
    """(tokens, prompt_len) of the text-to-image conversation [human: prompt, gpt: <|image|>]."""
    tokenized = conversation_tokenizer.tokenize([("human", prompt), ("gpt", IMAGE_PLACEHOLDER)])
    if tokenized.num_images != 1:
        raise ConversationError(f"the prompt contains {IMAGE_PLACEHOLDER}; a text-to-image prompt must be text only")
    tokens, _ = tokenized.with_images([image_part])
    return tokens, tokenized.prompt_len
