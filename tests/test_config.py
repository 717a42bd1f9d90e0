import json

import pytest
import torch
import yaml

from arra_ds import distributed
from arra_ds.config import save_config, to_dict
from arra_ds.data.loader import resolve_feature_dim
from arra_ds.errors import ConfigError
from arra_ds.model.arra import AlignConfig
from arra_ds.train.engine import DSConfigError, fill_ds_config
from arra_ds.train.run_config import RunConfig, load_run_config


def test_default_config_is_the_debug_recipe():
    cfg = load_run_config()
    assert cfg.model.source == "debug"
    assert cfg.data.path == "demo"
    assert cfg.align.layer == 1 and cfg.align.target == "hybnext"


def test_overrides_are_typed():
    cfg = load_run_config(
        None,
        ["train.max_steps=20", "output_dir=runs/x", "align.layer=2", "optim.lr=2e-5", "optim.betas=[0.8,0.9]",
         "model.activation_checkpointing=false", "align.target=rep"],
    )
    assert cfg.train.max_steps == 20 and isinstance(cfg.train.max_steps, int)
    assert cfg.output_dir == "runs/x"
    assert cfg.align.layer == 2
    assert cfg.optim.lr == pytest.approx(2e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.model.activation_checkpointing is False
    assert cfg.align.target == "rep"


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError) as e:
        load_run_config(None, ["align.layr=3"])
    msg = str(e.value)
    assert "align.layr" in msg and "align.layer" in msg and "Valid keys" in msg


def test_unknown_section_lists_sections():
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'.*optim"):
        load_run_config(None, ["optimizer.lr=1"])


