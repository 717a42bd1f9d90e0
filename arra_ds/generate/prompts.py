"""Prompts for generation and evaluation, and the real images that go with them.

Sources (``load_prompts``):
- ``*.txt``: one prompt per line (blank lines skipped); no real images.
- ``*.json``: the ARRA / Lumina-mGPT conversation list (``conversations`` with a human prompt and a
  ``<|image|>`` answer, ``image`` with one path); the real image is that file (relative paths are
  taken relative to the JSON file's folder). Items without exactly one image are skipped and counted.
- an MDS directory (``index.json``): the ``caption`` column is the prompt text, ``tokens[:prompt_len]``
  the exact prompt ids used in training, and the image part of ``tokens`` the real image's VQ codes
  (the real image is their VQGAN reconstruction, so FID against it measures the generator alone).

Prompts keep their order in the source; ``limit`` takes the first n.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from streaming import StreamingDataset

from arra_ds.data.loader import ensure_streaming_env
from arra_ds.data.schema import check_columns
from arra_ds.errors import InputNotFoundError, UserError
from arra_ds.tokens.layout import IMAGE_PLACEHOLDER, tokens_to_image
from arra_ds.tokens.vocab import ChameleonVocab


class PromptError(UserError, ValueError):
    """A prompt source that cannot be read or holds no usable prompt; the message names the file."""


@dataclass
class Prompt:
    index: int
    text: str
    uid: str
    prompt_ids: list[int] | None = None  # exact training prompt ids (MDS source); else tokenised later
    real_image_path: str | None = None  # JSON source
    real_codes: np.ndarray | None = None  # MDS source: [h, w] VQ codes of the real image

    @property
    def has_real_image(self) -> bool:
        return self.real_image_path is not None or self.real_codes is not None


@dataclass
class PromptSet:
    prompts: list[Prompt]
    source: str
    kind: str  # txt | json | mds
    skipped: list[dict] = field(default_factory=list)  # {"item": i, "reason": ...}

    @property
    def has_real_images(self) -> bool:
        return bool(self.prompts) and all(p.has_real_image for p in self.prompts)


def _from_txt(path: Path, limit: int) -> PromptSet:
    lines = [line.strip() for line in path.read_text().splitlines()]
    texts = [t for t in lines if t]
    if limit:
        texts = texts[:limit]
    prompts = [Prompt(i, t, uid=f"{path.stem}:{i}") for i, t in enumerate(texts)]
    return PromptSet(prompts, str(path), "txt")


def _from_json(path: Path, limit: int) -> PromptSet:
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PromptError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(items, list):
        raise PromptError(f"{path} must hold a list of conversation items (the ARRA pre-tokenization format)")
    prompts, skipped = [], []
    for item_index, item in enumerate(items):
        if limit and len(prompts) >= limit:
            break
        turns = item.get("conversations", []) if isinstance(item, dict) else []
        human = [t.get("value", "") for t in turns if t.get("from") == "human"]
        images = item.get("image", []) if isinstance(item, dict) else []
        images = [images] if isinstance(images, str) else images
        reason = None
        if len(human) != 1 or not human[0].strip():
            reason = f"expected one non-empty human turn, found {len(human)}"
        elif len(images) != 1:
            reason = f"expected one image, found {len(images)}"
        elif IMAGE_PLACEHOLDER in human[0]:
            reason = "the human turn holds an image (not a text-to-image item)"
        if reason:
            skipped.append({"item": item_index, "reason": reason})
            continue
        image_path = Path(images[0])
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        prompts.append(
            Prompt(len(prompts), human[0].strip(), uid=item.get("id", image_path.stem), real_image_path=str(image_path))
        )
    return PromptSet(prompts, str(path), "json", skipped)


def _from_mds(path: Path, limit: int, vocab: ChameleonVocab, dataset=None) -> PromptSet:
    if dataset is None:
        check_columns(path, None)
        ensure_streaming_env()
        dataset = StreamingDataset(local=str(path), shuffle=False, batch_size=1)
    total = dataset.num_samples
    count = min(limit, total) if limit else total
    prompts, skipped = [], []
    for i in range(count):
        sample = dataset.get_item(i)
        tokens = np.asarray(sample["tokens"], dtype=np.int64)
        prompt_len = int(sample["prompt_len"])
        try:
            if tokens[0] != vocab.bos_id or tokens[prompt_len - 1] != vocab.end_of_turn_id:
                raise ValueError("prompt is not framed as <s> ... <eot>")
            start = int(np.flatnonzero(tokens[prompt_len:] == vocab.image_start_id)[0]) + prompt_len
            end = int(np.flatnonzero(tokens[start:] == vocab.image_end_id)[0]) + start
            codes = tokens_to_image(tokens[start : end + 1].tolist(), vocab).numpy()
        except (ValueError, IndexError) as e:
            skipped.append({"item": i, "uid": str(sample.get("uid", "")), "reason": f"cannot read the sample: {e}"})
            continue
        prompts.append(
            Prompt(
                len(prompts),
                str(sample["caption"]),
                uid=str(sample["uid"]),
                prompt_ids=tokens[1 : prompt_len - 1].tolist(),
                real_codes=codes,
            )
        )
    return PromptSet(prompts, str(path), "mds", skipped)


def prompts_from_texts(texts: list[str]) -> PromptSet:
    texts = [t.strip() for t in texts]
    if not all(texts):
        raise PromptError("empty prompt text: every --prompt / prompt_texts entry needs some text")
    return PromptSet([Prompt(i, t, uid=f"prompt:{i}") for i, t in enumerate(texts)], "<command line>", "txt")


def load_prompts(source: str | Path, vocab: ChameleonVocab, limit: int = 0, dataset=None) -> PromptSet:
    """Prompts from a .txt, a conversation .json or an MDS directory (see the module docstring).
    ``dataset``: an already open ``StreamingDataset`` over the MDS source (the trainer's)."""
    path = Path(source)
    if dataset is not None or (path / "index.json").is_file():
        result = _from_mds(path, limit, vocab, dataset)
    elif path.suffix == ".json" and path.is_file():
        result = _from_json(path, limit)
    elif path.is_file():
        result = _from_txt(path, limit)
    else:
        raise InputNotFoundError(f"prompt source {path} not found: give a .txt, a conversation .json or an MDS directory")
    if not result.prompts:
        raise PromptError(f"no usable prompts in {path} ({len(result.skipped)} items skipped: {result.skipped[:3]})")
    return result
