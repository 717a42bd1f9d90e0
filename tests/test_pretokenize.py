"""Pre-tokenization to MDS: good and bad items, report, StreamingDataset, workers/processes, resume, CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import StreamingDataset

from arra_ds.config import load_dataclass_config
from arra_ds.data.features import EncoderSpec, build_tiny_open_clip_dir, build_tiny_sam_dir
from arra_ds.data.images import ImagePreprocessConfig, VQImagePreprocessor
from arra_ds.data.pretokenize import PretokenizeConfig, PretokenizeError, run_pretokenize
from arra_ds.data.pretokenize.writer import PartWriter
from arra_ds.data.schema import check_columns
from arra_ds.errors import ConfigError
from arra_ds.tokens.layout import IMAGE_PLACEHOLDER, ImageGrid, image_grid_of_sample
from arra_ds.tokens.vocab import ChameleonVocab, build_debug_tokenizer, tokens_to_image
from arra_ds.tokens.vqgan import VQGAN, VQGANConfig, fit_codebook
from tests.conftest import REPO_ROOT, subprocess_env

NUM_CODES = 64
GOOD_SIZES = [(64, 64), (96, 64), (64, 100), (80, 80), (200, 60), (64, 64), (128, 128), (70, 90), (64, 64), (150, 100)]
BAD = {  # index in the JSON -> expected reason
    2: "unreadable_image",
    5: "missing_image",
    7: "placeholder_count",
    9: "empty_text",
    11: "image_too_small",
}


def item(prompt, images, answer=IMAGE_PLACEHOLDER):
    return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}], "image": images}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretok")
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(n_embed=NUM_CODES, embed_dim=8, z_channels=16, ch=32, ch_mult=(1, 1, 1, 1, 1),
                           num_res_blocks=1, resolution=64))
    rng = np.random.default_rng(0)
    warm = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8) * 2 - 1, size=(64, 64), mode="bilinear")
    fit_codebook(vq, vq.latents(warm).permute(0, 2, 3, 1))
    vq.save_original(root / "vqgan.yaml", root / "vqgan.ckpt")
    tokenizer = build_debug_tokenizer(num_image_codes=NUM_CODES)
    tokenizer.save(str(root / "text_tokenizer.json"))
    images_dir = root / "images"
    images_dir.mkdir()
    items, good = [], 0
    for index in range(len(GOOD_SIZES) + len(BAD)):
        name = f"img{index:02d}.png"
        reason = BAD.get(index)
        if reason is None:
            w, h = GOOD_SIZES[good]
            good += 1
            Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h)).save(images_dir / name)
            items.append(item(f"a red circle number {index}", [f"images/{name}"]))
        elif reason == "unreadable_image":
            (images_dir / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
            items.append(item("a corrupt file", [f"images/{name}"]))
        elif reason == "missing_image":
            items.append(item("a missing file", [f"images/{name}"]))
        elif reason == "placeholder_count":
            Image.new("RGB", (64, 64)).save(images_dir / name)
            items.append(item("two placeholders", [f"images/{name}"], answer=IMAGE_PLACEHOLDER * 2))
        elif reason == "empty_text":
            Image.new("RGB", (64, 64)).save(images_dir / name)
            items.append(item("   ", [f"images/{name}"]))
        elif reason == "image_too_small":
            Image.new("RGB", (16, 16)).save(images_dir / name)
            items.append(item("a tiny image", [f"images/{name}"]))
    (root / "data.json").write_text(json.dumps(items))
    return {
        "root": root,
        "clip": build_tiny_open_clip_dir(root / "clip", seed=1),
        "sam": build_tiny_sam_dir(root / "sam", seed=2),
        "vq": vq,
        "vocab": ChameleonVocab(tokenizer.get_vocab(with_added_tokens=True)),
        "items": items,
    }


def config(assets, out, **overrides) -> PretokenizeConfig:
    root = assets["root"]
    base = dict(
        input=str(root / "data.json"), out_dir=str(out), tokenizer=str(root / "text_tokenizer.json"),
        vqgan_yaml=str(root / "vqgan.yaml"), vqgan_ckpt=str(root / "vqgan.ckpt"),
        encoders=[EncoderSpec("clip", "open_clip", path=str(assets["clip"])),
                  EncoderSpec("sam", "sam", path=str(assets["sam"]), aggregation="avgpool")],
        image=ImagePreprocessConfig(target_size=64), min_image_size=32, batch_size=3, num_workers=0,
        items_per_part=4, progress=False,
    )
    base.update(overrides)
    return PretokenizeConfig(**base)


def read_samples(out) -> list[dict]:
    dataset = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    return [dataset[i] for i in range(len(dataset))]


def same_samples(a: list[dict], b: list[dict]) -> bool:
    keys = ["tokens", "prompt_len", "caption", "uid", "feat_clip", "feat_sam"]
    return len(a) == len(b) and all(all(np.array_equal(x[k], y[k]) for k in keys) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "mds"
    summary = run_pretokenize(config(assets, out))
    return out, summary, read_samples(out)


def test_good_and_bad_items(assets, reference_run):
    out, summary, samples = reference_run
    assert summary["written"] == len(GOOD_SIZES) == len(samples)
    assert summary["skipped"] == len(BAD)
    assert summary["skipped_by_reason"] == {r: 1 for r in BAD.values()}
    report = json.loads((out / "report.json").read_text())
    assert {b["index"]: b["reason"] for b in report["bad_items"]} == BAD
    for bad in report["bad_items"]:
        assert bad["uid"] == assets["items"][bad["index"]]["image"][0] and bad["detail"]
    columns = check_columns(out, "feat_clip")
    assert columns["feat_sam"] == "ndarray:float16"


def test_samples_hold_the_right_tokens_and_features(assets, reference_run):
    out, _, samples = reference_run
    vocab, vq = assets["vocab"], assets["vq"]
    by_uid = {s["uid"]: s for s in samples}
    assert len(by_uid) == len(samples)
    preprocess = VQImagePreprocessor(ImagePreprocessConfig(target_size=64))
    for index, it in enumerate(assets["items"]):
        if index in BAD:
            continue
        sample = by_uid[it["image"][0]]
        tokens, prompt_len = sample["tokens"].tolist(), int(sample["prompt_len"])
        assert sample["caption"] == it["conversations"][0]["value"]
        assert tokens[0] == vocab.bos_id and tokens[prompt_len - 1] == vocab.end_of_turn_id
        assert tokens[-1] == vocab.end_of_turn_id and tokens[prompt_len] == vocab.image_start_id
        codes = tokens_to_image(tokens[prompt_len:-1], vocab)
        pixels = preprocess(Image.open(assets["root"] / it["image"][0]))
        assert torch.equal(codes, vq.encode(pixels[None])[0])  # batched run == this image alone
        assert sample["feat_clip"].shape == (32,) and sample["feat_clip"].dtype == np.float16
        assert sample["feat_sam"].shape == (16,) and np.isfinite(sample["feat_sam"]).all()
    sizes = {tuple(tokens_to_image(s["tokens"][int(s["prompt_len"]):-1].tolist(), vocab).shape) for s in samples}
    assert len(sizes) > 1  # several crop sizes went through the size buckets


def test_workers_and_processes_give_the_same_samples(assets, reference_run, tmp_path):
    _, _, reference = reference_run
    run_pretokenize(config(assets, tmp_path / "workers", num_workers=2))
    assert same_samples(read_samples(tmp_path / "workers"), reference)
    run_pretokenize(config(assets, tmp_path / "procs", num_procs=2))
    assert same_samples(read_samples(tmp_path / "procs"), reference)


def test_interrupted_run_resumes(assets, reference_run, tmp_path, monkeypatch):
    _, _, reference = reference_run
    out = tmp_path / "resume"
    original_finish = PartWriter.finish
    calls = []

    def crash_on_second_part(self):
        calls.append(self.part)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill while writing part 1")
        return original_finish(self)

    monkeypatch.setattr(PartWriter, "finish", crash_on_second_part)
    with pytest.raises(KeyboardInterrupt):
        run_pretokenize(config(assets, out))
    monkeypatch.setattr(PartWriter, "finish", original_finish)
    assert (out / "part-00000" / "part.json").is_file() and (out / "part-00001.tmp").is_dir()
    assert not (out / "index.json").exists()
    done_before = (out / "part-00000" / "part.json").stat().st_mtime_ns

    summary = run_pretokenize(config(assets, out))
    assert (out / "part-00000" / "part.json").stat().st_mtime_ns == done_before  # not redone
    assert not (out / "part-00001.tmp").exists()
    assert summary["written"] == len(GOOD_SIZES)
    assert same_samples(read_samples(out), reference)

    with pytest.raises(PretokenizeError, match="image changed"):
        run_pretokenize(config(assets, out, image=ImagePreprocessConfig(target_size=96)))


def test_cli(assets, tmp_path):
    root = assets["root"]
    command = [
        sys.executable, str(REPO_ROOT / "launch" / "pretokenize.py"), f"input={root / 'data.json'}",
        f"out_dir={tmp_path / 'cli'}", f"tokenizer={root / 'text_tokenizer.json'}",
        f"vqgan_yaml={root / 'vqgan.yaml'}", f"vqgan_ckpt={root / 'vqgan.ckpt'}",
        f"encoders=[biomedclip={assets['clip']},medsam={assets['sam']}]",
        "image.target_size=64", "min_image_size=32", "num_workers=1", "progress=false",
    ]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(GOOD_SIZES)} samples written, {len(BAD)} skipped" in done.stdout
    assert set(check_columns(tmp_path / "cli", "feat_biomedclip")) >= {"feat_biomedclip", "feat_medsam"}


def test_bad_settings_are_clear_errors(assets, tmp_path):
    with pytest.raises(ConfigError, match="text_tokenizer.json"):
        run_pretokenize(config(assets, tmp_path / "x", tokenizer=str(tmp_path / "missing.json")))
    with pytest.raises(ConfigError, match="vqgan_hf"):
        run_pretokenize(config(assets, tmp_path / "x", vqgan_hf=str(tmp_path)))
    small = tmp_path / "small_tokenizer.json"
    build_debug_tokenizer(num_image_codes=NUM_CODES // 2).save(str(small))
    with pytest.raises(PretokenizeError, match="64 codes but .* only 32 image code tokens"):
        run_pretokenize(config(assets, tmp_path / "y", tokenizer=str(small)))


# ---- the 7B recipes' pre-tokenization (configs/pretokenize_arra512.yaml) --------------------------

RECIPE = REPO_ROOT / "configs" / "pretokenize_arra512.yaml"


def recipe_config(assets, tmp_path, name, *overrides) -> PretokenizeConfig:
    """The recipe file, with the tiny test models and a 64-px target (the tiny VQGAN's scale)."""
    root = assets["root"]
    if not (tmp_path / "recipe.json").is_file():
        images = []
        for index, (w, h) in enumerate([(150, 64), (64, 120)]):  # non-square, landscape and portrait
            path = tmp_path / f"wide{index}.png"
            Image.fromarray(np.random.default_rng(index).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            images.append(item(f"a red circle number {index}", [str(path)]))
        (tmp_path / "recipe.json").write_text(json.dumps(images))
    return load_dataclass_config(PretokenizeConfig, RECIPE, [
        f"input={tmp_path / 'recipe.json'}", f"out_dir={tmp_path / name}", f"tokenizer={root / 'text_tokenizer.json'}",
        f"vqgan_yaml={root / 'vqgan.yaml'}", f"vqgan_ckpt={root / 'vqgan.ckpt'}", f"encoders=[biomedclip={assets['clip']}]",
        "image.target_size=64", "min_image_size=32", "num_workers=0", "progress=false", *overrides,
    ])  # fmt: skip


def test_recipe_pretokenization_crops_non_square_images_to_the_square_grid(assets, tmp_path):
    cfg = recipe_config(assets, tmp_path, "square")
    assert cfg.image.crop == "square"
    summary = run_pretokenize(cfg)
    assert summary["written"] == 2
    vocab, vq = assets["vocab"], assets["vq"]
    lumina_crop = VQImagePreprocessor(ImagePreprocessConfig(target_size=64))  # the library default: var
    for sample in read_samples(tmp_path / "square"):
        tokens, prompt_len = sample["tokens"].tolist(), int(sample["prompt_len"])
        assert image_grid_of_sample(tokens, vocab) == ImageGrid(4, 4)  # 64 x 64 px whatever the aspect
        image = Image.open(sample["uid"])  # the uid of an item without one is its image path
        assert lumina_crop.crop_size(image.size) != (64, 64)  # what the default would have written
        pixels = VQImagePreprocessor(cfg.image)(image)
        assert pixels.shape == (3, 64, 64)
        assert torch.equal(tokens_to_image(tokens[prompt_len:-1], vocab), vq.encode(pixels[None])[0])


def test_rep_token_opens_the_assistant_turn_and_changes_nothing_else(assets, tmp_path):
    run_pretokenize(recipe_config(assets, tmp_path, "plain"))
    run_pretokenize(recipe_config(assets, tmp_path, "rep", "rep_token=true"))
    plain, rep = read_samples(tmp_path / "plain"), read_samples(tmp_path / "rep")
    assert len(plain) == len(rep) == 2
    vocab = assets["vocab"]
    for a, b in zip(plain, rep):
        prompt_len = int(a["prompt_len"])
        assert int(b["prompt_len"]) == prompt_len  # <REP> belongs to the (supervised) assistant turn
        tokens = b["tokens"].tolist()
        assert tokens[prompt_len] == vocab.id("<reserved08795>") and tokens[prompt_len + 1] == vocab.image_start_id
        assert tokens[:prompt_len] + tokens[prompt_len + 1 :] == a["tokens"].tolist()
    with pytest.raises(PretokenizeError, match=r"\(rep_token changed\)"):  # a different layout never mixes in
        run_pretokenize(recipe_config(assets, tmp_path, "rep"))


def test_patch_features_cover_the_vq_crop(assets, reference_run, tmp_path):
    """patch_features=true: patch_<encoder> [P, D] of the picture the VQ codes cover (the crop, resized to the
    encoder's input without its own crop); the global features and everything else are unchanged."""
    from arra_ds.data.features import load_encoder
    from arra_ds.data.loader import SampleConverter

    _, _, reference = reference_run
    out = tmp_path / "patches"
    run_pretokenize(config(assets, out, patch_features=True))
    columns = check_columns(out, "patch_clip")
    assert columns["patch_clip"] == columns["patch_sam"] == "ndarray:float16"
    samples = read_samples(out)
    assert same_samples(samples, reference)
    preprocess = VQImagePreprocessor(ImagePreprocessConfig(target_size=64))
    encoders = {name: load_encoder(spec) for name, spec in (("clip", config(assets, out).encoders[0]),
                                                              ("sam", config(assets, out).encoders[1]))}
    by_uid = {s["uid"]: s for s in samples}
    for index, it in enumerate(assets["items"]):
        if index in BAD:
            continue
        sample = by_uid[it["image"][0]]
        crop = preprocess.crop(Image.open(assets["root"] / it["image"][0]))
        for name, encoder in encoders.items():
            expected = encoder.encode_patches(encoder.patch_preprocess(crop)[None])[0]
            np.testing.assert_allclose(sample[f"patch_{name}"].astype(np.float32), expected.float().numpy(), atol=2e-3)
        assert sample["patch_clip"].shape == (16, 32) and sample["patch_sam"].shape == (16, 16)  # 4 x 4 patches each
    item = SampleConverter("patch_clip", max_seq_len=10_000, overlong="error")(samples[0])
    assert item["target_patches"].shape == (16, 32) and "target_features" not in item
