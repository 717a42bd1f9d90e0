"""Prompts for generation and evaluation, and the real images that go with them. A prompt is the condition of
a sample: a text (text-to-image backbones) or a class label (class-conditional ones, ``class_id``).

Sources (``load_prompts``, ``prompts_from_texts``, ``prompts_from_classes``):
- ``*.txt``: one prompt per line (blank lines skipped); no real images.
- ``*.json``: the ARRA / Lumina-mGPT conversation list (``conversations`` with a human prompt and a
  ``<|image|>`` answer, ``image`` with one path); the real image is that file (relative paths are
  taken relative to the JSON file's folder). Items without exactly one image are skipped and counted.
- an MDS directory (``index.json``): the ``caption`` column is the prompt text, ``tokens[:prompt_len]``
  the exact prompt ids used in training, and the image part of ``tokens`` the real image's VQ codes
  (the real image is their VQGAN reconstruction, so FID against it measures the generator alone). Class-to-image
  MDS data (a ``class_id`` column) gives class prompts: the label, its name (``caption``), the real image's codes.
- class ids (``classes=[...]`` of generation and evaluation); no real images.

Prompts keep their order in the source; ``limit`` takes the first n.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from streaming import StreamingDataset

from arra_ds.data.loader import ensure_streaming_env
from arra_ds.data.schema import CLASS_COLUMN, check_columns
from arra_ds.errors import InputNotFoundError, UserError
from arra_ds.tokens.layout import IMAGE_PLACEHOLDER
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
    class_id: int | None = None  # the condition of a class-conditional model (its text is the class name)

    @property
    def is_class(self) -> bool:
        return self.class_id is not None

    @property
    def has_real_image(self) -> bool:
        return self.real_image_path is not None or self.real_codes is not None


@dataclass
class PromptSet:
    prompts: list[Prompt]
    source: str
    kind: str  # txt | json | mds | classes
    skipped: list[dict] = field(default_factory=list)  # {"item": i, "reason": ...}

    @property
    def has_real_images(self) -> bool:
        return bool(self.prompts) and all(p.has_real_image for p in self.prompts)

    @property
    def of_classes(self) -> bool:
        """Class labels (for a class-conditional model) rather than texts."""
        return bool(self.prompts) and self.prompts[0].is_class


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


def _open_mds(path: Path, class_conditional: bool):
    check_columns(path, None, class_conditional)
    ensure_streaming_env()
    return StreamingDataset(local=str(path), shuffle=False, batch_size=1)


def _class_prompts_from_mds(path: Path, limit: int, dataset=None) -> PromptSet:
    """Class-to-image samples: the label, its name and the real image's codes (a square grid, raster order)."""
    dataset = dataset if dataset is not None else _open_mds(path, class_conditional=True)
    count = min(limit, dataset.num_samples) if limit else dataset.num_samples
    prompts = []
    for i in range(count):
        sample = dataset.get_item(i)
        codes = np.asarray(sample["tokens"], dtype=np.int64)
        side = math.isqrt(codes.size)
        prompts.append(Prompt(
            len(prompts), str(sample["caption"]), uid=str(sample["uid"]), class_id=int(sample[CLASS_COLUMN]),
            real_codes=codes.reshape(side, side) if side * side == codes.size else None,
        ))
    return PromptSet(prompts, str(path), "mds")


def _from_mds(path: Path, limit: int, vocab: ChameleonVocab | None, dataset=None) -> PromptSet:
    if vocab is None:  # a class-conditional model reads class-to-image samples
        return _class_prompts_from_mds(path, limit, dataset)
    if dataset is None:
        dataset = _open_mds(path, class_conditional=False)
    total = dataset.num_samples
    count = min(limit, total) if limit else total
    prompts, skipped = [], []
    for i in range(count):
        sample = dataset.get_item(i)
        tokens = np.asarray(sample["tokens"], dtype=np.int64)
        prompt_len = int(sample["prompt_len"])
        try:  # the layout is the vocabulary's (Lumina-mGPT's for the Chameleon family, tokens/janus.py for Janus)
            prompt_ids, codes = vocab.split_sample(tokens, prompt_len)
        except (ValueError, IndexError) as e:
            skipped.append({"item": i, "uid": str(sample.get("uid", "")), "reason": f"cannot read the sample: {e}"})
            continue
        prompts.append(
            Prompt(
                len(prompts),
                str(sample["caption"]),
                uid=str(sample["uid"]),
                prompt_ids=prompt_ids,
                real_codes=codes.numpy(),
            )
        )
    return PromptSet(prompts, str(path), "mds", skipped)


def prompts_from_texts(texts: list[str]) -> PromptSet:
    texts = [t.strip() for t in texts]
    if not all(texts):
        raise PromptError("empty prompt text: every --prompt / prompt_texts entry needs some text")
    return PromptSet([Prompt(i, t, uid=f"prompt:{i}") for i, t in enumerate(texts)], "<command line>", "txt")


def prompts_from_classes(class_ids: list[int], names: list[str] | None = None) -> PromptSet:
    """Class labels as prompts (``names``: readable class names by id, if known)."""
    names = names or []
    prompts = [
        Prompt(i, names[c] if c < len(names) else f"class {c}", uid=f"class:{c}", class_id=int(c))
        for i, c in enumerate(class_ids)
    ]
    return PromptSet(prompts, "<classes>", "classes")


def load_prompts(source: str | Path, vocab: ChameleonVocab | None, limit: int = 0, dataset=None) -> PromptSet:
    """Prompts from a .txt, a conversation .json or an MDS directory (see the module docstring); ``vocab`` is the
    model's text vocabulary, None for a class-conditional model (which reads class-to-image MDS data).
    ``dataset``: an already open ``StreamingDataset`` over the MDS source (the trainer's)."""
    path = Path(source)
    if vocab is None and dataset is None and not (path / "index.json").is_file():
        raise PromptError(
            f"prompts={path}: a class-conditional model takes class-to-image MDS data (with a '{CLASS_COLUMN}' "
            "column) or classes=[...], not text prompts"
        )
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
