"""In-training evaluation under ZeRO-3 (2 CPU ranks): sample grid + FID in tensorboard every
train.eval_every steps, and the images equal what the saved checkpoint generates offline."""

import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, free_port, launcher, subprocess_env
from gen_helpers import TINY_VQ
from PIL import Image

from arra_ds.demo.config import DemoDataConfig
from arra_ds.demo.dataset import demo_dir
from arra_ds.errors import ConfigError
from arra_ds.generate.pipeline import GenerateConfig, run_generate
from arra_ds.generate.sampling import SamplingConfig
from arra_ds.model.config import ModelConfig
from arra_ds.tokens.vqgan import VQGAN, VQGANConfig
from arra_ds.train.run_config import load_run_config

pytestmark = pytest.mark.slow

DEMO_CODES = DemoDataConfig().num_image_codes  # the debug model's image vocabulary



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_eval")
    torch.manual_seed(0)
    VQGAN(VQGANConfig(**{**TINY_VQ, "n_embed": DEMO_CODES})).save_original(root / "vqgan.yaml", root / "vqgan.ckpt")
    run = root / "run"
    overrides = [
        f"output_dir={run}", "train.progress_bar=false", "train.log_every=1", "demo.num_samples=32",
        "train.micro_batch_size=4", "optim.warmup_steps=1", "train.max_steps=4", "train.save_every=2",
        "train.eval_every=2", f"eval.vqgan_config={root / 'vqgan.yaml'}", f"eval.vqgan_checkpoint={root / 'vqgan.ckpt'}",
        "eval.num_prompts=3", "eval.batch_size=2", "eval.extractor=xrv", "eval.extractor_weights=random",
        "eval.sampling.image_top_k=50", "eval.sampling.guidance_scale=3.0",
    ]
    cmd = [launcher("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
           "--ds_config", "ds_configs/zero3.json", *overrides]
    # (module fixtures run before the autouse private-cache fixture: give the demo data its own cache)
    env = subprocess_env(ARRA_DS_CACHE=root / "cache")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root, run, proc.stdout


def test_eval_every_logs_grid_and_fid(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, stdout = trained
    assert "eval at step 2: eval/fid_xrv" in stdout and "eval at step 4" in stdout
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("eval/fid_xrv")] == [2, 4]
    assert all(np.isfinite(e.value) and e.value > 0 for e in events.Scalars("eval/fid_xrv"))
    assert [e.step for e in events.Images("eval/samples")] == [2, 4]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval/fid_xrv" in r] == [2, 4]
    # the demo data is 8 x 8 codes: images at the data's size, 128 x 128
    for step in (2, 4):
        files = sorted((run / "eval" / f"step_{step:08d}").glob("*.png"))
        assert [f.name for f in files] == ["000000.png", "000001.png", "000002.png"]
        assert Image.open(files[0]).size == (128, 128)
    assert (run / "eval" / "reference" / "xrv.npz").is_file()
    before = (run / "eval" / "step_00000002" / "000000.png").read_bytes()
    assert before != (run / "eval" / "step_00000004" / "000000.png").read_bytes()  # weights moved between evals


def test_checkpoint_generates_the_in_training_images(trained, tmp_path, monkeypatch):
    """Loading the ZeRO-3 checkpoint outside DeepSpeed and sampling the same prompts with the same
    seeds reproduces the images the trainer made from its gathered weights at that step."""
    root, run, _ = trained
    monkeypatch.setenv("ARRA_DS_CACHE", str(root / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trainer's ranks (OMP_NUM_THREADS=1): the same float round-off
    cfg = load_run_config(run / "config.yaml")
    sampling = SamplingConfig(image_top_k=50, guidance_scale=3.0, height=128, width=128)
    gen = GenerateConfig(
        model=str(run / "checkpoints" / "step_00000004"), vqgan_config=str(root / "vqgan.yaml"),
        vqgan_checkpoint=str(root / "vqgan.ckpt"), prompts=str(demo_dir(cfg.demo, cfg.seed)), num_prompts=3,
        batch_size=2, output_dir=str(tmp_path / "offline"), progress_bar=False, sampling=sampling, precision="fp32",
    )
    try:
        assert run_generate(gen)["generated"] == 3
    finally:
        torch.set_num_threads(threads)
    for k in range(3):
        name = f"{k:06d}.png"
        assert (tmp_path / "offline" / "images" / name).read_bytes() == (run / "eval" / "step_00000004" / name).read_bytes()


def test_eval_every_needs_a_decoder(tmp_path):
    """The decoder is the data's own VQGAN (the demo's, or pretokenize_meta.json's); explicit files
    must come in pairs and exist, and data that names none gets the keys to pass."""
    from arra_ds.checkpoints import RunData
    from arra_ds.eval.train_eval import TrainEvalConfig, TrainEvaluator, build_train_evaluator

    load_run_config(None, ["train.eval_every=10", f"output_dir={tmp_path}"])  # the demo data names its VQGAN
    with pytest.raises(ConfigError, match="goes with eval.vqgan_checkpoint"):
        load_run_config(None, ["train.eval_every=10", "eval.vqgan_config=x.yaml"])
    with pytest.raises(ConfigError, match="eval.vqgan_config=x.yaml does not exist"):
        load_run_config(None, ["train.eval_every=10", "eval.vqgan_config=x.yaml", "eval.vqgan_checkpoint=x.ckpt"])
    with pytest.raises(ConfigError, match="pass eval.vqgan_config=<config> eval.vqgan_checkpoint=<weights>"):
        TrainEvaluator(TrainEvalConfig(), ModelConfig(), None, None, tmp_path, torch.device("cpu"), source="", data=RunData())
    # the trainer builds none then (the embedded config's eval_every on data of unknown origin) and says why
    assert build_train_evaluator(TrainEvalConfig(), ModelConfig(), None, None, tmp_path, torch.device("cpu"), "",
                                 RunData()) is None
