"""What is trained (arra_ds/model/trainable.py) on the tiny debug Chameleon: LoRA through peft, the LM head's
image-row delta, partial training by pattern, merging, the peft-format adapter, and the errors."""

import json
import re

import pytest
import torch
from gen_helpers import load_backbone
from transformers import ChameleonForConditionalGeneration

from arra_ds.errors import ConfigError
from arra_ds.model.config import ModelConfig
from arra_ds.model.debug import debug_chameleon_config
from arra_ds.model.trainable import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    DEFAULT_LORA_TARGETS,
    HeadRows,
    LMHeadWithImageRows,
    LoraConfig,
    apply_trainable,
    merge_lora,
    write_adapter,
)
from arra_ds.train.optim import param_groups
from arra_ds.train.run_config import load_run_config

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=DEFAULT_LORA_TARGETS)
STEPS = 3


def _backbone(seed: int = 0):
    torch.manual_seed(seed)
    model, vocab = load_backbone(ModelConfig())
    return model.eval(), vocab


def _head(vocab) -> HeadRows:
    return HeadRows("lm_head", vocab.image_token_ids)


def _ids(vocab, seed: int = 1) -> torch.Tensor:
    """[2, 24] token ids, half of them image codes (so the image rows of the head get gradients)."""
    g = torch.Generator().manual_seed(seed)
    image = vocab.image_token_ids[torch.randint(0, len(vocab.image_token_ids), (2, 12), generator=g)]
    text = torch.randint(int(vocab.image_token_ids.max()) + 1, vocab.vocab_size, (2, 12), generator=g)
    return torch.cat([text, image], dim=1)


def _logits(model, ids) -> torch.Tensor:
    """[B, T, V] from the head itself (HF's forward masks the image logits for text generation)."""
    with torch.no_grad():
        return model.lm_head(model.model(input_ids=ids, use_cache=False).last_hidden_state).float()


