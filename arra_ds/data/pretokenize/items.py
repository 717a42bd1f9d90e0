"""One input item: checks, image loading and preprocessing (runs in DataLoader workers, never raises)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from arra_ds.data.images import VQImagePreprocessor
from arra_ds.data.pretokenize.config import PretokenizeError
from arra_ds.tokens.conversation import ASSISTANT_ROLES, HUMAN_ROLES, ConversationError, ConversationTokenizer
from arra_ds.tokens.layout import IMAGE_PLACEHOLDER
from arra_ds.tokens.vocab import REP_TOKEN


class BadItem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def item_uid(item: Any, index: int) -> str:
    """The item's "uid" / "id" if it has one, else its image path as written in the JSON."""
    if isinstance(item, dict):
        for key in ("uid", "id"):
            if item.get(key) not in (None, ""):
                return str(item[key])
        images = item.get("image")
        if isinstance(images, list) and images:
            return str(images[0])
        if isinstance(images, str) and images:
            return images
    return f"item-{index}"


def parse_item(item: Any) -> tuple[str, str, list[str]]:
    """-> (prompt, answer text with the placeholder, image paths); raises BadItem."""
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        raise BadItem("bad_format", "item is not an object with a 'conversations' list")
    turns = item["conversations"]
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) and "from" in t for t in turns):
        raise BadItem("bad_format", "every turn needs 'from' and a string 'value'")
    roles = [str(t["from"]).lower() for t in turns]
    if len(turns) != 2 or roles[0] not in HUMAN_ROLES or roles[1] not in ASSISTANT_ROLES:
        raise BadItem("unsupported_conversation", f"turns {roles}: expected one human prompt and one gpt answer")
    prompt, answer = turns[0]["value"], turns[1]["value"]
    if not prompt.strip():
        raise BadItem("empty_text", "the human prompt is empty")
    images = item.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise BadItem("bad_format", "'image' must be a path or a list of paths")
    placeholders = prompt.count(IMAGE_PLACEHOLDER) + answer.count(IMAGE_PLACEHOLDER)
    if placeholders != len(images):
        raise BadItem("placeholder_count", f"{placeholders} {IMAGE_PLACEHOLDER} in the text but {len(images)} images")
    if len(images) != 1 or IMAGE_PLACEHOLDER in prompt:
        raise BadItem("unsupported_conversation", "a sample must be one text prompt and one image in the answer")
    return prompt, answer, images


def open_image(path: Path, min_size: int) -> Image.Image:
    if not path.is_file():
        raise BadItem("missing_image", f"{path} does not exist")
    try:
        with Image.open(path) as handle:
            handle.load()
            image = handle.copy()
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, DecompressionBombError, ...)
        raise BadItem("unreadable_image", f"{path}: {type(e).__name__}: {e}") from None
    if min(image.size) < min_size:
        raise BadItem("image_too_small", f"{path} is {image.size[0]}x{image.size[1]}, shorter side < {min_size}")
    return image


class ItemDataset(Dataset):
    """(index, raw item) -> a checked, preprocessed record, or a bad-item record. Never raises.

    ``rep_token``: the answer text is prefixed with <REP> (<reserved08795>) before tokenisation, exactly as
    the ARRA reference's `rep` ablation does (``xllmx/data/item_processor_new.py``).
    """

    def __init__(self, items: list[tuple[int, Any]], conversation_tokenizer: ConversationTokenizer,
                 vq_preprocess: VQImagePreprocessor, encoder_preprocess: dict, image_root: Path, min_image_size: int,
                 rep_token: bool = False):
        if rep_token and conversation_tokenizer.encode(REP_TOKEN) != [conversation_tokenizer.vocab.id(REP_TOKEN)]:
            raise PretokenizeError(
                f"rep_token=true: the tokenizer does not encode {REP_TOKEN} as its single id; it must be an added "
                "(special) token, as in Chameleon's text_tokenizer.json"
            )
        self.answer_prefix = REP_TOKEN if rep_token else ""
        self.items = items
        self.conversation_tokenizer = conversation_tokenizer
        self.vq_preprocess = vq_preprocess
        self.encoder_preprocess = encoder_preprocess
        self.image_root = image_root
        self.min_image_size = min_image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict:
        index, item = self.items[position]
        record = {"index": index, "uid": item_uid(item, index)}
        try:
            prompt, answer, images = parse_item(item)
            record["image"] = images[0]
            tokenized = self.conversation_tokenizer.tokenize([("human", prompt), ("gpt", self.answer_prefix + answer)])
            image = open_image(self.image_root / images[0], self.min_image_size)
            record.update(
                caption=prompt,
                text=tokenized,
                pixels=self.vq_preprocess(image),
                encoder_pixels={name: pre(image) for name, pre in self.encoder_preprocess.items()},
            )
        except BadItem as e:
            record.update(reason=e.reason, detail=e.detail)
        except ConversationError as e:
            record.update(reason="bad_text", detail=str(e))
        except Exception as e:  # a bad item must never stop the job; the report keeps the cause
            record.update(reason="error", detail=f"{type(e).__name__}: {e}")
        return record


def keep_records(records: list[dict]) -> list[dict]:
    """DataLoader collate_fn: a batch stays a list of records (tensors are stacked per crop size later)."""
    return records
