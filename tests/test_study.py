"""The ARRA-vs-baseline study: its ground truth, its instruments, its settings, and the whole
``profile=smoke`` study through launch/study.py (real pre-tokenization, DeepSpeed ZeRO-3 runs,
launch/eval.py, report). The smoke test checks the pipeline and the report's structure, not the result."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, subprocess_env

from arra_ds.demo.attributes import AttributeNetConfig, SceneAttributeNet, load_attribute_net, save_attribute_net
from arra_ds.demo.config import DemoDataConfig
from arra_ds.demo.models import build_demo_vqgan
from arra_ds.demo.scenes import FIDELITY_ASPECTS, SceneAttributes, SlotShape, draw_scene, parse_caption, random_scene
from arra_ds.errors import ConfigError
from arra_ds.eval.extractors import build_extractor
from arra_ds.generate.pipeline import decode_to_uint8
from arra_ds.study.config import load_study_config
from arra_ds.study.judge import CodePainter, attribute_accuracy, prompt_fidelity
from arra_ds.study.paths import StudyPaths
from arra_ds.study.report import compare
from arra_ds.study.runs import train_command, train_run_config


def test_captions_parse_back_to_their_scenes():
    rng = np.random.default_rng(0)
    for _ in range(500):
        shapes, background, caption = random_scene(rng)
        truth = SceneAttributes.of_scene(shapes, background)
        assert all(parse_caption(caption).check(truth).values()), caption
        assert SceneAttributes.from_dict(truth.as_dict()) == truth
    for text in ("a purple circle at the top left on a black background", "two red circles", "hello"):
        with pytest.raises(ValueError, match="not a demo caption"):
            parse_caption(text)


def test_caption_checks_name_the_aspect_that_fails():
    spec = parse_caption("a large red circle at the top left and a blue square at the center on a gray background")
    seen = SceneAttributes.of_scene([], "gray")
    seen.slots["top left"] = SlotShape("circle", "red", "small")
    seen.slots["center"] = SlotShape("triangle", "blue", "small")
    result = spec.check(seen)
    assert result == {"background": True, "count": True, "positions": True, "colours": True, "shapes": False,
                      "sizes": False, "all": False}
    counted = parse_caption("three green squares on a black background")
    seen = SceneAttributes.of_scene([], "black")
    for slot in ("top left", "top right", "bottom left"):
        seen.slots[slot] = SlotShape("square", "green", "small")
    assert counted.check(seen)["all"]  # any three corners will do
    seen.slots["center"] = SlotShape("square", "green", "small")
    assert not counted.check(seen)["count"] and not counted.check(seen)["positions"]
    fidelity = prompt_fidelity([seen], ["three green squares on a black background"])
    assert set(FIDELITY_ASPECTS) <= set(fidelity) and fidelity["all_count"] == 0.0


def test_painted_codes_are_the_decoded_pictures(tmp_path):
    cfg = DemoDataConfig(code_size=4, num_image_codes=16)
    rng = np.random.default_rng(1)
    files = []
    for i in range(8):
        shapes, background, _ = random_scene(rng)
        files.append(tmp_path / f"{i}.png")
        draw_scene(shapes, background, cfg.image_size, rng).save(files[-1])
    vq = build_demo_vqgan(cfg, seed=0, image_paths=files)
    painter = CodePainter.from_decoder(vq, cfg.num_image_codes)
    grids = [torch.randint(0, cfg.num_image_codes, (4, 4)).numpy() for _ in range(3)]
    assert painter.check(vq, grids) <= 2
    codes = torch.from_numpy(grids[0]).long()
    assert painter.paint(codes[None]).shape == (1, 3, 64, 64)
    decoded = torch.from_numpy(decode_to_uint8(vq, codes)).permute(2, 0, 1).int()  # [3, 64, 64]
    assert (painter.paint(codes[None])[0].int() - decoded).abs().max() <= 2


def test_attribute_model_saves_loads_and_is_an_fid_extractor(tmp_path):
    net = SceneAttributeNet(AttributeNetConfig(code_size=4, channels=4, feature_dim=6))
    weights = save_attribute_net(net, tmp_path / "judge")
    loaded = load_attribute_net(weights)
    pictures = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    assert [a.as_dict() for a in loaded.read(pictures)] == [a.as_dict() for a in net.eval().read(pictures)]
    extractor = build_extractor("scene", str(weights))
    assert extractor.extract(pictures).shape == (3, 6) and extractor.feature_dim == 6
    with pytest.raises(ValueError, match="64 x 64"):
        extractor.extract(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(Exception, match="no default weights"):
        build_extractor("scene", "")
    truth = loaded.read(pictures)
    assert attribute_accuracy(truth, truth)["exact"] == 1.0


def test_study_config_profiles_and_errors():
    smoke = load_study_config(None, ["profile=smoke"])
    assert smoke.profile == "smoke" and smoke.scenes.code_size == 4 and smoke.eval_steps() == [2, 4]
    cpu = load_study_config(None, [])
    assert cpu.profile == "cpu" and [a.name for a in cpu.selected_arms()] == ["ar_only", "arra"]
    assert len(cpu.seeds) >= 3
    gpu = load_study_config(None, ["profile=gpu"])
    assert len(gpu.selected_arms()) > 2 and gpu.scenes.random_encoder
    with pytest.raises(ConfigError, match="profile=tpu is not defined"):
        load_study_config(None, ["profile=tpu"])
    with pytest.raises(ConfigError, match="must divide"):
        load_study_config(None, ["eval.every=7"])
    with pytest.raises(ConfigError, match="not defined"):
        load_study_config(None, ["run_arms=[ar_only,nope]"])
    with pytest.raises(ConfigError, match="unknown config key 'scenes.colours'"):
        load_study_config(None, ["scenes.colours=3"])


@pytest.mark.parametrize("profile", ["cpu", "gpu"], ids=["cpu_profile", "gpu_profile"])  # an id "gpu" would read as the gpu marker
def test_every_arm_makes_a_valid_run_config(tmp_path, profile):
    """Each arm's training run (the study's run section + per-run keys + the arm's overrides) passes
    the trainer's own checks; the same seed gives every arm the same seed and data."""
    cfg = load_study_config(None, [f"profile={profile}", f"output_dir={tmp_path}"])
    paths = StudyPaths(tmp_path)
    for split in cfg.train_splits():
        paths.mds(split).mkdir(parents=True)
        (paths.mds(split) / "index.json").write_text("{}")  # DataConfig.validate only looks for it
    runs = {arm.name: train_run_config(cfg, paths, arm, seed=1) for arm in cfg.selected_arms()}
    for name, run in runs.items():
        run.validate()
        split = "train_rep" if run.align.target == "rep" else "train"  # <REP> opens the answers of its data
        assert run.seed == 1 and run.data.path == str(paths.mds(split)) and run.train.resume == "auto"
        assert run.train.save_every == (cfg.eval.every or cfg.run.train.max_steps) and run.train.keep_last == 0
    assert runs[cfg.baseline].align.weight == 0 and runs[cfg.treatment].align.weight == 1
    assert {run.model.debug.hidden_size for run in runs.values()} == {cfg.run.model.debug.hidden_size}
    command = train_command(cfg, paths.run_dir("arra", 1) / "study_run.yaml", gpu=None)
    if cfg.launcher == "deepspeed":
        assert "--num_gpus" in command and "--master_port" in command
        assert "--include" in train_command(cfg, tmp_path / "x.yaml", gpu=3) and "localhost:3" in train_command(cfg, tmp_path / "x.yaml", gpu=3)


