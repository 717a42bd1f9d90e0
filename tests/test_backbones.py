"""The backbone registry and what it buys: a backbone is one module (a renamed debug backbone registered from a test
file trains, generates, evaluates and exports through the public launchers), the trainer's step runs without a
launcher, and a run keeps working after its base checkpoint moves."""

import json
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from conftest import REPO_ROOT, free_port, launcher, run_launcher, subprocess_env
from gen_helpers import PROMPTS, save_backbone_dir, save_vqgan, write_mds
from toy_backbone import TOY

from arra_ds.checkpoints import (
    ASSETS_DIR,
    RUN_DATA_FILE,
    CheckpointError,
    RunData,
    check_external_file,
    read_run_assets,
    read_run_data,
)
from arra_ds.data.pretokenize.config import META_FILE
from arra_ds.errors import ConfigError
from arra_ds.model.config import ModelConfig
from arra_ds.model.registry import BUILTIN, backbone_for, register_backbone, registered_backbones
from arra_ds.train.run_assets import write_run_assets

PLUGIN = "toy_backbone"  # tests/ is on the launchers' PYTHONPATH next to the repo (conftest.subprocess_env)


def test_the_registry_finds_built_in_and_registered_backbones():
    assert [b.name for b in BUILTIN] == ["debug", "chameleon", "lumina_mgpt", "llamagen", "janus"]
    assert backbone_for("toy") is TOY and TOY in registered_backbones()
    assert register_backbone(TOY) is TOY  # registering the same object again is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(type(TOY)())
    with pytest.raises(ConfigError, match=r"model.source='nope' is not a registered backbone; use one of .*'toy'"):
        ModelConfig(source="nope").validate()
    cfg = ModelConfig(source="toy")
    cfg.validate()
    assert cfg.shape() == ModelConfig().shape() and cfg.backbone.condition == "text"


# ---- the trainer's step, without a launcher -----------------------------------------------------------------


@pytest.fixture
def single_process(monkeypatch):
    """A process group of one inside pytest; afterwards the rendezvous variables and the group are gone, and
    torch.nn.functional.linear is torch's again (DeepSpeed's ZeRO-3 leaves its own linear installed in the process)."""
    from arra_ds import distributed

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", LOCAL_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
    yield
    distributed.destroy_process_group()


def test_train_step_runs_a_tiny_model_without_a_launcher(tmp_path, single_process):
    from arra_ds.train.engine import init_distributed
    from arra_ds.train.run_config import load_run_config
    from arra_ds.train.trainer import Trainer

    cfg = load_run_config(None, [f"output_dir={tmp_path / 'run'}", "demo.num_samples=128", "train.micro_batch_size=4",
                                 "train.max_steps=3", "train.eval_every=0", "train.tensorboard=false",
                                 "train.progress_bar=false"])
    init_distributed()
    trainer = Trainer(cfg, REPO_ROOT / "ds_configs" / "zero3.json")
    # the run config is resolved once, into a new object: the given one is unchanged
    assert (cfg.train.global_batch_size, cfg.align.feature_dim) == (0, 0)
    assert (trainer.cfg.train.global_batch_size, trainer.cfg.align.feature_dim) == (4, 32)
    first = trainer.train_step()
    second = trainer.train_step()
    assert trainer.state.step == 2 and trainer.state.samples_seen == 8
    for record in (first, second):
        assert set(record) >= {"loss", "loss_ar", "loss_gva", "loss_z", "cos", "lr", "grad_norm", "tokens_per_s"}
        assert all(torch.isfinite(torch.tensor(record[k])) for k in ("loss", "loss_ar", "loss_gva", "cos"))
        combined = record["loss_ar"] + cfg.align.weight * record["loss_gva"] + cfg.model.z_loss_weight * record["loss_z"]
        assert record["loss"] == pytest.approx(combined, rel=1e-6)
    assert second["grad_norm"] > 0 and second["loss"] != first["loss"]
    saved = trainer.save()
    assert saved.name == "step_00000002" and (saved / "trainer_state.json").is_file()
    summary = trainer.summary(elapsed=1.0)
    assert summary["steps"] == 2 and summary["final_loss"] == second["loss"]


# ---- a run keeps what inference needs ---------------------------------------------------------------------


def pretokenized_data(root):
    """Tiny MDS data with the pre-tokenizer's record of the VQGAN it used (so the run copies it)."""
    data = write_mds(root / "mds")
    yaml_path, ckpt_path = save_vqgan(root / "tokenizer")
    (data / META_FILE).write_text(json.dumps({"vqgan": [str(yaml_path), str(ckpt_path)]}))
    return data