def _train(model, vocab, steps: int = STEPS) -> list[float]:
    """A few AdamW steps (weight decay on: it must not touch frozen weights) on the LM loss."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.1, "all"), lr=1e-2)
    ids = _ids(vocab)
    losses = []
    model.train()
    for _ in range(steps):
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        loss, _, _ = model.lm_head(hidden.reshape(-1, hidden.shape[-1]), targets=ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _changed(before: dict, model) -> set[str]:
    after = model.state_dict()
    return {name for name, value in after.items() if name not in before or not torch.equal(before[name], value)}


def test_lora_starts_as_the_base_model_and_trains_only_adapters_and_image_rows():
    model, vocab = _backbone()
    ids = _ids(vocab)
    base_logits = _logits(model, ids)
    summary = apply_trainable(model, "lora", LORA, _head(vocab))
    assert torch.equal(_logits(model, ids), base_logits)  # B = 0 and a zero head delta: bitwise the base model

    cfg = ModelConfig().debug
    per_layer = 4 * (cfg.hidden_size + cfg.hidden_size) + 2 * (cfg.hidden_size + cfg.intermediate_size)
    per_layer += cfg.intermediate_size + cfg.hidden_size  # down_proj
    assert summary.lora == LORA.rank * per_layer * cfg.num_hidden_layers
    assert summary.image_head_rows == len(vocab.image_token_ids) * cfg.hidden_size
    assert summary.trainable == summary.lora + summary.image_head_rows
    assert isinstance(model.lm_head, LMHeadWithImageRows)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = _train(model, vocab)
    assert losses[-1] < losses[0]
    changed = _changed(before, model)
    adapter = re.compile(r"(\.lora_[AB]\.default\.weight|lm_head\.image_rows_delta)$")
    assert changed == {name for name in before if adapter.search(name)}  # every frozen weight bitwise unchanged
    assert any(".lora_B." in name for name in changed)


def test_partial_training_by_pattern_changes_exactly_the_named_parameters():
    model, vocab = _backbone()
    summary = apply_trainable(model, ["lm_head", "model.layers.[0-1].mlp.*", "*.post_attention_layernorm.weight"])
    named = re.compile(r"^(lm_head\.weight|model\.layers\.[01]\.mlp\..*|model\.layers\.\d\.post_attention_layernorm\.weight)$")
    expected = {name for name, _ in model.named_parameters() if named.match(name)}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == expected
    assert summary.trainable == sum(p.numel() for name, p in model.named_parameters() if name in expected)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, vocab)
    assert _changed(before, model) == expected


def test_merged_weights_give_the_lora_models_logits_also_in_stock_transformers():
    model, vocab = _backbone()
    apply_trainable(model, "lora", LORA, _head(vocab))
    _train(model, vocab)
    ids = _ids(vocab, seed=7)
    lora_logits = _logits(model.eval(), ids)

    merged = merge_lora(model.state_dict(), LORA)
    plain, _ = _backbone(seed=1)
    assert set(merged) == set(plain.state_dict())  # the base names, nothing of LoRA left
    plain.load_state_dict(merged)
    torch.testing.assert_close(_logits(plain, ids), lora_logits, rtol=1e-5, atol=1e-5)

    stock = ChameleonForConditionalGeneration(debug_chameleon_config(ModelConfig().debug, "sdpa")).eval()
    missing, unexpected = stock.load_state_dict(merged, strict=False)
    assert not unexpected and all(k.startswith("model.vqmodel.") for k in missing)
    torch.testing.assert_close(_logits(stock, ids), lora_logits, rtol=1e-5, atol=1e-5)

    merge_lora(model)  # in place: the module gets its base layers back
    assert set(model.state_dict()) == set(plain.state_dict()) and not hasattr(model, "peft_config")
    torch.testing.assert_close(_logits(model, ids), lora_logits, rtol=1e-5, atol=1e-5)


def test_adapter_alone_loads_with_peft_onto_the_stock_base_model(tmp_path):
    from peft import PeftModel  # reason: the test loads the adapter the way a peft user does

    model, vocab = _backbone()
    stock = ChameleonForConditionalGeneration(debug_chameleon_config(ModelConfig().debug, "sdpa")).eval()
    stock.load_state_dict(model.state_dict(), strict=False)  # the base weights (no vqmodel in ours)
    apply_trainable(model, "lora", LORA, _head(vocab))
    _train(model, vocab)
    ids = _ids(vocab, seed=7)
    lora_logits = _logits(model.eval(), ids)

    out = write_adapter(tmp_path / "adapter", model, LORA, base_model="debug-base")
    assert {p.name for p in out.iterdir()} == {ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE}
    config = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    assert config["r"] == LORA.rank and config["lora_alpha"] == LORA.alpha and config["peft_type"] == "LORA"
    assert config["trainable_token_indices"] == {"lm_head": vocab.image_token_ids.tolist()}

    peft_model = PeftModel.from_pretrained(stock, str(out)).eval()
    inner = peft_model.base_model.model
    assert not torch.equal(_logits(inner, ids), _logits(_backbone()[0], ids))  # the adapter changed something
    torch.testing.assert_close(_logits(inner, ids), lora_logits, rtol=1e-5, atol=1e-5)


def test_bad_pattern_and_bad_lora_target_are_one_error_naming_the_modules():
    model, vocab = _backbone()
    with pytest.raises(ConfigError) as error:
        apply_trainable(model, ["lora", "lm_haed", "model.layers.7.*"], LoraConfig(target_modules=["q_proj", "wq", "q_norm"]),
                        _head(vocab))  # fmt: skip
    message = str(error.value)
    for text in ("'lm_haed', 'model.layers.7.*' match no parameter", "'wq' names no module",
                 "'q_norm' is not a Linear layer", "model.layers.*.self_attn.{k_norm,k_proj,o_proj,q_norm,q_proj,v_proj}",
                 "(* = 0..3)", "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):  # fmt: skip
        assert text in message, message
    assert all(p.requires_grad for p in model.parameters())  # nothing was changed before the error
    assert not any(".lora_" in name for name, _ in model.named_parameters())


def test_model_trainable_keys_in_the_run_config():
    cfg = load_run_config(None, ['model.trainable=[lora, "model.layers.[0-1].*"]', "model.lora.rank=4"])
    assert cfg.model.trainable == ["lora", "model.layers.[0-1].*"] and cfg.model.lora.rank == 4
    assert load_run_config(None, []).model.trainable == "all"
    for overrides, text in (
        (["model.trainable=lm_head"], "e.g. model.trainable=[lm_head]"),
        (["model.trainable=lora", "model.lora.rank=0"], "model.lora.rank=0 must be >= 1"),
        (["model.trainable=[]"], "trains nothing"),
    ):
        with pytest.raises(ConfigError, match=re.escape(text)):
            load_run_config(None, overrides)