def test_invalid_choice_lists_choices():
    with pytest.raises(ConfigError, match=r"align.target='middle'.*\['hybnext', 'rep', 'slice'\]"):
        load_run_config(None, ["align.target=middle"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train.max_steps='many' must be an integer"):
        load_run_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_run_config(None, ["train.max_steps"])


def test_layer_out_of_range_names_the_valid_range():
    with pytest.raises(ConfigError, match=r"align.layer=9 is out of range.*4 decoder layers.*1..4"):
        load_run_config(None, ["align.layer=9"])
    # AR-only runs do not care about the layer
    load_run_config(None, ["align.layer=9", "align.weight=0"])


def test_hf_model_needs_a_local_dir(tmp_path):
    with pytest.raises(ConfigError, match="needs model.path"):
        load_run_config(None, ["model.source=chameleon"])
    with pytest.raises(ConfigError, match="no config.json"):
        load_run_config(None, ["model.source=chameleon", f"model.path={tmp_path}"])


def test_global_batch_must_divide():
    cfg = load_run_config(None, ["train.micro_batch_size=4", "train.global_batch_size=12"])
    assert cfg.train.grad_accum_steps(1) == 3
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch_size"):
        cfg.train.grad_accum_steps(2)


def test_feature_width_mismatch_is_explained():
    align = AlignConfig(encoder="clip", feature_dim=768)
    with pytest.raises(ConfigError, match="align.feature_dim=768 but the data column feat_clip holds 512-d"):
        resolve_feature_dim(align, 512)
    assert resolve_feature_dim(AlignConfig(), 512) == 512


def test_resolved_config_round_trips(tmp_path):
    cfg = load_run_config(None, ["train.max_steps=7", "align.loss=mse"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    again = load_run_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load(path.read_text())["train"]["max_steps"] == 7


@pytest.mark.parametrize("recipe", ["configs/chameleon7b_arra.yaml", "configs/lumina7b_arra_adapt.yaml"])
def test_paper_recipes_parse_and_carry_paper_settings(recipe, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"num_hidden_layers": 32, "max_position_embeddings": 4096, "hidden_size": 4096}))
    data = tmp_path / "data"
    data.mkdir()
    (data / "index.json").write_text("{}")
    cfg = load_run_config(recipe, [f"model.path={ckpt}", f"data.path={data}"])
    assert cfg.optim.lr == pytest.approx(2e-5)
    assert cfg.optim.weight_decay == pytest.approx(0.05)
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.model.z_loss_weight == pytest.approx(1e-5)
    assert cfg.align.weight == 1.0 and cfg.align.layer == 1 and cfg.align.target == "hybnext"
    assert cfg.data.max_seq_len == 4096
    assert cfg.model.activation_checkpointing is True
    assert cfg.optim.grad_clip > 0
    assert cfg.model.backbone.zero_image_head(cfg.model) == (cfg.model.source == "chameleon")


def _ds(**zero):
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", **zero},
    }


def test_ds_config_auto_fields_are_filled_from_the_run_config():
    cfg = load_run_config(None, ["train.micro_batch_size=4", "train.global_batch_size=16", "optim.lr=1e-4", "optim.grad_clip=4"])
    ds = fill_ds_config(_ds(), cfg.train, cfg.optim, world_size=2, hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16
    assert ds["gradient_clipping"] == 4.0
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(1e-4)
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["bf16"]["enabled"] is False  # CPU
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64


def test_ds_config_that_contradicts_the_run_config_is_refused():
    cfg = load_run_config(None, ["train.micro_batch_size=4"])
    ds = _ds()
    ds["train_micro_batch_size_per_gpu"] = 8
    with pytest.raises(DSConfigError, match="train_micro_batch_size_per_gpu=8 contradicts.*train.micro_batch_size=4"):
        fill_ds_config(ds, cfg.train, cfg.optim, world_size=1, hidden_size=64)
    ds = _ds()
    ds["scheduler"] = {"type": "WarmupLR"}
    with pytest.raises(DSConfigError, match="remove 'scheduler'"):
        fill_ds_config(ds, cfg.train, cfg.optim, world_size=1, hidden_size=64)
    ds = _ds(stage3_max_live_parameters="auto")
    with pytest.raises(DSConfigError, match="stage3_max_live_parameters"):
        fill_ds_config(ds, cfg.train, cfg.optim, world_size=1, hidden_size=64)


def test_shipped_ds_configs_fill_cleanly():
    cfg = load_run_config()
    for name in ("zero3", "zero2", "zero3_offload"):
        ds = json.loads(open(f"ds_configs/{name}.json").read())
        filled = fill_ds_config(ds, cfg.train, cfg.optim, world_size=1, hidden_size=64)
        assert "auto" not in json.dumps(filled)


def test_bare_run_config_asks_for_data():
    with pytest.raises(ConfigError, match="data.path is not set.*data.path=demo"):
        RunConfig().validate()
    cfg = RunConfig()
    cfg.data.path = "demo"
    cfg.align.encoder = "demo"
    cfg.validate()


def test_bf16_master_weights_key_sets_deepspeeds_bf16_master_and_optimizer_states(monkeypatch):
    monkeypatch.setattr(distributed, "device", lambda: torch.device("cuda"))  # bf16 is refused on the CPU
    cfg = load_run_config(None, ["train.precision=bf16"])
    default = fill_ds_config(_ds(), cfg.train, cfg.optim, world_size=1, hidden_size=64)["bf16"]
    assert default == {"enabled": True}  # fp32 master weights and AdamW states: DeepSpeed's bf16 default
    cfg = load_run_config(None, ["train.precision=bf16", "optim.master_weights=bf16"])
    bf16 = fill_ds_config(_ds(), cfg.train, cfg.optim, world_size=1, hidden_size=64)["bf16"]
    assert bf16 == {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    ds = _ds()
    ds["bf16"]["bf16_optimizer_states"] = False
    with pytest.raises(DSConfigError, match="bf16_optimizer_states=False contradicts.*optim.master_weights"):
        fill_ds_config(ds, cfg.train, cfg.optim, world_size=1, hidden_size=64)
    cfg = load_run_config(None, ["train.precision=fp32", "optim.master_weights=bf16"])
    with pytest.raises(DSConfigError, match="needs train.precision=bf16"):
        fill_ds_config(_ds(), cfg.train, cfg.optim, world_size=1, hidden_size=64)
