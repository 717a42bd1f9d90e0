"""The text-to-image input formats (caption tables, image + .txt pairs, WebDataset shards), input_format
detection and its errors, and the dry run (validate): each format pre-tokenises a tiny data set with one bad
item of each kind its format can have, counted in report.json, into the same samples as the others."""

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import StreamingDataset

from arra_ds.data.features import EncoderSpec, build_tiny_open_clip_dir
from arra_ds.data.images import ImagePreprocessConfig
from arra_ds.data.pretokenize import (
    PretokenizeConfig,
    PretokenizeError,
    TableConfig,
    format_dry_run,
    run_pretokenize,
    validate_pretokenize,
)
from arra_ds.data.pretokenize.sources import expand_braces
from arra_ds.errors import ConfigError
from arra_ds.tokens.vocab import build_debug_tokenizer
from arra_ds.tokens.vqgan import VQGAN, VQGANConfig, fit_codebook

NUM_CODES = 64
# The good items of every format: (name, caption, image size). Captions use the debug tokenizer's words.
GOOD = [
    ("red", "a large red circle at the top left", (64, 64)),
    ("wide", "two blue squares on a white background", (128, 64)),
    ("tall", "a green triangle at the center", (64, 96)),
]
COMMON_BAD = {"unreadable_image", "image_too_small", "empty_text"}


def png_bytes(size, seed) -> bytes:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(1, size[1] // 8), max(1, size[0] // 8), 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize(size).save(buffer, format="PNG")
    return buffer.getvalue()


CORRUPT_PNG = b"\x89PNG\r\n\x1a\n not a png"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs_models")
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(n_embed=NUM_CODES, embed_dim=8, z_channels=16, ch=32, ch_mult=(1, 1, 1, 1, 1),
                           num_res_blocks=1, resolution=64))  # fmt: skip
    warm = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8) * 2 - 1, size=(64, 64), mode="bilinear")
    fit_codebook(vq, vq.latents(warm).permute(0, 2, 3, 1))
    vq.save_original(root / "vqgan.yaml", root / "vqgan.ckpt")
    build_debug_tokenizer(num_image_codes=NUM_CODES).save(str(root / "text_tokenizer.json"))
    return {"root": root, "clip": build_tiny_open_clip_dir(root / "clip", seed=1)}


def config(models, input_path, out, **overrides) -> PretokenizeConfig:
    root = models["root"]
    base = dict(
        input=str(input_path), out_dir=str(out), tokenizer=str(root / "text_tokenizer.json"),
        vqgan_yaml=str(root / "vqgan.yaml"), vqgan_ckpt=str(root / "vqgan.ckpt"),
        encoders=[EncoderSpec("clip", "open_clip", path=str(models["clip"]))],
        image=ImagePreprocessConfig(target_size=64), min_image_size=32, batch_size=2, num_workers=0,
        items_per_part=4, progress=False,
    )  # fmt: skip
    base.update(overrides)
    return PretokenizeConfig(**base)


# ---- tiny data sets, one bad item of each kind ------------------------------------------------------


