"""Demo image data set: captions in the debug vocabulary, real pipeline output, meaningful codes, config checks."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import StreamingDataset

from arra_ds.data.images import pil_to_pixels
from arra_ds.data.schema import check_columns
from arra_ds.demo.config import DemoDataConfig
from arra_ds.demo.dataset import (
    check_captions_in_vocabulary,
    demo_dir,
    demo_heldout_dir,
    demo_models,
    load_demo_vqgan,
    write_demo_dataset,
)
from arra_ds.demo.scenes import BACKGROUNDS, MAX_CAPTION_WORDS, draw_scene, random_scene
from arra_ds.errors import ConfigError
from arra_ds.tokens.vocab import ChameleonVocab, build_debug_tokenizer, tokens_to_image
from arra_ds.train.run_config import load_run_config

SMALL = DemoDataConfig(num_samples=48, code_size=8, feature_dim=8, num_image_codes=64, samples_per_shard=16, num_heldout=6)


@pytest.fixture(scope="module")
def small_demo():
    return write_demo_dataset(demo_dir(SMALL, seed=3), SMALL, seed=3)


def test_captions_use_only_debug_words_and_fit_the_bound():
    rng = np.random.default_rng(0)
    captions = [random_scene(rng)[2] for _ in range(2000)]
    check_captions_in_vocabulary(captions, build_debug_tokenizer())
    assert max(len(c.split()) for c in captions) == MAX_CAPTION_WORDS
    assert any(c.startswith("three ") for c in captions) and any(" and a " in c for c in captions)
    with pytest.raises(ValueError, match="'purple'"):
        check_captions_in_vocabulary(["a purple circle"], build_debug_tokenizer(words=["a", "circle"]))


def test_demo_data_set_through_the_real_pipeline(small_demo):
    assert check_columns(small_demo, "feat_demo")["feat_demo"] == "ndarray:float16"
    dataset = StreamingDataset(local=str(small_demo), shuffle=False, batch_size=1)
    samples = [dataset[i] for i in range(len(dataset))]
    assert len(samples) == SMALL.num_samples
    vocab = ChameleonVocab(build_debug_tokenizer(num_image_codes=SMALL.num_image_codes).get_vocab(with_added_tokens=True))
    used = set()
    for sample in samples:
        tokens, prompt_len = sample["tokens"].tolist(), int(sample["prompt_len"])
        assert len(tokens) <= SMALL.max_sequence_length() and max(tokens) < vocab.vocab_size
        words = [vocab.id_to_token[t] for t in tokens[1 : prompt_len - 1]]
        assert " ".join(words) == sample["caption"].replace(",", " ,")
        codes = tokens_to_image(tokens[prompt_len:-1], vocab)
        assert codes.shape == (SMALL.code_size, SMALL.code_size)
        used |= set(codes.flatten().tolist())
        assert sample["feat_demo"].shape == (SMALL.feature_dim,)
        assert sample["patch_demo"].shape == (16, SMALL.feature_dim)  # the tiny encoder's 4 x 4 patches
    assert len(used) >= SMALL.num_image_codes // 2  # the k-means codebook is in use, not collapsed
    assert len({s["tokens"].tobytes() for s in samples}) == len(samples)


def test_demo_codes_and_decoding_are_meaningful(small_demo):
    vq = load_demo_vqgan(small_demo)
    side = SMALL.code_size * 16
    plain = {name: pil_to_pixels(Image.new("RGB", (side, side), colour)) for name, colour in BACKGROUNDS.items()}
    codes = {name: vq.encode(pixels[None])[0] for name, pixels in plain.items()}
    for name, grid in codes.items():
        assert (grid == grid[0, 0]).all(), name  # a uniform picture is one code everywhere
    assert len({int(grid[0, 0]) for grid in codes.values()}) == len(BACKGROUNDS)  # colours get their own codes

    rng = np.random.default_rng(7)
    scenes = torch.stack([pil_to_pixels(draw_scene(*random_scene(rng)[:2], side, rng)) for _ in range(8)])
    error = ((vq.decode(vq.encode(scenes)) - scenes) ** 2).mean()
    baseline = ((scenes - scenes.mean(dim=(2, 3), keepdim=True)) ** 2).mean()  # each image's mean colour
    assert error < 0.5 * baseline  # the fitted read-out reconstructs the pictures, not noise


def test_demo_is_cached(small_demo):
    stamp = (small_demo / "index.json").stat().st_mtime_ns
    assert write_demo_dataset(small_demo, SMALL, seed=3) == small_demo
    assert (small_demo / "index.json").stat().st_mtime_ns == stamp
    assert demo_dir(SMALL, seed=4) != demo_dir(SMALL, seed=3)


def test_run_config_cross_checks():
    assert load_run_config().demo.num_image_codes == load_run_config().model.debug.num_image_codes
    with pytest.raises(ConfigError, match="model.debug.num_image_codes=128"):
        load_run_config(None, ["model.debug.num_image_codes=128"])
    with pytest.raises(ConfigError, match="set align.encoder=demo"):
        load_run_config(None, ["align.encoder=biomedclip"])
    with pytest.raises(ConfigError, match="longest demo sample"):
        load_run_config(None, ["data.max_seq_len=64"])
    with pytest.raises(ConfigError, match="code_size=5 must be even"):
        load_run_config(None, ["demo.code_size=5"])
    load_run_config(None, ["align.weight=0", "align.encoder=none"])  # no alignment: the encoder is not used
    assert load_run_config(None, ["align.feature=patch"]).align.feature_column == "patch_demo"  # the demo has patches


def test_heldout_split_has_new_captions_through_the_same_pipeline(small_demo):
    """Held-out scenes: captions that no training scene has, pre-tokenised with the same models, so
    evaluation gets exact prompt ids and real VQ codes."""
    train = StreamingDataset(local=str(small_demo), shuffle=False, batch_size=1)
    heldout_dir = demo_heldout_dir(small_demo)
    assert check_columns(heldout_dir, "feat_demo")["feat_demo"] == "ndarray:float16"
    heldout = StreamingDataset(local=str(heldout_dir), shuffle=False, batch_size=1)
    train_captions = {train[i]["caption"] for i in range(len(train))}
    heldout_samples = [heldout[i] for i in range(len(heldout))]
    captions = [s["caption"] for s in heldout_samples]
    assert len(captions) == SMALL.num_heldout == len(set(captions))
    assert not set(captions) & train_captions
    vocab = ChameleonVocab(build_debug_tokenizer(num_image_codes=SMALL.num_image_codes).get_vocab(with_added_tokens=True))
    vq = load_demo_vqgan(small_demo)
    for sample in heldout_samples:
        tokens, prompt_len = sample["tokens"].tolist(), int(sample["prompt_len"])
        codes = tokens_to_image(tokens[prompt_len:-1], vocab)
        assert codes.shape == (SMALL.code_size, SMALL.code_size) and int(codes.max()) < vq.num_codes
        assert sample["feat_demo"].shape == (SMALL.feature_dim,)


def test_demo_encoder_scores_demo_captions_without_truncation(small_demo):
    from arra_ds.eval.clip_score import build_clip_scorer

    scorer = build_clip_scorer(f"local-dir:{demo_models(small_demo).encoders[0].path}")
    rng = np.random.default_rng(0)
    captions = [random_scene(rng)[2] for _ in range(200)]
    assert not any(scorer.truncated(captions))
    images = torch.zeros((2, 3, 128, 128), dtype=torch.uint8)
    scores = scorer.scores(images, captions[:2])
    assert scores.shape == (2,) and np.isfinite(scores).all()


def test_own_data_holds_the_scenes_in_every_input_format(small_demo, tmp_path):
    """launch/demo_data.py's files: the same scenes as a table, pairs, shards and a conversation JSON, the demo's
    models and a config that reads them (the README's "Your own data" runs them through the launcher)."""
    import tarfile

    from arra_ds.config import load_dataclass_config
    from arra_ds.data.pretokenize import PretokenizeConfig, validate_pretokenize
    from arra_ds.demo.own_data import OwnDataConfig, write_own_data

    out = tmp_path / "my_data"
    written = write_own_data(OwnDataConfig(out_dir=str(out), num_samples=5, samples_per_shard=2, seed=3, demo=SMALL))
    assert written["samples"] == 5 and written["shards"] == 3
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == [(out / r["image"]).with_suffix(".txt").read_text().strip() for r in rows]
    with tarfile.open(out / "shards" / "scenes-000002.tar") as tar:
        assert tar.getnames() == ["scene-00004.png", "scene-00004.txt"]
    assert (out / "models" / "vqgan.ckpt").read_bytes() == (small_demo / "models" / "vqgan.ckpt").read_bytes()
    for source in ("captions.jsonl", "captions.csv", "images", "shards", "conversations.json"):
        cfg = load_dataclass_config(PretokenizeConfig, out / "pretokenize.yaml", [f"input={out / source}", f"out_dir={tmp_path / 'x'}"])
        report = validate_pretokenize(cfg)
        assert (report["would_write"], report["would_skip"], report["feature_widths"]) == (5, 0, {"demo": SMALL.feature_dim})
        assert report["grids"] == {f"{SMALL.code_size}x{SMALL.code_size}": 5}
