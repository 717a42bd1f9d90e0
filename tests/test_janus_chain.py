"""The README's Janus-Pro section run as written, in a fresh copy of the checkout, on tiny stand-ins where the real
files would be: pre-tokenise -> train (ZeRO-3) -> generate -> evaluate -> export -> stock transformers draws from
the export. Then, on the same data, training on 2 ranks equals 1 rank, and a resumed run equals the uninterrupted
one (one short multi-rank test).

Stand-ins: a random Janus in the transformers layout drawing 4 x 4 codes (64 px; Janus-Pro: 24 x 24, 384 px) at
``checkpoints/Janus-Pro-1B``, a tiny open_clip at ``models/BiomedCLIP``, random XRV DenseNet weights in
torchxrayvision's cache (under a private HOME), drawn pictures in ``data/``. ARRA_DS_MAX_STEPS shortens training
and changes nothing else.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, free_port, launcher
from gen_helpers import PROMPTS, drawn_image
from janus_helpers import GRID, save_tiny_janus
from PIL import Image
from test_readme import code_commands, fresh_checkout, section, walk_env

from arra_ds.data.features import build_tiny_open_clip_dir
from arra_ds.eval.extractors import build_extractor, xrv_cache_path

pytestmark = pytest.mark.slow

JANUS_SECTION = "## Janus-Pro (1B, 7B): ARRA on its image generator"
SHORT_RUN_STEPS = 2
COMMAND_TIMEOUT_S = 1200
CLIP_BPE_VOCAB_SIZE = 49408  # open_clip's tokenizer, for CLIP-Score with the stand-in encoder
TRAIN_ITEMS, TEST_ITEMS = 24, 4
RUN = "runs/janus_pro_1b_arra"


def janus_commands() -> list[str]:
    return code_commands(section((REPO_ROOT / "README.md").read_text(), JANUS_SECTION))


def write_conversations(root, split: str, count: int, offset: int) -> None:
    folder = root / "data" / split
    folder.mkdir(parents=True)
    items = []
    for i in range(count):
        Image.fromarray(drawn_image(offset + i, 96)).save(folder / f"{i:03d}.png")
        items.append({"conversations": [{"from": "human", "value": PROMPTS[i % len(PROMPTS)]},
                                        {"from": "gpt", "value": "<|image|>"}], "image": [f"{split}/{i:03d}.png"]})
    (root / "data" / f"{split}.json").write_text(json.dumps(items))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("janus_chain")
    checkout = fresh_checkout(root / "checkout")
    save_tiny_janus(checkout / "checkpoints" / "Janus-Pro-1B")
    build_tiny_open_clip_dir(checkout / "models" / "BiomedCLIP", text_context_length=32,
                             text_vocab_size=CLIP_BPE_VOCAB_SIZE)
    write_conversations(checkout, "train", TRAIN_ITEMS, 0)
    write_conversations(checkout, "test", TEST_ITEMS, 100)
    env = walk_env(root / "cache")
    env.update(ARRA_DS_MAX_STEPS=str(SHORT_RUN_STEPS), HOME=str(root / "home"))
    weights = root / "home" / xrv_cache_path().relative_to(Path.home())  # torchxrayvision's cache under that HOME
    weights.parent.mkdir(parents=True)
    torch.save(build_extractor("xrv", "random").network.densenet.state_dict(), weights)
    outputs = {}
    for command in janus_commands():
        proc = subprocess.run(["bash", "-c", command], cwd=checkout, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README command failed ({proc.returncode}): {command}\n{output[-5000:]}"
        outputs[command] = output
    return checkout, env, outputs


def test_the_section_is_pretokenize_train_generate_evaluate_export_load():
    kinds = ["python launch/pretokenize_janus.py", "deepspeed --num_gpus 1 launch/train.py", "python launch/generate.py",
             "torchrun", "python launch/export_hf.py", "python -c"]
    commands = janus_commands()
    assert [next(k for k in kinds if c.startswith(k)) for c in commands] == kinds, commands


def test_readme_chain_runs_as_written(chain):
    checkout, _, outputs = chain
    data = json.loads((checkout / RUN / "arra_data.json").read_text())
    assert (data["code_height"], data["code_width"]) == (GRID, GRID)
    assert data["vqgan_checkpoint"].endswith("janus_vq.pt") and data["vqgan_config"].endswith("janus_vq.yaml")
    metrics = [json.loads(line) for line in (checkout / RUN / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [SHORT_RUN_STEPS] and metrics[0]["loss_gva"] > 0 and metrics[0]["loss_ar"] > 0
    generated = sorted((checkout / "runs" / "generate" / "images").glob("*.png"))
    assert len(generated) == 1 and Image.open(generated[0]).size == (GRID * 16, GRID * 16)
    report = json.loads(next((checkout / RUN / "evaluation").glob("step_*/report.json")).read_text())
    assert {"fid_xrv", "ms_ssim_paired", "clip_score"} <= set(report["metrics"]), report["metrics"]
    export = checkout / "out" / "janus_pro_1b_arra_hf"
    assert json.loads((export / "generation_config.json").read_text())["generation_kwargs"]["boi_token_id"] >= 0
    stock_line = outputs[next(c for c in outputs if c.startswith("python -c"))].strip().splitlines()[-1]
    assert stock_line == f"(1, {GRID * GRID}) (1, {GRID * 16}, {GRID * 16}, 3)"


def test_the_export_holds_the_trained_weights_and_the_base_parts(chain):
    from safetensors.torch import load_file

    from arra_ds.checkpoints import read_trained_backbone

    checkout, _, _ = chain
    trained = read_trained_backbone(checkout / RUN).state_dict
    exported = {}
    for path in (checkout / "out" / "janus_pro_1b_arra_hf").glob("*.safetensors"):
        exported.update(load_file(str(path)))
    base = load_file(str(checkout / "checkpoints" / "Janus-Pro-1B" / "model.safetensors"))
    assert set(exported) == set(base)
    for name, tensor in trained.items():  # the launcher's default --dtype bf16
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name
    changed = [n for n in trained if not torch.equal(trained[n], base[n])]
    assert any(n.startswith("model.generation_head.") for n in changed)  # training moved the generator
    for name in base:
        if name.startswith(("model.vision_model.", "model.vqmodel.", "lm_head.")):
            assert torch.equal(exported[name], base[name].to(torch.bfloat16)), name


def run_training(checkout, env, num_ranks: int, run_dir: str, *overrides: str) -> list[dict]:
    # one rank runs without a launcher (launch/train.py starts its own process group), saving the launcher's start
    start = ([sys.executable] if num_ranks == 1 else
             [launcher("deepspeed"), "--num_gpus", str(num_ranks), "--master_port", str(free_port())])
    cmd = [*start, "launch/train.py", "--ds_config", "ds_configs/zero3.json", "--config", "configs/janus_pro_1b_arra.yaml",
           f"output_dir={run_dir}", "model.janus.prompt_dropout=0", "data.num_workers=0", "train.micro_batch_size=2",
           "train.global_batch_size=4",
           "train.save_every=2", "train.progress_bar=false", "train.log_every=1", *overrides]
    env = {k: v for k, v in env.items() if k != "ARRA_DS_MAX_STEPS"}
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in (checkout / run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_equal_one_rank_and_a_resumed_run_the_uninterrupted_one(chain):
    """Same global batch: 1 rank x 2 accumulation steps, 2 ranks x 1; the 2-rank run stops at step 2 and resumes."""
    checkout, env, _ = chain
    # the 1-rank run also evaluates at its end (the in-training sample grid; it draws from forked RNG streams)
    one = run_training(checkout, env, 1, "runs/one", "train.max_steps=4", "train.eval_every=4", "eval.extractor=",
                       "eval.num_prompts=2")
    assert (checkout / "runs" / "one" / "samples.png").is_file()
    run_training(checkout, env, 2, "runs/two", "train.max_steps=2")
    two = run_training(checkout, env, 2, "runs/two", "train.max_steps=4")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for key in ("loss", "loss_ar", "loss_gva", "loss_z", "cos"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    assert np.isfinite([r["loss"] for r in one]).all() and all(r["grad_norm"] > 0 for r in one)