def write_table_images(folder):
    """The images a table refers to; -> rows (image path relative to ``folder``, caption) incl. bad ones."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for seed, (name, caption, size) in enumerate(GOOD):
        (folder / "images" / f"{name}.png").write_bytes(png_bytes(size, seed))
        rows.append({"image": f"images/{name}.png", "caption": caption})
    (folder / "images" / "corrupt.png").write_bytes(CORRUPT_PNG)
    (folder / "images" / "tiny.png").write_bytes(png_bytes((16, 16), 9))
    rows += [
        {"image": "images/corrupt.png", "caption": "a corrupt file"},  # unreadable_image
        {"image": "images/gone.png", "caption": "a missing file"},  # missing_image
        {"image": "images/tiny.png", "caption": "a tiny image"},  # image_too_small
        {"image": "images/red.png", "caption": "   "},  # empty_text
    ]
    return rows


TABLE_BAD = {"unreadable_image": 1, "missing_image": 1, "image_too_small": 1, "empty_text": 1}


def write_jsonl(folder):
    rows = write_table_images(folder)
    lines = [json.dumps(row) for row in rows] + ["{not json", json.dumps({"image": 5, "caption": "a number"})]
    path = folder / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, {**TABLE_BAD, "bad_format": 2}


def write_csv(folder):
    rows = write_table_images(folder)
    path = folder / "captions.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return path, TABLE_BAD


def write_parquet(folder):
    import pyarrow
    import pyarrow.parquet

    rows = write_table_images(folder)
    path = folder / "captions.parquet"
    columns = {"image": [r["image"] for r in rows] + [None], "caption": [r["caption"] for r in rows] + ["no image"]}
    pyarrow.parquet.write_table(pyarrow.table(columns), path)
    return path, {**TABLE_BAD, "missing_image": 2}


def write_pairs(folder):
    (folder / "sub").mkdir(parents=True)
    for seed, (name, caption, size) in enumerate(GOOD):
        where = folder / "sub" if name == "tall" else folder  # searched recursively
        (where / f"{name}.png").write_bytes(png_bytes(size, seed))
        (where / f"{name}.txt").write_text(caption + "\n")
    (folder / "nocaption.png").write_bytes(png_bytes((64, 64), 5))  # missing_caption
    (folder / "noimage.txt").write_text("a caption without its image")  # missing_image
    (folder / "blank.png").write_bytes(png_bytes((64, 64), 6))
    (folder / "blank.txt").write_text("\n")  # empty_text
    (folder / "latin1.png").write_bytes(png_bytes((64, 64), 7))
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # unreadable_caption
    (folder / "corrupt.png").write_bytes(CORRUPT_PNG)
    (folder / "corrupt.txt").write_text("a corrupt file")  # unreadable_image
    (folder / "tiny.png").write_bytes(png_bytes((16, 16), 9))
    (folder / "tiny.txt").write_text("a tiny image")  # image_too_small
    (folder / "notes.md").write_text("not data")  # neither image nor caption: ignored
    return folder, {"missing_caption": 1, "missing_image": 1, "empty_text": 1, "unreadable_caption": 1,
                    "unreadable_image": 1, "image_too_small": 1}  # fmt: skip


def add_member(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder):
    folder.mkdir(parents=True)
    members = [[], []]  # shard 0, shard 1
    for seed, (name, caption, size) in enumerate(GOOD):
        members[seed % 2] += [(f"{name}.png", png_bytes(size, seed)), (f"{name}.txt", caption.encode())]
    members[0] += [("nocaption.jpg", png_bytes((64, 64), 5)),  # missing_caption
                   ("noimage.txt", b"a caption without its image"),  # missing_image
                   ("meta.json", b"{}"),  # other members only: not a sample
                   ("blank.png", png_bytes((64, 64), 6)), ("blank.txt", b"  \n")]  # empty_text  # fmt: skip
    members[1] += [("dir/corrupt.webp", CORRUPT_PNG), ("dir/corrupt.txt", b"a corrupt file"),  # unreadable_image
                   ("tiny.png", png_bytes((16, 16), 9)), ("tiny.txt", b"a tiny image")]  # image_too_small  # fmt: skip
    for shard, shard_members in enumerate(members):
        with tarfile.open(folder / f"train-{shard:03d}.tar", "w") as tar:
            for name, data in shard_members:
                add_member(tar, name, data)
    (folder / "train-002.tar").write_bytes(b"this is not a tar file" * 40)  # unreadable_shard
    pattern = str(folder / "train-{000..002}.tar")
    return pattern, {"missing_caption": 1, "missing_image": 1, "empty_text": 1, "unreadable_image": 1,
                     "image_too_small": 1, "unreadable_shard": 1}  # fmt: skip


def write_conversations(folder):
    rows = write_table_images(folder)
    items = [{"conversations": [{"from": "human", "value": r["caption"]}, {"from": "gpt", "value": "<|image|>"}],
              "image": [r["image"]]} for r in rows]  # fmt: skip
    path = folder / "train.json"
    path.write_text(json.dumps(items))
    return path, TABLE_BAD


WRITERS = {"jsonl": (write_jsonl, "table"), "csv": (write_csv, "table"), "parquet": (write_parquet, "table"),
           "pairs": (write_pairs, "pairs"), "webdataset": (write_shards, "webdataset"),
           "conversation": (write_conversations, "conversation")}  # fmt: skip


def read_samples(out) -> list[dict]:
    dataset = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    return [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def written(models, tmp_path_factory):
    """Every format pre-tokenised once (auto detection): name -> (input, expected bad counts, summary, samples)."""
    results = {}
    for name, (writer, _) in WRITERS.items():
        root = tmp_path_factory.mktemp(name)
        input_path, bad = writer(root / "data")
        summary = run_pretokenize(config(models, input_path, root / "mds"))
        results[name] = (input_path, bad, summary, read_samples(root / "mds"), root / "mds")
    return results


@pytest.mark.parametrize("name", list(WRITERS))
def test_each_format_skips_and_counts_its_bad_items(written, name):
    _, bad, summary, samples, out = written[name]
    assert summary["input_format"] == WRITERS[name][1]
    assert summary["written"] == len(GOOD) == len(samples)
    assert summary["skipped_by_reason"] == bad
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_by_reason"] == bad and report["input_format"] == WRITERS[name][1]
    assert all(b["detail"] and b["uid"] for b in report["bad_items"])
    assert sorted(s["caption"] for s in samples) == sorted(caption for _, caption, _ in GOOD)


def test_every_format_gives_the_samples_of_the_conversation_json(written):
    """Same images and captions -> the same tokens and features, whatever the input format."""
    def by_caption(samples):
        return {s["caption"]: s for s in samples}

    reference = by_caption(written["conversation"][3])
    for name in WRITERS:
        for caption, sample in by_caption(written[name][3]).items():
            assert np.array_equal(sample["tokens"], reference[caption]["tokens"]), (name, caption)
            assert np.array_equal(sample["feat_clip"], reference[caption]["feat_clip"]), (name, caption)
    uids = {s["uid"] for s in written["webdataset"][3]}
    assert uids == {"train-000.tar/red", "train-001.tar/wide", "train-000.tar/tall"}
    assert {s["uid"] for s in written["pairs"][3]} == {"red.png", "wide.png", "sub/tall.png"}


def test_a_rerun_resumes_and_a_changed_input_is_refused(models, written, tmp_path):
    for name in ("pairs", "webdataset"):
        input_path, bad, first, _, out = written[name]
        again = run_pretokenize(config(models, input_path, out))  # every part done: nothing is redone
        assert again["written"] == first["written"] and again["skipped_by_reason"] == bad
    folder, _, _, _, out = written["pairs"]
    (folder / "red.txt").write_text("a small red circle at the top left, edited\n")
    with pytest.raises(PretokenizeError, match="listing_sha256 changed"):
        run_pretokenize(config(models, folder, out))


def test_the_dry_run_reads_everything_writes_nothing_and_predicts_the_run(models, tmp_path):
    input_path, bad = write_shards(tmp_path / "data")
    out = tmp_path / "never"
    before = sorted(p for p in tmp_path.rglob("*"))
    # no VQGAN keys at all: a dry run needs neither its files nor the encoder weights
    report = validate_pretokenize(config(models, input_path, out, vqgan_yaml="", vqgan_ckpt="", items_per_part=5))
    assert not out.exists() and sorted(p for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert report["items"] == len(GOOD) + sum(bad.values()) and report["would_write"] == len(GOOD)
    assert report["skipped_by_reason"] == bad
    assert report["skip_examples"]["missing_caption"][0]["detail"].endswith("has no nocaption.txt member")
    # every image that opened (an empty caption is found first): the 3 good ones and the tiny one
    assert report["image_sizes"]["<128"] == 4 and sum(report["image_sizes"].values()) == 4
    assert report["feature_widths"] == {"clip": 32}

    summary = run_pretokenize(config(models, input_path, tmp_path / "real", items_per_part=5))  # two parts
    samples = read_samples(tmp_path / "real")
    lengths = [len(s["tokens"]) for s in samples]
    longest = max(lengths)
    assert report["tokens_per_sample"] == {"min": min(lengths), "mean": round(float(np.mean(lengths)), 1), "max": longest}
    assert report["skipped_by_reason"] == summary["skipped_by_reason"]
    shard_bytes = sum(p.stat().st_size for p in (tmp_path / "real").rglob("*.mds"))
    assert report["estimated_bytes"] == shard_bytes  # MDSWriter's layout and packing, byte for byte
    text = format_dry_run(report)
    assert "nothing written" in text and "missing_caption: 1" in text and "not checked" in text

    capped = validate_pretokenize(config(models, input_path, out, max_seq_len=longest - 1))
    assert capped["skipped_by_reason"]["too_long"] == lengths.count(longest)
    assert not out.exists()


def test_a_json_caption_table_and_table_columns(models, tmp_path):
    rows = write_table_images(tmp_path / "data")
    renamed = [{"file_name": r["image"], "text": r["caption"]} for r in rows]
    path = tmp_path / "data" / "metadata.json"
    path.write_text(json.dumps(renamed))
    with pytest.raises(PretokenizeError, match=r"no item has 'conversations' .*\['file_name', 'text'\].*input_format=table"):
        run_pretokenize(config(models, path, tmp_path / "a"))
    with pytest.raises(PretokenizeError, match=r"no column \['file_name'\]|no column \['image'\]"):
        run_pretokenize(config(models, path, tmp_path / "b", input_format="table"))
    summary = run_pretokenize(config(models, path, tmp_path / "c", input_format="table",
                                     table=TableConfig(image_column="file_name", text_column="text")))
    assert summary["written"] == len(GOOD) and summary["skipped_by_reason"] == TABLE_BAD


def test_a_wrong_input_format_says_what_was_found_and_what_to_set(models, tmp_path):
    table, _ = write_csv(tmp_path / "table")
    pairs, _ = write_pairs(tmp_path / "pairs")
    cases = [
        (dict(input_format="conversation", input=table), r"captions.csv is a caption table .*set input_format=table"),
        (dict(input_format="pairs", input=table), r"folder of images with .txt captions.*captions.csv is a caption table"),
        (dict(input_format="table", input=pairs), r"is a folder with 8 images, 8 .txt files, 0 .tar shards .*input_format=pairs"),
        (dict(input_format="webdataset", input=pairs), r"reads .tar shards .* is a folder with 8 images"),
        (dict(input_format="webdataset", input=tmp_path / "shards-{0..3}.tar"), r"matches no file"),
        (dict(input=tmp_path / "nowhere.jsonl"), r"does not exist"),
        (dict(input_format="pairs", input=pairs, image_root=str(tmp_path)), r"image_root is for conversation and table"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_pretokenize(config(models, overrides.pop("input"), tmp_path / "out", **overrides))
    (pairs / "shards.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"cannot tell pairs from shards; set input_format=pairs .* input_format=webdataset"):
        run_pretokenize(config(models, pairs, tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_brace_lists_expand_like_the_shell():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b{1..2}}.tar") == ["a.tar", "b1.tar", "b2.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"] and expand_braces("no{brace") == ["no{brace"]