@pytest.mark.slow
def test_a_run_exports_generates_and_evaluates_after_its_base_checkpoint_moved(tmp_path, one_torch_thread):
    base = save_backbone_dir(tmp_path / "chameleon_tiny")  # a Chameleon-layout checkpoint: config.json + weights
    data = pretokenized_data(tmp_path)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--ds_config", "ds_configs/zero3.json", "model.source=chameleon",
         f"model.path={base}", f"data.path={data}", "align.weight=0", "data.max_seq_len=64", "train.max_steps=2",
         "train.micro_batch_size=2", "train.eval_every=0", "train.progress_bar=false", f"output_dir={run}"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assets = read_run_assets(run)
    assert sorted(assets.copied) == ["image_tokenizer/vqgan.ckpt", "image_tokenizer/vqgan.yaml", "model/config.json",
                                     "model/tokenizer.json"]
    assert read_run_data(run).vqgan_checkpoint == str(run / ASSETS_DIR / "image_tokenizer" / "vqgan.ckpt")
    base.rename(tmp_path / "moved")  # the base checkpoint and the tokenizer files move away
    (tmp_path / "tokenizer").rename(tmp_path / "tokenizer_moved")

    assert run_launcher("export_hf.py", [str(run), str(tmp_path / "export"), "--dtype", "fp32"]) == 0
    assert json.loads((tmp_path / "export" / "arra_export.json").read_text())["source"] == "chameleon"
    common = ["progress_bar=false", "samples_per_prompt=1"]
    assert run_launcher("generate.py", [f"model={run}", "--prompt", PROMPTS[0], f"output_dir={tmp_path / 'gen'}", *common]) == 0
    assert run_launcher("generate.py", [f"model={tmp_path / 'export'}", "--prompt", PROMPTS[0],
                                        f"output_dir={tmp_path / 'gen_export'}", *common]) == 0
    # the export carries the run's trained weights, its data record and its copied image tokenizer
    image = (tmp_path / "gen" / "images" / "000000.png").read_bytes()
    assert (tmp_path / "gen_export" / "images" / "000000.png").read_bytes() == image
    assert run_launcher("eval.py", [f"model={run}", f"prompts={data}", "num_prompts=2", "extractors=[thumbnail]",
                                    "clip_model=", f"output_dir={tmp_path / 'eval'}", *common]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["num_samples"] == 2 and report["checkpoint"]["source"] == "chameleon"


def test_large_files_are_recorded_and_a_moved_one_is_named_with_its_key(tmp_path):
    """Files over the copy limit stay where they are: the run records path, size and hash, and a later use fails
    with one line naming the file and the key that points at its new place."""
    base = save_backbone_dir(tmp_path / "base")
    yaml_path, ckpt_path = save_vqgan(tmp_path / "tokenizer")
    model_cfg = ModelConfig(source="chameleon", path=str(base))
    record = RunData(vqgan_config=str(yaml_path), vqgan_checkpoint=str(ckpt_path))
    written = write_run_assets(tmp_path / "run", model_cfg, record, copy_limit=0)
    (tmp_path / "run" / RUN_DATA_FILE).write_text(json.dumps(asdict(written)))
    assert written.vqgan_config == "assets/image_tokenizer/vqgan.yaml"  # every config is copied, whatever its size
    assert written.vqgan_checkpoint == str(ckpt_path)  # the weights are not: recorded
    assets = read_run_assets(tmp_path / "run")
    entry = assets.external_file("vqgan_checkpoint")
    assert entry.size == ckpt_path.stat().st_size and check_external_file(entry) == ckpt_path
    shutil.move(ckpt_path, tmp_path / "vqgan_moved.ckpt")
    with pytest.raises(CheckpointError, match=r"vqgan\.ckpt is missing: .*pass vqgan_checkpoint=<its new path>"):
        check_external_file(entry)
    assert check_external_file(entry, tmp_path / "vqgan_moved.ckpt") == tmp_path / "vqgan_moved.ckpt"
    (tmp_path / "vqgan_moved.ckpt").write_bytes(b"another file")
    with pytest.raises(CheckpointError, match="is not the same file"):
        check_external_file(entry, tmp_path / "vqgan_moved.ckpt")


# ---- a backbone is one module --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_backbone_registered_from_a_test_file_trains_generates_evaluates_and_exports(tmp_path):
    env = subprocess_env(ARRA_DS_PLUGINS=PLUGIN)
    env["PYTHONPATH"] = f"{REPO_ROOT / 'tests'}:{env['PYTHONPATH']}"
    run = tmp_path / "run"

    def launch(*command):
        proc = subprocess.run([*command], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    launch(launcher("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
           "--ds_config", "ds_configs/zero3.json", "model.source=toy", f"output_dir={run}", "demo.num_samples=128",
           "train.micro_batch_size=4", "train.max_steps=4", "train.eval_every=4", "train.progress_bar=false")
    assert "source: toy" in (run / "config.yaml").read_text() and (run / "samples.png").is_file()
    launch(sys.executable, "launch/generate.py", f"model={run}", "--prompt", "a red circle", f"output_dir={tmp_path / 'gen'}",
           "progress_bar=false")
    assert (tmp_path / "gen" / "images" / "000000.png").is_file()
    launch(launcher("torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", "launch/eval.py", f"model={run}",
           "num_prompts=4", "samples_per_prompt=2", f"output_dir={tmp_path / 'eval'}", "progress_bar=false")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["checkpoint"]["source"] == "toy" and report["metrics"]["fid_thumbnail"] is not None
    launch(sys.executable, "launch/export_hf.py", str(run), str(tmp_path / "export"))
    summary = json.loads((tmp_path / "export" / "arra_export.json").read_text())
    assert summary["source"] == "toy" and (tmp_path / "export" / "config.json").is_file()
