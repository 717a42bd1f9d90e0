"""Prompt sources, model loading, launch/generate.py and reference statistics (launch/fid_stats.py)."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_launcher
from gen_helpers import NUM_CODES, PROMPTS, save_backbone_dir, save_vqgan, write_mds, write_prompt_json
from PIL import Image

from arra_ds.eval.fid import load_stats
from arra_ds.generate.loading import ModelLoadError, load_for_generation, resolve_model
from arra_ds.generate.pipeline import GenerateConfig, run_generate
from arra_ds.generate.prompts import load_prompts
from arra_ds.generate.sampling import SamplingConfig
from arra_ds.tokens.layout import image_to_tokens
from arra_ds.tokens.vocab import VocabError, build_debug_vocab

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    (root / "model").mkdir()
    return {"root": root, "model": save_backbone_dir(root / "model"), "vqgan": save_vqgan(root),
            "json": write_prompt_json(root / "data"), "mds": write_mds(root / "mds")}


def test_prompt_sources(tmp_path, assets):
    vocab = build_debug_vocab(num_image_codes=NUM_CODES)
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n  two blue squares  \n")
    from_txt = load_prompts(txt, vocab)
    assert [p.text for p in from_txt.prompts] == ["a red circle", "two blue squares"] and not from_txt.has_real_images

    items = json.loads(assets["json"].read_text())
    items.append({"conversations": [{"from": "human", "value": "no image"}, {"from": "gpt", "value": "<|image|>"}], "image": []})
    items.append({"conversations": [{"from": "human", "value": "<|image|> describe"}, {"from": "gpt", "value": "x"}], "image": ["a.png"]})
    bad = assets["root"] / "data" / "with_bad.json"
    bad.write_text(json.dumps(items))
    from_json = load_prompts(bad, vocab)
    assert len(from_json.prompts) == len(PROMPTS) and from_json.has_real_images
    assert [s["item"] for s in from_json.skipped] == [len(PROMPTS), len(PROMPTS) + 1]
    assert from_json.prompts[0].real_image_path == str(assets["root"] / "data" / "real_000.png")
    assert len(load_prompts(bad, vocab, limit=2).prompts) == 2

    from_mds = load_prompts(assets["mds"], vocab, limit=3)
    assert [p.text for p in from_mds.prompts] == PROMPTS[:3] and from_mds.has_real_images
    first = from_mds.prompts[0]
    assert first.prompt_ids == [vocab.id(w) for w in PROMPTS[0].split() if w in vocab.token_to_id]
    assert first.real_codes.shape == (4, 4)
    assert image_to_tokens(torch.from_numpy(first.real_codes), vocab)[0] == vocab.image_start_id
    with pytest.raises(FileNotFoundError, match="prompt source"):
        load_prompts(tmp_path / "nope.txt", vocab)


def test_model_loading_errors(tmp_path, assets):
    def load_vocab(path):
        return resolve_model(path).vocab()

    assert load_vocab(assets["model"]).image_start_id == build_debug_vocab(num_image_codes=NUM_CODES).image_start_id
    with pytest.raises(ModelLoadError, match="neither"):
        load_vocab(tmp_path)
    with pytest.raises(ModelLoadError, match="no such run directory"):
        load_vocab(tmp_path / "nonexistent")
    other = build_debug_vocab(num_image_codes=NUM_CODES + 8)  # a tokenizer with other ids
    from arra_ds.tokens.vocab import build_debug_tokenizer

    build_debug_tokenizer(num_image_codes=NUM_CODES + 8).save(str(tmp_path / "other.json"))
    assert other.image_start_id != load_vocab(assets["model"]).image_start_id
    with pytest.raises(VocabError, match="disagree"):
        load_for_generation(resolve_model(assets["model"]), torch.float32, "cpu", tokenizer=str(tmp_path / "other.json"))


def test_generate_launcher_writes_pngs_and_resumes(tmp_path, assets):
    yaml_path, ckpt_path = assets["vqgan"]
    args = [f"model={assets['model']}", f"vqgan_config={yaml_path}", f"vqgan_checkpoint={ckpt_path}",
            f"output_dir={tmp_path / 'out'}", "sampling.height=32", "sampling.width=64", "samples_per_prompt=2",
            "batch_size=3", "progress_bar=false", "--prompt", "a red circle", "--prompt", "two blue squares"]
    assert run_launcher("generate.py", args) == 0
    files = sorted((tmp_path / "out" / "images").glob("*.png"))
    assert [f.name for f in files] == [f"{k:06d}.png" for k in range(4)]
    assert Image.open(files[0]).size == (64, 32) and Image.open(files[0]).mode == "RGB"
    manifest = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in manifest] == ["a red circle"] * 2 + ["two blue squares"] * 2
    first = files[1].read_bytes()
    files[1].unlink()
    assert run_launcher("generate.py", args) == 0
    assert files[1].read_bytes() == first  # the same seed and batch give the same image
    # MDS prompts (exact training prompt ids) through the config file path
    cfg = GenerateConfig(model=str(assets["model"]), vqgan_config=str(yaml_path), vqgan_checkpoint=str(ckpt_path),
                         prompts=str(assets["mds"]), num_prompts=2, output_dir=str(tmp_path / "mds_out"),
                         progress_bar=False, sampling=SamplingConfig(height=32, width=32))
    summary = run_generate(cfg)
    assert summary == {"generated": 2, "reused": 0, "images_dir": str(tmp_path / "mds_out" / "images"), "num_samples": 2}
    assert run_launcher("generate.py", [f"model={assets['model']}"]) == 2  # no prompts: a clear error, exit 2


def test_reference_stats_from_folder_and_mds(tmp_path, assets, capsys):
    folder = assets["root"] / "data"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "tiny.png")  # a valid but small image
    (folder / "broken.png").write_bytes(b"not a png")  # unreadable: left out, counted, not fatal
    args = [f"source={folder}", "extractors=[xrv]", "extractor_weights={xrv: random}", "height=64", "width=64",
            f"output_dir={tmp_path / 'stats'}", "progress_bar=false"]
    assert run_launcher("fid_stats.py", args) == 0
    out = capsys.readouterr().out
    assert "broken.png" in out and "1 unreadable image(s) left out" in out
    stats = load_stats(tmp_path / "stats" / "xrv.npz")
    assert stats.num_samples == len(PROMPTS) + 1 and stats.source["num_items"] == len(PROMPTS) + 2
    assert stats.mu.shape == (1024,) and stats.extractor == "xrv"
    mtime = (tmp_path / "stats" / "xrv.npz").stat().st_mtime_ns
    assert run_launcher("fid_stats.py", args) == 0  # same extractor, weights and source: reused
    assert (tmp_path / "stats" / "xrv.npz").stat().st_mtime_ns == mtime

    yaml_path, ckpt_path = assets["vqgan"]
    mds_args = [f"source={assets['mds']}", "extractors=[xrv]", "extractor_weights={xrv: random}", "height=64", "width=64",
                f"output_dir={tmp_path / 'mds_stats'}", f"model={assets['model']}", f"vqgan_config={yaml_path}",
                f"vqgan_checkpoint={ckpt_path}", "progress_bar=false", "limit=4"]
    assert run_launcher("fid_stats.py", mds_args) == 0
    assert load_stats(tmp_path / "mds_stats" / "xrv.npz").num_samples == 4
    assert run_launcher("fid_stats.py", mds_args[:-5]) == 2  # an MDS source without model / VQGAN


@pytest.mark.parametrize("script", ["generate.py", "eval.py", "fid_stats.py"])
def test_launchers_answer_bad_config_with_one_line_and_exit_2(tmp_path, capsys, script):
    assert run_launcher(script, ["output_dri=x"]) == 2  # a typo: the message suggests the key meant
    assert "unknown config key 'output_dri'. Did you mean 'output_dir'?" in capsys.readouterr().err
    if script != "fid_stats.py":  # the only launcher without --config
        broken = tmp_path / "broken.yaml"
        broken.write_text("model: [unclosed\n")
        assert run_launcher(script, ["--config", str(broken)]) == 2
        assert f"config file {broken} is not valid YAML" in capsys.readouterr().err
        assert run_launcher(script, ["--config", str(tmp_path / "missing.yaml")]) == 2
        assert "missing.yaml does not exist" in capsys.readouterr().err


def test_generate_from_a_model_with_a_data_record_needs_only_a_prompt(tmp_path, assets, capsys):
    """A model that carries its run's data record (an export does): no VQGAN keys, the trained size,
    key=value overrides after --prompt, and a wrong key is one line naming it."""
    from dataclasses import asdict

    from arra_ds.checkpoints import RUN_DATA_FILE, RunData
    from arra_ds.generate.sampling import seed_for_sample

    model = tmp_path / "model"
    shutil.copytree(assets["model"], model)
    yaml_path, ckpt_path = assets["vqgan"]
    record = RunData(code_height=2, code_width=4, vqgan_config=str(yaml_path), vqgan_checkpoint=str(ckpt_path))
    (model / RUN_DATA_FILE).write_text(json.dumps(asdict(record)))
    out = tmp_path / "out"
    args = [f"model={model}", "--prompt", "a red circle", f"output_dir={out}", "sampling.seed=3", "progress_bar=false"]
    assert run_launcher("generate.py", args) == 0
    assert Image.open(out / "images" / "000000.png").size == (64, 32)  # 2 x 4 codes of 16 px
    manifest = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert manifest[0]["seed"] == seed_for_sample(3, 0)
    assert "warning" not in capsys.readouterr().err
    assert run_launcher("generate.py", [*args, "sampling.seed_=4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown config key 'sampling.seed_'")
