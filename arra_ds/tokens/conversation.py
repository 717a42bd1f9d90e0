"""Prompt text -> tokens, as Lumina-mGPT's conversation format does it.

Lumina-mGPT (``lumina_mgpt/data/convertsation.py`` and xllmx's ``MMConvItemProcessor``): each turn's
text is followed by <eot>, the whole conversation string is tokenised in one call after <s> with no
space added in front (xllmx re-tokenises each turn, with its prefix-space handling, only to assert
that the pieces agree with the full string and to place the label boundaries), ``<|image|>`` is an
added token replaced by the image part, and labels are -100 over human turns and the tokens
themselves over assistant turns. ``ConversationTokenizer`` reproduces that for any conversation and
any ``tokenizers`` tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from arra_ds.errors import InputNotFoundError, UserError
from arra_ds.tokens.layout import IGNORE_INDEX, IMAGE_PLACEHOLDER
from arra_ds.tokens.vocab import END_OF_TURN, ChameleonVocab

HUMAN_ROLES = ("human",)
ASSISTANT_ROLES = ("gpt", "assistant")




class ConversationError(UserError, ValueError):
    """A conversation that cannot be tokenised as asked; the message says what is wrong."""


def load_text_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a local JSON file (Chameleon's ``tokenizer/text_tokenizer.json``)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(
            f"text tokenizer {path} not found; pass the local text_tokenizer.json of the Chameleon / "
            "Lumina-mGPT checkpoint (nothing is downloaded)"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise ConversationError(f"{path} is not a `tokenizers` JSON file: {e}") from e


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
