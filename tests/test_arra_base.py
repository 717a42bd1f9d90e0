"""ARRA-Base: LlamaGen's c2i GPT inside the ARRA wrapper (losses against a from-scratch computation, <HYBNEXT>
= every position, activation checkpointing), the recipes and their checks, and a 2-rank ZeRO-3 run."""

import json
import math
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from arra_ds.checkpoints import read_trained_backbone
from arra_ds.data.pretokenize.config import META_FILE
from arra_ds.errors import ConfigError
from arra_ds.generate.loading import load_for_generation, resolve_model
from arra_ds.generate.sampler import Sampler
from arra_ds.generate.sampling import SamplingConfig
from arra_ds.model.arra import AlignConfig, build_model
from arra_ds.model.config import ModelConfig
from arra_ds.model.llamagen.config import LlamaGenConfig
from arra_ds.train.run_config import load_run_config
from tests.conftest import REPO_ROOT, free_port, launcher, subprocess_env
from tests.llamagen_helpers import (
    GRID,
    IMAGE_SIZE,
    NUM_CLASSES,
    TINY_GPT,
    TINY_GPT_OVERRIDES,
    TINY_VQ,
    save_tiny_vq,
    write_c2i_mds,
)

FEATURE_DIM = 6
NO_DROPOUT = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.1)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def arra_base(layer: int = 1, checkpointing: bool = False, z_loss_weight: float = 1e-3, seed: int = 0):
    torch.manual_seed(seed)
    model_cfg = ModelConfig(source="llamagen", llamagen=LlamaGenConfig(**TINY_GPT, **NO_DROPOUT),
                            activation_checkpointing=checkpointing, z_loss_weight=z_loss_weight, fused_kernels="off")
    model_cfg.validate()
    model = build_model(model_cfg, AlignConfig(weight=0.7, layer=layer, feature_dim=FEATURE_DIM, encoder="clip"))
    with torch.no_grad():
        model.backbone.output.weight.normal_(0.0, 0.3)  # upstream starts the head at zero: make the logits non-trivial
    return model


def c2i_batch(batch: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, TINY_GPT["vocab_size"], (batch, GRID * GRID), generator=g)
    return {
        "class_ids": torch.randint(0, NUM_CLASSES, (batch,), generator=g),
        "input_ids": codes,
        "labels": codes.clone(),
        "attention_mask": torch.ones_like(codes),
        "target_features": torch.randn(batch, FEATURE_DIM, generator=g),
    }


def from_scratch_loss(model, batch, layer: int):
    """Upstream's training loss (full logits, F.cross_entropy) plus the GVA term at every position, from the
    plain GPT's own forward and a hook on block `layer`."""
    gpt = model.backbone
    captured = []
    source = gpt.norm if layer == len(gpt.layers) else gpt.layers[layer - 1]
    handle = source.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        hidden = gpt.forward_hidden(batch["class_ids"], batch["input_ids"][:, :-1])  # [B, T, dim]
    finally:
        handle.remove()
    logits = F.linear(hidden, gpt.output.weight).float()  # [B, T, V]
    targets = batch["input_ids"]
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    z = torch.logsumexp(logits, -1).pow(2).mean()
    projected = model.align_head.project(captured[0])  # [B, T, D]
    cos = F.cosine_similarity(projected, batch["target_features"][:, None].expand_as(projected), dim=-1)
    gva = (1 - cos).mean()
    return ce + model.backbone.output.z_loss_weight * z + model.align.weight * gva, ce, gva, z


