"""The 7B recipes are the paper's setting: every value the README table "Recipes vs the paper and the
reference code" states, resolved from the YAML files with the real 7B shape (a config.json written here,
parameters on the meta device: no weights), and the table itself kept in step with this file."""

import json
import re

import pytest
import torch
from gen_helpers import backbone_skeleton, load_backbone
from PIL import Image
from transformers import ChameleonForConditionalGeneration

from arra_ds import distributed
from arra_ds.config import load_dataclass_config, to_dict
from arra_ds.data.images import ImagePreprocessConfig, VQImagePreprocessor
from arra_ds.data.pretokenize import PretokenizeConfig
from arra_ds.model.arra import ARRAModel
from arra_ds.model.chameleon import ChameleonAdapter, ResidualDropout, add_residual_dropout
from arra_ds.model.config import ModelConfig
from arra_ds.model.debug import debug_chameleon_config
from arra_ds.tokens.layout import ImageGrid
from arra_ds.tokens.vocab import build_debug_vocab
from arra_ds.train.engine import fill_ds_config
from arra_ds.train.optim import param_groups, steps_per_epoch
from arra_ds.train.run_config import load_run_config
from tests.conftest import REPO_ROOT

ARRA = "configs/chameleon7b_arra.yaml"
ADAPT = "configs/lumina7b_arra_adapt.yaml"
PRETOKENIZE = REPO_ROOT / "configs" / "pretokenize_arra512.yaml"
MIMIC_TRAIN_PAIRS = 221_238  # paper sec. 4.1
BIOMEDCLIP_DIM = 512

# facebook/chameleon-7b's config.json (shape only; the vocabulary map is the debug one, same token names)
CHAMELEON_7B = dict(
    model_type="chameleon", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, vocab_size=65536, rms_norm_eps=1e-5, initializer_range=0.02,
    qk_layernorm=True, swin_norm=False, rope_theta=10000.0, hidden_act="silu", attention_bias=False,
)

# What the README table says the recipes resolve to (both recipes), key by key.
COMMON = {
    "model.residual_dropout": 0.05, "model.attention_dropout": 0.0, "model.z_loss_weight": 1e-5,
    "model.activation_checkpointing": True,
    "align.projector_init": "hf", "align.rep_token": "<reserved08795>", "align.target": "hybnext", "align.weight": 1.0,
    "align.layer": 1, "align.loss": "cosine", "align.projector": "mlp", "align.encoder": "biomedclip",
    "optim.decay_params": "all", "optim.weight_decay": 0.05, "optim.lr": 2e-5, "optim.betas": [0.9, 0.95],
    "optim.eps": 1e-8, "optim.grad_clip": 4.0, "optim.schedule": "constant", "optim.warmup_steps": 0,
    "optim.warmup_epochs": 0.01, "optim.master_weights": "fp32",
    "train.precision": "bf16", "train.micro_batch_size": 12, "train.global_batch_size": 96, "train.max_steps": 0, "train.epochs": 10,
    "data.max_seq_len": 4096,
}  # fmt: skip
EXPECTED = {
    ARRA: {**COMMON, "model.source": "chameleon", "model.init_image_head": "zero"},
    ADAPT: {**COMMON, "model.source": "lumina_mgpt", "model.init_image_head": "keep"},
}
EXPECTED_PRETOKENIZE = {"image.crop": "square", "image.target_size": 512}
PAPER_BATCH = ["train.micro_batch_size=6", "train.global_batch_size=24"]


def _checkpoint_dir(tmp_path, shape: dict) -> str:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps({**shape, "vocabulary_map": build_debug_vocab().token_to_id}))
    return str(ckpt)


def _load(recipe, tmp_path, *overrides, model_path=None):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "index.json").write_text("{}")
    model_path = model_path or _checkpoint_dir(tmp_path, CHAMELEON_7B)
    return load_run_config(recipe, [f"model.path={model_path}", f"data.path={data}", *overrides])


def _value(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("recipe", [ARRA, ADAPT])
def test_recipe_resolves_to_the_table(recipe, tmp_path):
    cfg = _load(recipe, tmp_path)
    for key, expected in EXPECTED[recipe].items():
        assert _value(cfg, key) == pytest.approx(expected) if isinstance(expected, float) else _value(cfg, key) == expected, key
    assert cfg.model.backbone.zero_image_head(cfg.model) == (recipe == ARRA)


@pytest.mark.parametrize("recipe", [ARRA, ADAPT])
def test_recipe_builds_the_7b_shape_without_weights(recipe, tmp_path):
    cfg = _load(recipe, tmp_path)
    backbone, vocab = backbone_skeleton(cfg.model)
    assert backbone.config.hidden_size == 4096 and len(backbone.model.layers) == 32
    assert backbone.model.layers[0].mlp.down_proj.weight.is_meta
    add_residual_dropout(backbone, cfg.model.residual_dropout)
    hooks = [h for m in backbone.modules() for h in m._forward_hooks.values() if isinstance(h, ResidualDropout)]
    assert len(hooks) == 2 * 32 and {h.p for h in hooks} == {0.05}  # attention + MLP output of every layer
    cfg.align.feature_dim = BIOMEDCLIP_DIM  # from the data in a real run
    torch.manual_seed(0)
    model = ARRAModel(ChameleonAdapter(backbone, vocab), cfg.align)
    fc1, fc2 = model.align_head.fc1, model.align_head.fc2
    assert fc1.weight.shape == (BIOMEDCLIP_DIM, 4096) and fc2.weight.shape == (BIOMEDCLIP_DIM, BIOMEDCLIP_DIM)
    for linear in (fc1, fc2):  # the reference's HF _init_weights
        assert linear.weight.std().item() == pytest.approx(CHAMELEON_7B["initializer_range"], rel=0.02)
        assert torch.count_nonzero(linear.bias) == 0
    (group,) = param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_params)  # every parameter decays
    assert group["weight_decay"] == 0.05
    assert len(group["params"]) == len(list(model.parameters()))
    assert any(p.dim() == 1 for p in group["params"])  # norms and biases too


