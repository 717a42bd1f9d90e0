"""The evaluation launcher: 1 rank vs 2 ranks (torchrun, gloo) give identical images and metrics,
and a resumed run generates only the missing images."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, free_port, launcher, subprocess_env
from gen_helpers import PROMPTS, save_backbone_dir, save_vqgan, write_prompt_json

from arra_ds.config import from_dict
from arra_ds.eval.runner import EvalConfig, run_eval

pytestmark = pytest.mark.slow


def eval_overrides(setup: dict, output_dir: Path) -> list[str]:
    return [
        f"model={setup['model']}",
        f"prompts={setup['prompts']}",
        f"vqgan_config={setup['vqgan'][0]}",
        f"vqgan_checkpoint={setup['vqgan'][1]}",
        f"output_dir={output_dir}",
        "num_prompts=4",
        "samples_per_prompt=2",
        "batch_size=3",  # 8 samples -> chunks of 3, 3, 2: ranks get different amounts of work
        "sampling.height=64",
        "sampling.width=64",
        "sampling.image_top_k=40",
        "extractors=[xrv]",
        "extractor_weights={xrv: random}",
        "clip_model=random",
        "ms_ssim_config.win_size=3",
        "progress_bar=false",
    ]


def config_from(overrides: list[str]) -> EvalConfig:
    from arra_ds.config import apply_overrides

    return from_dict(EvalConfig, apply_overrides({}, overrides))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "model").mkdir()
    return {
        "root": root,
        "model": save_backbone_dir(root / "model"),
        "vqgan": save_vqgan(root),
        "prompts": write_prompt_json(root / "data", PROMPTS),
    }


@pytest.fixture(scope="module")
def torchrun_reports(setup):
    """The same evaluation with 1 and with 2 ranks, both under torchrun (same environment, run side by side)."""
    runs = {}
    for nproc, port in ((1, free_port()), (2, free_port())):
        out = setup["root"] / f"ranks_{nproc}"
        cmd = [launcher("torchrun"), f"--nproc_per_node={nproc}", f"--master_port={port}",
               str(REPO_ROOT / "launch" / "eval.py"), *eval_overrides(setup, out)]
        runs[nproc] = (out, subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    reports = {}
    for nproc, (out, proc) in runs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-4000:]
        reports[nproc] = (out, json.loads((out / "report.json").read_text()))
    return reports


def test_one_and_two_ranks_give_identical_images_and_metrics(torchrun_reports):
    (out1, report1), (out2, report2) = torchrun_reports[1], torchrun_reports[2]
    files1 = sorted(p.name for p in (out1 / "images").glob("*.png"))
    assert files1 == [f"{k:06d}.png" for k in range(8)]
    assert files1 == sorted(p.name for p in (out2 / "images").glob("*.png"))
    for name in files1:
        assert (out1 / "images" / name).read_bytes() == (out2 / "images" / name).read_bytes(), name
    assert report1["metrics"] == report2["metrics"]
    assert all(v is not None for v in report1["metrics"].values())
    assert set(report1["metrics"]) == {"fid_xrv", "ms_ssim_paired", "ms_ssim_diversity", "clip_score"}
    assert report1["world_size"] == 1 and report2["world_size"] == 2
    assert report2["generation"] == {"generated": 8, "reused": 0}
    assert report1["num_samples"] == 8 and report1["samples_per_prompt"] == 2
    assert report1["extractors"]["xrv"]["weights_hash"] == report2["extractors"]["xrv"]["weights_hash"]
    assert report1["sampling"]["guidance_scale"] == 4.0 and report1["checkpoint"]["kind"] == "hf"
    assert report1["clip"]["context_length"] == 16 and report1["clip"]["truncated_prompts"] == 0
    assert (out1 / "tensorboard").is_dir() and any((out1 / "tensorboard").iterdir())
    # samples of one prompt differ (per-sample seeds), and the manifest says who is who
    assert (out1 / "images" / "000000.png").read_bytes() != (out1 / "images" / "000001.png").read_bytes()
    manifest = [json.loads(line) for line in (out1 / "samples.jsonl").read_text().splitlines()]
    assert [m["prompt_index"] for m in manifest] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len({m["seed"] for m in manifest}) == 8


def test_resumed_eval_generates_only_missing_images(setup, torchrun_reports):
    out1, report1 = torchrun_reports[2]
    resumed = setup["root"] / "resumed"
    shutil.copytree(out1, resumed)
    removed = ["000001.png", "000004.png", "000007.png"]
    originals = {name: (resumed / "images" / name).read_bytes() for name in removed}
    kept_mtime = (resumed / "images" / "000000.png").stat().st_mtime_ns
    stats_mtime = (resumed / "reference" / "xrv.npz").stat().st_mtime_ns
    for name in removed:
        (resumed / "images" / name).unlink()
    (resumed / "report.json").unlink()

    torch.set_num_threads(1)
    report = run_eval(config_from(eval_overrides(setup, resumed)))
    assert report["generation"] == {"generated": 3, "reused": 5}
    assert (resumed / "images" / "000000.png").stat().st_mtime_ns == kept_mtime
    assert (resumed / "reference" / "xrv.npz").stat().st_mtime_ns == stats_mtime  # cached statistics reused
    for name in removed:  # same seed, same batch shapes: the same image as the first run
        assert (resumed / "images" / name).read_bytes() == originals[name], name
    # (in this process numpy's BLAS may use other thread counts than the torchrun ranks: float64
    # round-off in the matrix square root is the only difference allowed)
    assert report["metrics"] == pytest.approx(report1["metrics"], rel=1e-9)


def test_bad_config_is_refused(setup, tmp_path):
    from arra_ds.errors import ConfigError

    with pytest.raises(ConfigError, match="vqgan_config"):
        run_eval(config_from([f"model={setup['model']}", f"prompts={setup['prompts']}"]))
    with pytest.raises(ConfigError, match="unknown extractor"):
        run_eval(config_from(eval_overrides(setup, tmp_path) + ["extractors=[dino]"]))
    with pytest.raises(ConfigError, match="unknown config key 'bogus_key'"):
        config_from(["bogus_key=1"])
    with pytest.raises(FileNotFoundError, match="prompt source"):
        run_eval(config_from(eval_overrides(setup, tmp_path) + [f"prompts={tmp_path / 'missing.txt'}"]))
