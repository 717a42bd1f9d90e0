"""Class-conditional pre-tokenization: ImageFolder -> class-to-image MDS samples, bad images, crops, class maps,
resume, the launcher, and the training loader reading the result."""

import json
import runpy
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from streaming import StreamingDataset

from arra_ds.data.features import EncoderSpec, build_tiny_open_clip_dir, load_encoder
from arra_ds.data.images import pil_to_pixels, resize_and_center_crop
from arra_ds.data.loader import DataConfig, build_dataloader, build_dataset
from arra_ds.data.pretokenize import ImageFolderConfig, PretokenizeError, run_pretokenize_imagefolder
from arra_ds.data.schema import SchemaError, check_columns
from arra_ds.errors import ConfigError
from tests.conftest import REPO_ROOT
from tests.llamagen_helpers import GRID, IMAGE_SIZE, NUM_CLASSES, TINY_VQ, save_tiny_vq, write_image_folder

CORRUPT = "class_1/broken.JPEG"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    images = write_image_folder(root / "train")
    (root / "train" / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "train" / "class_0" / "notes.txt").write_text("not an image: ignored")
    Image.fromarray(np.full((90, 120), 128, np.uint8), "L").save(root / "train" / "class_2" / "gray.png")
    return {
        "root": root,
        "images": images,
        "vq": save_tiny_vq(root / "vq.pt"),
        "clip": build_tiny_open_clip_dir(root / "clip", seed=1),
    }


def config(assets, out, **overrides) -> ImageFolderConfig:
    base = dict(
        input=str(assets["root"] / "train"), out_dir=str(out), vq_ckpt=str(assets["root"] / "vq.pt"), vq=TINY_VQ,
        encoders=[EncoderSpec("clip", "open_clip", path=str(assets["clip"]))], image_size=IMAGE_SIZE,
        batch_size=2, num_workers=0, items_per_part=3, progress=False,
    )
    base.update(overrides)
    return ImageFolderConfig(**base)


def codes_of(sample: dict) -> torch.Tensor:
    return torch.tensor(sample["tokens"], dtype=torch.long)


def read_samples(out) -> list[dict]:
    dataset = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    return [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def center_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("center") / "mds"
    summary = run_pretokenize_imagefolder(config(assets, out))
    return out, summary, read_samples(out)


def test_samples_codes_classes_and_features(assets, center_run):
    out, summary, samples = center_run
    good = assets["images"] + [("class_2/gray.png", 2)]
    assert summary["written"] == len(good) == len(samples)
    assert summary["skipped"] == 1 and summary["skipped_by_reason"] == {"unreadable_image": 1}
    report = json.loads((out / "report.json").read_text())
    assert [(b["uid"], b["reason"]) for b in report["bad_items"]] == [(CORRUPT, "unreadable_image")]
    assert report["num_classes"] == NUM_CLASSES and report["classes"] == [f"class_{k}" for k in range(NUM_CLASSES)]
    assert check_columns(out, "feat_clip", class_conditional=True)["class_id"] == "int32"

    encoder = load_encoder(EncoderSpec("clip", "open_clip", path=str(assets["clip"])))
    by_uid = {s["uid"]: s for s in samples}
    for path, label in good:
        sample = by_uid[path]
        assert int(sample["class_id"]) == label and sample["caption"] == f"class_{label}"
        assert int(sample["prompt_len"]) == 0 and sample["tokens"].dtype == np.int32
        crop = resize_and_center_crop(Image.open(assets["root"] / "train" / path).convert("RGB"), (IMAGE_SIZE, IMAGE_SIZE))
        expected = assets["vq"].encode(pil_to_pixels(crop)[None])[0].flatten()  # batched run == this crop alone
        assert torch.equal(codes_of(sample), expected) and len(expected) == GRID * GRID
        feature = encoder.encode(encoder.preprocess(crop)[None])[0]
        assert np.allclose(sample["feat_clip"].astype(np.float32), feature.float().numpy(), atol=2e-3)


def test_processes_and_workers_give_the_same_samples(assets, center_run, tmp_path):
    _, _, reference = center_run
    run_pretokenize_imagefolder(config(assets, tmp_path / "procs", num_procs=2, num_workers=1))
    samples = read_samples(tmp_path / "procs")
    keys = ["tokens", "class_id", "caption", "uid", "feat_clip"]
    assert len(samples) == len(reference)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(samples, reference) for k in keys)


def test_ten_crops_are_samples_of_their_own(assets, center_run, tmp_path):
    _, _, center = center_run
    out = tmp_path / "ten"
    summary = run_pretokenize_imagefolder(config(assets, out, crops="ten_crop", num_workers=1))
    samples = read_samples(out)
    assert summary["written"] == 10 * len(center) == len(samples)
    path, label = assets["images"][0]
    mine = [s for s in samples if s["uid"].startswith(path + "#")]
    assert [s["uid"].split("#")[1] for s in mine] == ["tl", "tr", "bl", "br", "center", "flip_tl", "flip_tr", "flip_bl",
                                                       "flip_br", "flip_center"]
    assert {int(s["class_id"]) for s in mine} == {label}
    image = Image.open(assets["root"] / "train" / path).convert("RGB")
    larger = int(IMAGE_SIZE * 1.1)
    crops = TF.ten_crop(resize_and_center_crop(image, (larger, larger)), [IMAGE_SIZE, IMAGE_SIZE])
    codes = assets["vq"].encode(torch.stack([pil_to_pixels(c) for c in crops])).flatten(1)
    assert all(torch.equal(codes_of(s), codes[k]) for k, s in enumerate(mine))