def test_differences_are_paired_and_read_against_the_seed_spread():
    cfg = load_study_config(None, ["profile=smoke"])
    base = {"fidelity_all": [0.20, 0.22, 0.21], "fid_scene": [10.0, 12.0, 11.0]}
    arra = {"fidelity_all": [0.40, 0.41, 0.43], "fid_scene": [11.0, 10.0, 12.5]}
    out = compare(cfg, {"ar_only": {4: base}, "arra": {4: arra}})["arra"][4]
    assert out["fidelity_all"]["mean"] == pytest.approx(0.2033, abs=1e-3)
    assert out["fidelity_all"]["exceeds_spread"] and out["fidelity_all"]["seeds_favouring_arm"] == 3
    assert not out["fid_scene"]["exceeds_spread"] and out["fid_scene"]["seeds_favouring_arm"] == 1


def run_study(*overrides):
    cmd = [sys.executable, "launch/study.py", "--config", "configs/studies/demo_arra.yaml", "profile=smoke",
           "progress_bar=false", *overrides]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_smoke_study_end_to_end_and_resume(tmp_path):
    out = tmp_path / "study"
    proc = run_study(f"output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["profile"] == "smoke" and report["eval_steps"] == [2, 4] and report["seeds"] == [0, 1]
    for arm in ("ar_only", "arra"):
        for step in ("2", "4"):
            metrics = report["results"][arm][step]
            for name in ("fidelity_all", "fid_scene", "clip_score", "ms_ssim_diversity", "ms_ssim_paired"):
                assert metrics[name]["n"] == 2 and metrics[name]["mean"] is not None, (arm, step, name)
        curves = report["training_curves"][arm]["loss_ar"]
        assert curves["steps"] == [1, 2, 3, 4] and all(None not in row for row in curves["values"])
    diff = report["differences"]["arra"]["4"]["fidelity_all"]
    assert diff["n"] == 2 and diff["exceeds_spread"] in (True, False)
    assert len(report["verdict"]) == 3
    setup = report["setup"]
    assert {"ceiling", "chance", "fid_floor", "fid_reference", "judge", "clip"} <= set(setup)
    assert setup["paint_vs_decode_max_error"] <= 2
    timing = report["timing"]
    assert timing["invocations"] == 1 and set(timing["stages"]) == {"data", "instruments", "runs"}
    assert timing["training_run_wall_s"]["n"] == 4 and timing["evaluation_wall_s"]["n"] == 8
    markdown = (out / "report.md").read_text()
    assert "## Verdict at the last step" in markdown and "seed-to-seed spread" in markdown
    for picture in ("curves.png", "samples.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_dir = out / "runs" / "arra" / "seed_1"
    assert (run_dir / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    assert "loss_gva" in (run_dir / "metrics.jsonl").read_text()
    assert json.loads((run_dir / "eval" / "step_4" / "report.json").read_text())["num_samples"] == 8

    again = run_study(f"output_dir={out}")  # everything is there: nothing is trained or evaluated again
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "train.log").read_text().count("\n$ ") == 1
    rerun = json.loads((out / "report.json").read_text())
    assert rerun["results"] == report["results"] and rerun["timing"]["invocations"] == 2

    # An added arm that aligns at <REP>: its data is pre-tokenised again with <REP> opening every answer, it
    # trains on that, and sampling puts <REP> where training had it (the arm used to fail at its first step).
    with_rep = run_study(f"output_dir={out}", "run_arms=[ar_only,arra,arra_rep]")
    assert with_rep.returncode == 0, with_rep.stdout[-3000:] + with_rep.stderr[-3000:]
    assert json.loads((out / "data" / "train_rep_mds" / "pretokenize_meta.json").read_text())["rep_token"] is True
    rep_run = out / "runs" / "arra_rep" / "seed_0"
    assert json.loads((rep_run / "arra_data.json").read_text())["rep_token"] is True
    assert json.loads((run_dir / "arra_data.json").read_text())["rep_token"] is False
    rep_results = json.loads((out / "report.json").read_text())["results"]["arra_rep"]["4"]
    assert rep_results["fidelity_all"]["n"] == 2 and rep_results["fid_scene"]["mean"] is not None

    changed = run_study(f"output_dir={out}", "run.train.max_steps=6", "eval.every=3")
    assert changed.returncode == 2 and "other settings" in changed.stderr
