"""One input item: checks, image loading and preprocessing (runs in DataLoader workers, never raises)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from arra_ds.data.images import VQImagePreprocessor, pil_to_pixels
from arra_ds.data.pretokenize.config import PretokenizeError, PretokenizeRunConfig
from arra_ds.data.pretokenize.sources import CaptionItem, MemberRef, read_member
from arra_ds.tokens.conversation import ASSISTANT_ROLES, HUMAN_ROLES, ConversationError, ConversationTokenizer
from arra_ds.tokens.layout import IMAGE_PLACEHOLDER
from arra_ds.tokens.vocab import REP_TOKEN


class BadItem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def item_uid(item: Any, index: int) -> str:
    """The item's "uid" / "id" if it has one, else its image path as written in the JSON (a caption
    item: its own uid, see ``sources.CaptionItem``)."""
    if isinstance(item, CaptionItem):
        return item.uid
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


def parse_caption_item(item: CaptionItem, root: Path) -> tuple[str, str, Path | MemberRef]:
    """-> (prompt, answer with the placeholder, image source) of a table row, pair or shard sample; raises BadItem."""
    if item.problem is not None:
        raise BadItem(*item.problem)
    text = item.text
    if item.text_file is not None:
        source = item.text_file
        try:
            raw = read_member(source) if isinstance(source, MemberRef) else (root / source).read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            where = source.describe() if isinstance(source, MemberRef) else root / source
            raise BadItem("unreadable_caption", f"{where}: {type(e).__name__}: {e}") from None
    if text is not None and not isinstance(text, str):
        raise BadItem("bad_format", f"the caption is {type(text).__name__}, not text")
    if text is None or not text.strip():
        raise BadItem("empty_text", "the caption is empty")
    image = item.image if isinstance(item.image, MemberRef) else root / item.image
    return text.strip(), IMAGE_PLACEHOLDER, image


def describe_image(source: Path | MemberRef) -> str:
    return source.describe() if isinstance(source, MemberRef) else str(source)


def open_image(source: Path | MemberRef, min_size: int) -> Image.Image:
    """An image file, or a tar member (``sources.MemberRef``), loaded; raises BadItem."""
    if isinstance(source, Path) and not source.is_file():
        raise BadItem("missing_image", f"{source} does not exist")
    try:
        with Image.open(io.BytesIO(read_member(source)) if isinstance(source, MemberRef) else source) as handle:
            handle.load()
            image = handle.copy()
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, DecompressionBombError, ...)
        raise BadItem("unreadable_image", f"{describe_image(source)}: {type(e).__name__}: {e}") from None
    check_image_size(image, source, min_size)
    return image


def check_image_size(image: Image.Image, source: Path | MemberRef, min_size: int) -> None:
    if min(image.size) < min_size:
        raise BadItem(
            "image_too_small", f"{describe_image(source)} is {image.size[0]}x{image.size[1]}, shorter side < {min_size}"
        )


class ItemDataset(Dataset):
    """(index, raw item) -> a checked, preprocessed record, or a bad-item record. Never raises.

    An item is a conversation JSON object or a ``sources.CaptionItem`` (table row, pair, shard sample).
    ``rep_token``: the answer text is prefixed with <REP> (<reserved08795>) before tokenisation, exactly as
    the ARRA reference's `rep` ablation does (``xllmx/data/item_processor_new.py``).
    ``measure_only`` (the dry run): the record keeps the image's size and its crop size instead of pixels.
    """

    def __init__(self, items: list[tuple[int, Any]], conversation_tokenizer: ConversationTokenizer,
                 vq_preprocess: VQImagePreprocessor, encoder_preprocess: dict, image_root: Path, min_image_size: int,
                 rep_token: bool = False, measure_only: bool = False, patch_preprocess: dict | None = None):
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
        self.patch_preprocess = patch_preprocess or {}  # encoder name -> its patch_preprocess (patch_features=true)
        self.image_root = image_root
        self.min_image_size = min_image_size
        self.measure_only = measure_only

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict:
        index, item = self.items[position]
        record = {"index": index, "uid": item_uid(item, index)}
        try:
            if isinstance(item, CaptionItem):
                record["image"] = describe_image(item.image) if item.image is not None else None
                prompt, answer, source = parse_caption_item(item, self.image_root)
            else:
                prompt, answer, images = parse_item(item)
                record["image"] = images[0]
                source = self.image_root / images[0]
            tokenized = self.conversation_tokenizer.tokenize([("human", prompt), ("gpt", self.answer_prefix + answer)])
            image = open_image(source, min_size=0)
            record["image_size"] = image.size  # (w, h): the dry run's histogram counts too small images too
            check_image_size(image, source, self.min_image_size)
            record.update(caption=prompt, text=tokenized)
            if self.measure_only:
                record["crop_size"] = self.vq_preprocess.crop_size(image.size)  # (w, h) px
            else:
                crop = self.vq_preprocess.crop(image)
                record.update(
                    pixels=pil_to_pixels(crop),
                    encoder_pixels={name: pre(image) for name, pre in self.encoder_preprocess.items()},
                    # patch features see exactly the VQ crop: patches and codes tile the same picture
                    patch_pixels={name: pre(crop) for name, pre in self.patch_preprocess.items()},
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


def record_loader(dataset: Dataset, cfg: PretokenizeRunConfig) -> DataLoader:
    """The records of ``dataset`` in input order, read by ``cfg.num_workers`` DataLoader workers."""
    return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=keep_records)