def test_class_map_names_and_unlisted_folders(assets, tmp_path):
    mapping = tmp_path / "classes.txt"
    mapping.write_text("class_2 a grey thing\nclass_0 the first\n\nclass_1\n")
    run_pretokenize_imagefolder(config(assets, tmp_path / "mapped", class_map=str(mapping)))
    by_uid = {s["uid"]: s for s in read_samples(tmp_path / "mapped")}
    assert (int(by_uid["class_2/gray.png"]["class_id"]), by_uid["class_2/gray.png"]["caption"]) == (0, "a grey thing")
    assert (int(by_uid["class_0/img_0.JPEG"]["class_id"]), by_uid["class_0/img_0.JPEG"]["caption"]) == (1, "the first")
    assert (int(by_uid["class_1/img_1.JPEG"]["class_id"]), by_uid["class_1/img_1.JPEG"]["caption"]) == (2, "class_1")

    mapping.write_text("class_0\nclass_1\n")
    with pytest.raises(ConfigError, match=r"does not list: \['class_2'\]"):
        run_pretokenize_imagefolder(config(assets, tmp_path / "unlisted", class_map=str(mapping)))


def test_subset_resume_and_changed_folder(assets, tmp_path):
    out = tmp_path / "subset"
    first = run_pretokenize_imagefolder(config(assets, out, num_images=4, subset_seed=3))
    assert first["items"] == 4
    again = run_pretokenize_imagefolder(config(assets, out, num_images=4, subset_seed=3))  # every part done: merge only
    assert again["written"] == first["written"]
    with pytest.raises(PretokenizeError, match="listing_sha256"):
        run_pretokenize_imagefolder(config(assets, out, num_images=4, subset_seed=4))


def test_launcher_and_training_loader(assets, tmp_path):
    out = tmp_path / "cli"
    argv = sys.argv
    sys.argv = ["pretokenize_imagefolder.py", f"input={assets['root'] / 'train'}", f"out_dir={out}",
                f"vq_ckpt={assets['root'] / 'vq.pt'}", f"encoders=[clip={assets['clip']}]", f"image_size={IMAGE_SIZE}",
                *[f"vq.{k}={v}" for k, v in vars(TINY_VQ).items() if not isinstance(v, tuple)],
                f"vq.encoder_ch_mult={list(TINY_VQ.encoder_ch_mult)}", f"vq.decoder_ch_mult={list(TINY_VQ.decoder_ch_mult)}",
                "num_workers=0", "progress=false"]
    try:
        main = runpy.run_path(str(REPO_ROOT / "launch" / "pretokenize_imagefolder.py"), run_name="not_main")["main"]
        assert main() == 0
    finally:
        sys.argv = argv

    data = DataConfig(path=str(out), max_seq_len=GRID * GRID, shuffle=False)
    with pytest.raises(SchemaError, match="class-to-image samples"):
        build_dataset(data, 2, 0, "feat_clip", None, str(out))
    dataset = build_dataset(data, 2, 0, "feat_clip", None, str(out), class_conditional=True)
    batch = next(iter(build_dataloader(dataset, data, 2, pad_id=0)))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, GRID * GRID)  # never padded
    assert torch.equal(batch["input_ids"], batch["labels"]) and batch["class_ids"].tolist() == [0, 0]
    assert batch["target_features"].shape == (2, 32) and batch["attention_mask"].all()


def test_patch_features_of_each_crop(assets, tmp_path):
    out = tmp_path / "patches"
    run_pretokenize_imagefolder(config(assets, out, patch_features=True, crops="center_flip"))
    assert check_columns(out, "patch_clip", class_conditional=True)["patch_clip"] == "ndarray:float16"
    encoder = load_encoder(EncoderSpec("clip", "open_clip", path=str(assets["clip"])))
    by_uid = {s["uid"]: s for s in read_samples(out)}
    path = assets["images"][0][0]
    crop = resize_and_center_crop(Image.open(assets["root"] / "train" / path).convert("RGB"), (IMAGE_SIZE, IMAGE_SIZE))
    for name, picture in (("center", crop), ("flip", crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
        sample = by_uid[f"{path}#{name}"]
        expected = encoder.encode_patches(encoder.patch_preprocess(picture)[None])[0]
        assert sample["patch_clip"].shape == (16, 32)
        np.testing.assert_allclose(sample["patch_clip"].astype(np.float32), expected.float().numpy(), atol=2e-3)
