"""Class-conditional pre-tokenization (ARRA-Base): an ImageFolder tree -> class-to-image MDS samples.

    python launch/pretokenize_imagefolder.py input=/data/imagenet/train out_dir=/data/imagenet256_mds \
        vq_ckpt=ckpts/vq_ds16_c2i.pt encoders=[clip_b16=/models/clip-vit-b16] image_size=256 num_procs=8

Input: ``<input>/<class folder>/**/<image>`` (ImageNet's layout). The class index is the position of
the folder among the sorted folder names (torchvision's ImageFolder, what LlamaGen trains with), or
the line of the folder in ``class_map``: a text file with one class per line, its folder name first
and optionally a readable name after it (ImageNet's ``LOC_synset_mapping.txt``: ``n01440764 tench,
Tinca tinca``). The readable name (else the folder name) becomes the sample's ``caption``.

Each image is cropped as LlamaGen's ``extract_codes_c2i.py`` does (``crops``):

    center       ADM's centre crop to image_size (BOX-halve, BICUBIC resize of the short side, centre)
    center_flip  that crop and its mirror image (upstream's default: two code sets per image)
    ten_crop     ADM's centre crop to crop_range * image_size, then torchvision's TenCrop(image_size):
                 four corners + centre, and the same of the mirror image

and every crop becomes one sample (uid ``<path>`` for ``center``, ``<path>#<crop>`` otherwise) with
its VQ codes (LlamaGen VQ-16, raster order), the class id and ``feat_<encoder>`` of that crop (the
encoder's own preprocessing of the crop, e.g. CLIP's resize to 224 and [CLS] embedding). Upstream
draws one of an image's stored crops per epoch; here each crop is a sample of its own, so an epoch
over the data set sees every crop once (count training in steps).

An unreadable or too small image is skipped and listed in ``report.json`` (as for conversations);
folders that ``class_map`` does not list stop the run before anything is written.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from arra_ds.data.features import FeatureEncoder, load_encoder
from arra_ds.data.images import IMAGE_EXTENSIONS, pil_to_pixels, resize_and_center_crop, to_rgb
from arra_ds.data.pretokenize.config import PretokenizeRunConfig
from arra_ds.data.pretokenize.items import BadItem, open_image
from arra_ds.data.pretokenize.task import PretokenizeTask
from arra_ds.data.pretokenize.writer import encode_patches, patch_preprocessors, stack
from arra_ds.data.schema import CLASS_COLUMN, columns_for, feature_column, patch_column
from arra_ds.distributed import compute_dtype
from arra_ds.errors import ConfigError
from arra_ds.tokens.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig

CROP_NAMES = {
    "center": ("center",),
    "center_flip": ("center", "flip"),
    # torchvision's ten_crop order: five_crop of the image, then of its mirror image
    "ten_crop": ("tl", "tr", "bl", "br", "center", "flip_tl", "flip_tr", "flip_bl", "flip_br", "flip_center"),
}
UID_CROP_SEPARATOR = "#"
# Folders a class_map does not list are named in the error, up to this many.
FOLDERS_SHOWN_IN_ERRORS = 8


@dataclass
class ImageFolderConfig(PretokenizeRunConfig):
    """Class-to-image pre-tokenization: ``input`` is an ImageFolder tree (``<class folder>/<image>``)."""

    # "" = classes are the sorted folder names; else a text file, line k = class k: "<folder> [readable name]"
    class_map: str = ""
    vq_ckpt: str = ""  # LlamaGen VQ tokenizer checkpoint (vq_ds16_c2i.pt)
    vq: LlamaGenVQConfig = field(default_factory=LlamaGenVQConfig)  # its architecture (default: VQ-16)
    image_size: int = 256  # crops are image_size x image_size: (image_size / 16) ** 2 codes
    crops: Literal["center", "center_flip", "ten_crop"] = "center"
    crop_range: float = 1.1  # ten_crop: the centre crop before the ten crops is crop_range * image_size (upstream's)
    num_images: int = 0  # > 0: a random subset of this many images (the paper trains on 256,233 of ImageNet's)
    subset_seed: int = 0  # which subset num_images draws
    min_image_size: int = 0  # LlamaGen keeps every image (small ones are upscaled by the crop)

    def validate(self) -> None:
        if not self.input or not Path(self.input).is_dir():
            raise ConfigError(f"input={self.input!r}: the image folder (one sub-folder per class) does not exist")
        self.validate_run()
        if self.class_map and not Path(self.class_map).is_file():
            raise ConfigError(f"class_map={self.class_map!r} does not exist (a text file: one '<folder> [name]' per line)")
        if not self.vq_ckpt or not Path(self.vq_ckpt).is_file():
            raise ConfigError(f"vq_ckpt={self.vq_ckpt!r}: pass the local LlamaGen VQ checkpoint (vq_ds16_c2i.pt)")
        self.vq.validate()
        stride = self.vq.downsample_factor
        if self.image_size < stride or self.image_size % stride:
            raise ConfigError(f"image_size={self.image_size} must be a positive multiple of the VQ stride {stride}")
        if self.crop_range < 1.0:
            raise ConfigError(f"crop_range={self.crop_range} must be >= 1 (the ten crops are cut from a larger centre crop)")
        if self.num_images < 0:
            raise ConfigError(f"num_images={self.num_images} must be >= 0 (0 = every image)")

    @property
    def crop_names(self) -> tuple[str, ...]:
        return CROP_NAMES[self.crops]

    def content_key(self, listing_digest: str, num_items: int) -> dict:
        return {
            "input": str(Path(self.input).resolve()),
            "listing_sha256": listing_digest,  # the class and file lists: a changed folder is not resumed
            "num_items": num_items,
            "class_map": str(Path(self.class_map).resolve()) if self.class_map else "",
            "vq_ckpt": str(Path(self.vq_ckpt).resolve()),
            "vq": asdict(self.vq),
            "image_size": self.image_size,
            "crops": self.crops,
            "crop_range": self.crop_range,
            "num_images": self.num_images,
            "subset_seed": self.subset_seed,
            **self.run_content_key(),
        }


@dataclass(frozen=True)
class ClassInfo:
    index: int
    folder: str
    name: str  # readable name (the caption); the folder name when the map gives none


def read_classes(root: Path, class_map: str) -> list[ClassInfo]:
    """The classes in index order: the sorted sub-folders of ``root``, or the lines of ``class_map``."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not class_map:
        if not folders:
            raise ConfigError(f"input={root} has no sub-folders: an ImageFolder tree holds one folder per class")
        return [ClassInfo(i, folder, folder) for i, folder in enumerate(folders)]
    classes = []
    for line in Path(class_map).read_text().splitlines():
        if not line.strip():
            continue
        folder, _, name = line.strip().partition(" ")
        classes.append(ClassInfo(len(classes), folder, name.strip() or folder))
    listed = {c.folder for c in classes}
    if len(listed) != len(classes):
        raise ConfigError(f"class_map={class_map} lists a folder more than once")
    unlisted = [f for f in folders if f not in listed]
    if unlisted:
        raise ConfigError(
            f"input={root} has class folders that class_map={class_map} does not list: "
            f"{unlisted[:FOLDERS_SHOWN_IN_ERRORS]}{' ...' if len(unlisted) > FOLDERS_SHOWN_IN_ERRORS else ''}; "
            "add them to the map or move them out of the input folder"
        )
    return classes