@pytest.mark.parametrize("recipe", [ARRA, ADAPT])
def test_recipe_batch_and_schedule_in_both_forms(recipe, tmp_path, monkeypatch):
    cfg = _load(recipe, tmp_path)
    epoch = steps_per_epoch(MIMIC_TRAIN_PAIRS, cfg.train.global_batch_size)
    # the reference: 10 epochs, resolved from the data's size
    assert epoch == 2304 and cfg.train.resolved_max_steps(MIMIC_TRAIN_PAIRS) == 10 * epoch == 23040
    assert cfg.optim.resolved_warmup_steps(epoch) == 23  # 0.01 epoch
    assert cfg.train.grad_accum_steps(8) == 1 and cfg.train.grad_accum_steps(4) == 2  # 12 x 8 = 96 on any count
    monkeypatch.setattr(distributed, "device", lambda: torch.device("cuda"))  # bf16 is refused on the CPU
    ds = fill_ds_config(json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text()), cfg.train, cfg.optim, 8, 4096)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (12, 1, 96)
    assert ds["bf16"] == {"enabled": True}  # fp32 master weights (the README table: precision)
    assert ds["gradient_clipping"] == 4.0 and ds["optimizer"]["params"]["weight_decay"] == 0.05
    paper = _load(recipe, tmp_path, *PAPER_BATCH)  # "batch size of 6" on 4 GPUs
    assert paper.train.grad_accum_steps(4) == 1 and paper.train.micro_batch_size * 4 == 24
    assert paper.train.resolved_max_steps(MIMIC_TRAIN_PAIRS) == 10 * steps_per_epoch(MIMIC_TRAIN_PAIRS, 24) == 92180


def test_recipe_pretokenization_is_the_square_512_centre_crop():
    cfg = load_dataclass_config(PretokenizeConfig, PRETOKENIZE)
    assert {"image.crop": cfg.image.crop, "image.target_size": cfg.image.target_size} == EXPECTED_PRETOKENIZE
    assert [s.name if hasattr(s, "name") else s for s in cfg.encoders] == ["biomedclip"]
    mimic = Image.new("RGB", (2544, 3056), (90, 90, 90))  # a typical MIMIC-CXR size
    pixels = VQImagePreprocessor(cfg.image)(mimic)
    assert pixels.shape == (3, 512, 512)
    assert ImageGrid.for_pixels(512, 512).part_length == 1060  # 32 x 32 codes, as the paper's 1024 tokens
    assert VQImagePreprocessor(ImagePreprocessConfig(target_size=512)).crop_size(mimic.size) == (448, 544)  # var


def _save_debug_checkpoint(path):
    torch.manual_seed(3)
    hf_config = debug_chameleon_config(ModelConfig().debug, "sdpa")
    model = ChameleonForConditionalGeneration(hf_config)
    model.save_pretrained(path)
    return model


def test_adapt_recipe_keeps_the_image_head_and_zeroing_is_a_key(tmp_path):
    saved = _save_debug_checkpoint(tmp_path / "lumina")
    image_rows = build_debug_vocab().image_token_ids
    cfg = _load(ADAPT, tmp_path, model_path=tmp_path / "lumina")
    kept, _ = load_backbone(cfg.model)
    torch.testing.assert_close(kept.lm_head.weight[image_rows], saved.lm_head.weight[image_rows])
    assert torch.count_nonzero(kept.lm_head.weight[image_rows]) > 0
    cfg = _load(ADAPT, tmp_path, "model.init_image_head=zero", model_path=tmp_path / "lumina")  # the released 7B.sh
    zeroed, _ = load_backbone(cfg.model)
    assert torch.count_nonzero(zeroed.lm_head.weight[image_rows]) == 0
    cfg = _load(ARRA, tmp_path, model_path=tmp_path / "lumina")  # Chameleon-7B: untrained rows start at zero
    assert torch.count_nonzero(load_backbone(cfg.model)[0].lm_head.weight[image_rows]) == 0


# ---- the README table and this file agree -------------------------------------------------------


def _table_settings() -> list[str]:
    """The `key=value` settings in the "recipes" column of the README table."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("### Recipes vs the paper and the reference code", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    assert len(rows) >= 8, "the README table is missing"
    settings = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        assert len(cells) == 4, row
        settings += re.findall(r"`([a-z_]+\.[a-z_.]+=[^`]+)`", cells[2])
    return settings


def test_readme_table_states_what_the_recipes_resolve_to(tmp_path):
    settings = _table_settings()
    stated = {s.split("=", 1)[0] for s in settings}
    assert set(COMMON) | {"model.init_image_head"} <= stated, set(COMMON) - stated
    assert set(EXPECTED_PRETOKENIZE) <= stated
    resolved = {recipe: to_dict(_load(recipe, tmp_path)) for recipe in EXPECTED}
    pretokenize = to_dict(load_dataclass_config(PretokenizeConfig, PRETOKENIZE))
    for setting in settings:
        if setting.startswith("image."):
            assert to_dict(load_dataclass_config(PretokenizeConfig, PRETOKENIZE, [setting])) == pretokenize, setting
        else:  # applying the stated value changes nothing in (at least) the recipe it is stated for
            assert any(to_dict(_load(r, tmp_path, setting)) == resolved[r] for r in EXPECTED), setting