@pytest.mark.parametrize("layer", [1, 2])
def test_losses_match_a_from_scratch_computation(layer):
    model = arra_base(layer=layer).eval()
    batch = c2i_batch()
    out = model(batch)
    total, ce, gva, z = from_scratch_loss(model, batch, layer)
    assert out.num_tokens == out.num_aligned == 3 * GRID * GRID  # <HYBNEXT>: every position predicts a code
    assert out.loss_ar == pytest.approx(ce.item(), rel=1e-5)
    assert out.loss_z == pytest.approx(z.item(), rel=1e-5)
    assert out.loss_gva == pytest.approx(gva.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-5)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    batch = c2i_batch(seed=1)
    grads = []
    for checkpointing in (False, True):
        model = arra_base(checkpointing=checkpointing).train()
        torch.manual_seed(5)  # the same class dropout draws
        out = model(batch)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name
    assert grads_a["align_head.fc1.weight"].abs().sum() > 0 and grads_a["backbone.layers.0.attention.wqkv.weight"].abs().sum() > 0


def test_zero_head_starts_at_uniform_codes_and_the_flops_facts():
    model_cfg = ModelConfig(source="llamagen", llamagen=LlamaGenConfig(**TINY_GPT))
    model = build_model(model_cfg, AlignConfig(weight=0.0, encoder="clip"))
    out = model(c2i_batch())
    assert out.loss_ar.item() == pytest.approx(math.log(TINY_GPT["vocab_size"]), rel=1e-6)  # upstream: head = 0
    assert model.align_head is None and out.num_aligned == 0 and model.pad_id == 0
    embedding = TINY_GPT["vocab_size"] * TINY_GPT["dim"]
    assert model.non_embedding_parameters() == model.num_parameters() - embedding
    assert model_cfg.shape().hidden_size == TINY_GPT["dim"] and model_cfg.shape().num_layers == TINY_GPT["n_layer"]


def test_bad_batches_name_the_setting():
    model = arra_base()
    batch = c2i_batch()
    short = {**batch, "input_ids": batch["input_ids"][:, :-2], "labels": batch["labels"][:, :-2]}
    with pytest.raises(ValueError, match="block_size"):
        model(short)
    with pytest.raises(ValueError, match="num_classes"):
        model({**batch, "class_ids": torch.tensor([0, NUM_CLASSES, 1])})


RECIPES = ["configs/llamagen_b_arra_base.yaml", "configs/llamagen_l_arra_base.yaml"]


@pytest.mark.parametrize("recipe, size, layers, dim", [(RECIPES[0], "B", 12, 768), (RECIPES[1], "L", 24, 1024)])
def test_recipes_hold_the_paper_settings(recipe, size, layers, dim, tmp_path):
    write_c2i_mds(tmp_path / "mds", 6)
    cfg = load_run_config(REPO_ROOT / recipe, [f"data.path={tmp_path / 'mds'}"])
    assert (cfg.model.source, cfg.model.llamagen.size) == ("llamagen", size)
    assert (cfg.model.shape().num_layers, cfg.model.shape().hidden_size) == (layers, dim)
    assert (cfg.model.llamagen.vocab_size, cfg.model.llamagen.block_size, cfg.model.llamagen.num_classes) == (16384, 256, 1000)
    assert (cfg.train.global_batch_size, cfg.optim.lr, cfg.align.weight, cfg.align.loss) == (32, 1e-4, 1.0, "cosine")
    assert (cfg.align.projector, cfg.align.target, cfg.align.encoder) == ("mlp", "hybnext", "clip_b16")
    baseline = load_run_config(REPO_ROOT / recipe, [f"data.path={tmp_path / 'mds'}", "align.weight=0"])
    assert not baseline.align.enabled


@pytest.mark.parametrize("override, message", [
    ("align.target=rep", "image-start token"),
    ("model.path=somewhere", "model.path"),
    ("model.attn_implementation=eager", "SDPA"),
    ("data.max_seq_len=300", "max_position_embeddings=256"),
    ("model.llamagen.size=M", "model.llamagen.size"),
])
def test_settings_a_class_conditional_run_refuses(override, message, tmp_path):
    write_c2i_mds(tmp_path / "mds", 6)
    with pytest.raises(ConfigError, match=message):
        load_run_config(REPO_ROOT / RECIPES[0], [f"data.path={tmp_path / 'mds'}", override])