def list_class_images(root: Path, classes: list[ClassInfo]) -> list[tuple[str, int]]:
    """(path relative to ``root``, class index) of every image, class by class, sorted by path (torchvision's order)."""
    items = []
    for info in classes:
        folder = root / info.folder
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        items += [(p.relative_to(root).as_posix(), info.index) for p in files]
    return items


def crop_image(image: Image.Image, cfg: ImageFolderConfig) -> list[Image.Image]:
    """The crops of one RGB image, in ``CROP_NAMES[cfg.crops]`` order (see the module docstring)."""
    size = cfg.image_size
    if cfg.crops == "ten_crop":
        larger = int(size * cfg.crop_range)  # upstream: int(args.image_size * args.crop_range)
        return list(TF.ten_crop(resize_and_center_crop(image, (larger, larger)), [size, size]))
    center = resize_and_center_crop(image, (size, size))  # = ADM's center_crop_arr for a square crop
    if cfg.crops == "center_flip":
        return [center, center.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return [center]


class ImageFolderItems(Dataset):
    """(index, (relative path, class index)) -> a record with the crops' VQ and encoder inputs, or a bad-item record."""

    def __init__(self, selected: list, cfg: ImageFolderConfig, classes: list[ClassInfo], encoder_preprocess: dict,
                 patch_preprocess: dict | None = None):
        self.selected = selected
        self.cfg = cfg
        self.classes = classes
        self.encoder_preprocess = encoder_preprocess
        self.patch_preprocess = patch_preprocess or {}  # encoder name -> its patch_preprocess (patch_features=true)
        self.root = Path(cfg.input)

    def __len__(self) -> int:
        return len(self.selected)

    def __getitem__(self, position: int) -> dict:
        index, (path, class_index) = self.selected[position]
        record = {"index": index, "uid": path, "image": path}
        try:
            crops = crop_image(to_rgb(open_image(self.root / path, self.cfg.min_image_size)), self.cfg)
            record.update(
                class_id=class_index,
                caption=self.classes[class_index].name,
                pixels=stack([pil_to_pixels(c) for c in crops]),  # [crops, 3, S, S] in [-1, 1]
                encoder_pixels={name: stack([pre(c) for c in crops]) for name, pre in self.encoder_preprocess.items()},
                patch_pixels={name: stack([pre(c) for c in crops]) for name, pre in self.patch_preprocess.items()},
            )
        except BadItem as e:
            record.update(reason=e.reason, detail=e.detail)
        except Exception as e:  # a bad item must never stop the job; the report keeps the cause
            record.update(reason="error", detail=f"{type(e).__name__}: {e}")
        return record


@dataclass
class ImageFolderModels:
    vq: LlamaGenVQ
    encoders: dict[str, FeatureEncoder]


class ImageFolderTask(PretokenizeTask):
    cfg: ImageFolderConfig

    def __init__(self, cfg: ImageFolderConfig):
        super().__init__(cfg)
        self._listing: tuple[list[ClassInfo], list[tuple[str, int]]] | None = None

    def __getstate__(self) -> dict:
        # A spawned process lists the folder itself rather than unpickling a million paths.
        return {**self.__dict__, "_listing": None}

    def _list(self) -> tuple[list[ClassInfo], list[tuple[str, int]]]:
        if self._listing is None:
            root = Path(self.cfg.input)
            classes = read_classes(root, self.cfg.class_map)
            items = list_class_images(root, classes)
            if self.cfg.num_images and self.cfg.num_images < len(items):
                chosen = np.random.default_rng(self.cfg.subset_seed).choice(len(items), self.cfg.num_images, replace=False)
                items = [items[i] for i in sorted(chosen)]
            self._listing = classes, items
        return self._listing

    @property
    def classes(self) -> list[ClassInfo]:
        return self._list()[0]

    def items(self) -> list:
        return self._list()[1]

    def content_key(self) -> dict:
        digest = hashlib.sha256()
        for info in self.classes:
            digest.update(f"class {info.index} {info.folder}\n".encode())
        for path, class_index in self.items():
            digest.update(f"{class_index} {path}\n".encode())
        return self.cfg.content_key(digest.hexdigest(), len(self.items()))

    def columns(self) -> dict[str, str]:
        return columns_for([s.name for s in self.cfg.encoders], class_conditional=True, patch_features=self.cfg.patch_features)

    def load_models(self, device: torch.device) -> ImageFolderModels:
        dtype = compute_dtype(self.cfg.dtype, device)
        vq = LlamaGenVQ.from_checkpoint(self.cfg.vq_ckpt, self.cfg.vq).to(device=device, dtype=dtype)
        encoders = {spec.name: load_encoder(spec, device=device, dtype=dtype) for spec in self.cfg.encoders}
        return ImageFolderModels(vq, encoders)

    def item_dataset(self, selected, models: ImageFolderModels) -> ImageFolderItems:
        return ImageFolderItems(selected, self.cfg, self.classes, {name: enc.preprocess for name, enc in models.encoders.items()},
                                patch_preprocessors(self.cfg, models.encoders))  # fmt: skip

    def encode(self, records: list[dict], models: ImageFolderModels) -> list[list[dict] | BadItem]:
        num_crops = len(self.cfg.crop_names)
        pixels = torch.cat([r["pixels"] for r in records])  # [B * crops, 3, S, S]
        codes = models.vq.encode(pixels).flatten(1).cpu().numpy().astype(np.int32)  # [B * crops, (S / 16)^2]
        features = {
            name: encoder.encode(torch.cat([r["encoder_pixels"][name] for r in records])).numpy()  # [B * crops, D] fp16
            for name, encoder in models.encoders.items()
        }
        patches = {name: values.numpy() for name, values in encode_patches(records, models.encoders, self.cfg.patch_features).items()}
        results: list[list[dict] | BadItem] = []
        for i, record in enumerate(records):
            samples = []
            for k, crop in enumerate(self.cfg.crop_names):
                row = i * num_crops + k
                uid = record["uid"] if num_crops == 1 else f"{record['uid']}{UID_CROP_SEPARATOR}{crop}"
                sample = {
                    "tokens": codes[row],
                    "prompt_len": np.int32(0),
                    "caption": record["caption"],
                    "uid": uid,
                    CLASS_COLUMN: np.int32(record["class_id"]),
                }
                for name, values in features.items():
                    sample[feature_column(name)] = values[row]
                for name, values in patches.items():
                    sample[patch_column(name)] = values[row]  # [P, D]
                samples.append(sample)
            results.append(samples)
        return results

    def report_extras(self) -> dict:
        return {"num_classes": len(self.classes), "classes": [info.folder for info in self.classes]}

