import math

import pytest
import torch

from arra_ds.errors import ConfigError
from arra_ds.train.optim import OptimConfig, lr_at, param_groups, steps_per_epoch


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, 20, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 20, cfg) == pytest.approx(1.0)
    assert lr_at(12, 20, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(20, 20, cfg) == pytest.approx(0.1)
    assert lr_at(500, 20, cfg) == pytest.approx(0.1)


def test_constant_and_linear_schedules():
    constant = OptimConfig(lr=2e-5, warmup_steps=10, schedule="constant")
    assert lr_at(5, 100, constant) == pytest.approx(1.2e-5)
    assert lr_at(99, 100, constant) == pytest.approx(2e-5)
    linear = OptimConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert lr_at(50, 100, linear) == pytest.approx(0.5)


def test_only_matrices_get_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Embedding(5, 3))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {p.shape for p in decay["params"]} == {torch.Size([3, 4]), torch.Size([5, 3])}
    assert all(p.dim() == 1 for p in no_decay["params"])


def test_decay_all_puts_every_trainable_parameter_in_one_decayed_group():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Embedding(5, 3))
    model[2].weight.requires_grad_(False)
    (group,) = param_groups(model, 0.05, "all")
    assert group["weight_decay"] == 0.05
    assert [p.shape for p in group["params"]] == [torch.Size([3, 4]), torch.Size([3]), torch.Size([3]), torch.Size([3])]
    assert param_groups(model, 0.05) == param_groups(model, 0.05, "matrices")  # the library default


def test_warmup_in_epochs_is_resolved_from_the_data_size():
    # the reference: --warmup_epochs 0.01 at 12 x 8 = 96 samples per step on MIMIC-CXR's 221,238 pairs
    epoch_steps = steps_per_epoch(221_238, 96)
    assert epoch_steps == 2304
    cfg = OptimConfig(lr=2e-5, schedule="constant", warmup_epochs=0.01)
    assert cfg.resolved_warmup_steps(epoch_steps) == 23
    assert lr_at(0, 23_040, cfg, epoch_steps) == pytest.approx(2e-5 / 23)
    assert lr_at(21, 23_040, cfg, epoch_steps) < 2e-5 == pytest.approx(lr_at(22, 23_040, cfg, epoch_steps))
    assert OptimConfig(warmup_epochs=1e-6).resolved_warmup_steps(epoch_steps) == 1  # never rounds to no warm-up
    with pytest.raises(ValueError, match="steps per epoch"):
        lr_at(0, 100, cfg)
    with pytest.raises(ConfigError, match="warmup_steps=5 and optim.warmup_epochs=0.01 both set"):
        OptimConfig(warmup_steps=5, warmup_epochs=0.01).validate()