@pytest.mark.slow
def test_zero3_two_ranks_train_tiny_arra_base(tmp_path):
    data = write_c2i_mds(tmp_path / "mds", 96)
    save_tiny_vq(tmp_path / "vq.pt")  # the data's own tokenizer, as launch/pretokenize_imagefolder.py records it
    (data / META_FILE).write_text(json.dumps({"vq_ckpt": str(tmp_path / "vq.pt"), "vq": asdict(TINY_VQ)}))
    run = tmp_path / "run"
    cmd = [
        launcher("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
        "--ds_config", "ds_configs/zero3.json", "--config", RECIPES[0], f"output_dir={run}", f"data.path={data}",
        *TINY_GPT_OVERRIDES, f"data.max_seq_len={GRID * GRID}", "align.encoder=clip", "model.activation_checkpointing=true",
        "train.max_steps=16", "train.micro_batch_size=4", "train.global_batch_size=8", "train.save_every=16",
        "train.log_every=1", "train.progress_bar=false", "optim.lr=3e-3", "train.eval_every=16", "eval.num_prompts=4",
        "eval.extractor=",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 17))
    first, last = rows[0], rows[-1]
    assert first["loss_ar"] == pytest.approx(math.log(TINY_GPT["vocab_size"]), abs=1e-3)  # zero head, built under zero.Init
    assert last["loss"] < first["loss"] - 0.5 and last["loss_ar"] < first["loss_ar"] - 0.2, (first, last)
    assert last["cos"] > first["cos"] + 0.2
    shards = sorted(p.name for p in (run / "checkpoints" / "step_00000016").iterdir())
    assert sum("optim_states" in s for s in shards) == 2, shards  # ZeRO-3: one partition per rank

    trained = read_trained_backbone(run)  # the two ranks' partitions, consolidated
    # upstream init through the ranks' gathers: N(0, 0.02) embeddings, not torch's N(0, 1) default
    assert trained.state_dict["tok_embeddings.weight"].std() < 0.1
    assert sorted(trained.dropped) == ["align_head.fc1.bias", "align_head.fc1.weight", "align_head.fc2.bias",
                                       "align_head.fc2.weight"]

    # the run's checkpoint samples through the one generation engine, with the run's own sizes
    ref = resolve_model(run)
    assert ref.description == {"kind": "trainer_checkpoint", "path": str(run / "checkpoints" / "step_00000016"),
                               "step": 16, "source": "llamagen"}
    model = load_for_generation(ref, torch.float32, "cpu")
    assert torch.equal(model.module.tok_embeddings.weight, trained.state_dict["tok_embeddings.weight"])
    codes = Sampler(model.backbone, model.module, model.vocab, SamplingConfig(temperature=0.0), (GRID, GRID)).generate(
        [0, 1], [0, 1]).codes
    assert codes.shape == (2, GRID, GRID)

    # the in-training evaluation drew the first training samples' classes, decoded with the data's VQ (whose
    # architecture the run copied into its assets from the data's record)
    assert Image.open(run / "samples.png").size[0] > 2 * IMAGE_SIZE
    assert [line.split("\t")[1] for line in (run / "samples.txt").read_text().splitlines()] == [
        "class 0", "class 1", "class 2", "class 0"]
    assert (run / "assets" / "image_tokenizer" / "image_tokenizer.yaml").is_file()
    # the one generation launcher needs nothing but the run and the classes
    out = tmp_path / "gen"
    gen = subprocess.run([sys.executable, "launch/generate.py", f"model={run}", "classes=[0,2]", f"output_dir={out}",
                          "progress_bar=false"], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                         timeout=600)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert [Image.open(p).size for p in sorted((out / "images").glob("*.png"))] == [(IMAGE_SIZE, IMAGE_SIZE)] * 2
