"""LoRA under ZeRO-3 (model.trainable=lora), real 2-rank CPU runs on a tiny Chameleon-layout checkpoint: the loss
falls, every frozen weight is bitwise the base checkpoint's, only the adapters, the LM head's image-row delta and
the projector change; a kill -9 resume is exact; an elastic resume runs; the merged export loads in stock
transformers with the trained model's logits, and the adapter alone loads back with peft."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, free_port, launcher, subprocess_env
from gen_helpers import PROMPTS, save_backbone_dir, write_mds
from safetensors.torch import load_file

from arra_ds.checkpoints import CHECKPOINTS_DIR, read_trained_backbone
from arra_ds.model.arra import training_skeleton
from arra_ds.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

MAX_STEPS = 6
FEATURE_DIM = 8


def command(run, base, data, ranks: int = 2, *extra) -> list[str]:
    return [
        launcher("deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), "launch/train.py",
        "--ds_config", "ds_configs/zero3.json", "model.source=chameleon", f"model.path={base}", f"data.path={data}",
        "model.trainable=lora", "model.lora.rank=4", "model.lora.alpha=8", "model.lora.dropout=0.0",
        "model.init_image_head=keep", "align.encoder=demo", "data.max_seq_len=64", f"train.max_steps={MAX_STEPS}",
        "train.save_every=3", "train.keep_last=0", "train.micro_batch_size=2", "train.log_every=1",
        "train.eval_every=0", "train.progress_bar=false", "optim.lr=3e-2", "optim.warmup_steps=0", f"output_dir={run}",
        *extra,
    ]


def run(cmd, **env):
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(**env), capture_output=True, text=True, timeout=900)
    return proc


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = save_backbone_dir(root / "base")
    data = write_mds(root / "mds", feature_dim=FEATURE_DIM, repeat=4)
    proc = run(command(root / "run", base, data))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, base, data


def test_lora_trains_only_the_adapters_the_head_rows_and_the_projector(trained):
    root, base, _ = trained
    rows = metrics(root / "run")
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05, (rows[0], rows[-1])
    weights = read_trained_backbone(root / "run", merge=False)
    state = weights.state_dict
    base_state = load_file(str(base / "model.safetensors"))
    frozen = [k for k in state if "lora_" not in k and not k.endswith(("image_rows_delta", "image_row_ids"))]
    assert len(frozen) == len(base_state) - sum(k.startswith("model.vqmodel.") for k in base_state)
    for key in frozen:  # base_layer weights, embeddings, norms, the head: bitwise the base checkpoint's
        assert torch.equal(state[key], base_state[key.replace(".base_layer.", ".")]), key
    lora_b = [k for k in state if "lora_B" in k]
    assert lora_b and all(state[k].abs().sum() > 0 for k in lora_b)  # peft starts B at zero: they trained
    assert state["lm_head.image_rows_delta"].abs().sum() > 0
    assert sorted(weights.dropped) == ["align_head.fc1.bias", "align_head.fc1.weight", "align_head.fc2.bias",
                                       "align_head.fc2.weight"]


def test_a_kill_during_a_save_resumes_exactly_and_an_elastic_resume_runs(trained, tmp_path):
    root, base, data = trained
    crashed = tmp_path / "crashed"
    proc = run(command(crashed, base, data), **{ckpt.KILL_DURING_SAVE_ENV: "6"})
    assert proc.returncode != 0
    proc = run(command(crashed, base, data, 2, "train.resume=auto"))
    assert proc.returncode == 0 and "at step 3" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    for want, have in zip(metrics(root / "run"), metrics(crashed)):
        for key in ("loss", "loss_ar", "loss_gva", "cos", "grad_norm", "lr"):
            assert have[key] == want[key], (want["step"], key)  # exact: the same bits after the resume

    elastic = tmp_path / "elastic"  # the 2-rank step-3 checkpoint resumed on 1 rank
    (elastic / CHECKPOINTS_DIR).mkdir(parents=True)
    step3 = root / "run" / CHECKPOINTS_DIR / "step_00000003"
    proc = run(command(elastic, base, data, 1, f"train.resume={step3}"))
    assert proc.returncode == 0 and "written by 2" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    resumed = metrics(elastic)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for want, have in zip(metrics(root / "run")[3:], resumed):
        assert have["loss"] == pytest.approx(want["loss"], rel=1e-4), want["step"]


def test_merged_export_loads_in_stock_transformers_and_the_adapter_alone_in_peft(trained, tmp_path):
    from peft import PeftModel
    from transformers import ChameleonForConditionalGeneration

    root, base, _ = trained
    assert run([sys.executable, "launch/export_hf.py", str(root / "run"), str(tmp_path / "merged"), "--dtype",
                "fp32"]).returncode == 0
    assert run([sys.executable, "launch/export_hf.py", str(root / "run"), str(tmp_path / "adapter"), "--dtype", "fp32",
                "--adapter_only"]).returncode == 0

    # the trained model as it trained: the LoRA layers and the head-row delta, in eval mode
    unmerged = read_trained_backbone(root / "run", merge=False)
    model = training_skeleton(unmerged.model_cfg, torch.float32)
    model.load_state_dict(unmerged.state_dict, strict=True, assign=True)
    model.eval()
    vocab = unmerged.model_cfg.backbone.vocab(unmerged.model_cfg)
    ids = torch.tensor([[vocab.bos_id, *[vocab.id(w) for w in PROMPTS[0].split() if w in vocab.token_to_id],
                         vocab.end_of_turn_id, vocab.image_start_id]])

    def logits(m):  # all rows of the head, image rows included (HF's forward masks them)
        with torch.no_grad():
            return m.lm_head(m.model(input_ids=ids).last_hidden_state).float()

    expected = logits(model)
    merged = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-4)
    with_adapter = PeftModel.from_pretrained(ChameleonForConditionalGeneration.from_pretrained(base), tmp_path / "adapter")
    torch.testing.assert_close(logits(with_adapter.eval().base_model.model), expected, rtol=1e-4, atol=1e-4)
