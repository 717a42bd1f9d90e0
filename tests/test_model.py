"""The ARRA model end to end on the debug backbone, and loading Hugging Face checkpoint directories."""

import json

import pytest
import torch
import torch.nn.functional as F
from gen_helpers import backbone_skeleton, load_backbone
from transformers import ChameleonForConditionalGeneration

from arra_ds.data.loader import Collator, SampleConverter
from arra_ds.errors import ConfigError
from arra_ds.model.arra import build_model
from arra_ds.model.chameleon import ResidualDropout, add_residual_dropout
from arra_ds.model.config import ModelConfig
from arra_ds.model.debug import debug_chameleon_config
from arra_ds.tokens.layout import IGNORE_INDEX, conversation_tokens, image_to_tokens
from arra_ds.tokens.vocab import REP_TOKEN, build_debug_vocab
from arra_ds.train.run_config import load_run_config


def _sections(cfg):
    return cfg.model, cfg.align


def _cfg(*overrides):
    cfg = load_run_config(None, ["align.feature_dim=12", *overrides])
    return cfg


def _batch(vocab, feature_dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    converter = SampleConverter("feat", max_seq_len=10_000, overlong="error")
    items = []
    for words, side in ((2, 2), (6, 4), (4, 2)):
        codes = torch.randint(0, vocab.num_image_codes, (side, side), generator=g)
        prompt = [vocab.id(w) for w in "a blue ring at the bottom right".split()[:words]]
        tokens, prompt_len = conversation_tokens(prompt, image_to_tokens(codes, vocab), vocab)
        items.append(converter({"tokens": torch.tensor(tokens).numpy(), "prompt_len": prompt_len,
                                "feat": torch.randn(feature_dim, generator=g).numpy()}))
    return Collator(vocab.pad_id, pad_to_multiple_of=8)(items)


def _naive_loss(model, batch, cfg):
    """Everything from HF's full outputs: output_hidden_states, full logits, per-sample loops."""
    out = model.backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True, use_cache=False)
    logits = model.backbone.lm_head(out.last_hidden_state).float()  # [B, T, V], image logits unmasked
    shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
    valid = shift_labels != IGNORE_INDEX
    ce = F.cross_entropy(shift_logits[valid], shift_labels[valid])
    z = torch.logsumexp(shift_logits[valid], -1).pow(2).mean()
    layer_hidden = out.hidden_states[cfg.align.layer]
    image_ids = set(model.vocab.image_token_ids.tolist())
    per_sample = []
    for b in range(batch["input_ids"].shape[0]):
        rows = [t for t in range(batch["labels"].shape[1] - 1) if int(batch["labels"][b, t + 1]) in image_ids]
        proj = model.align_head.project(layer_hidden[b, rows])
        cos = F.cosine_similarity(proj, batch["target_features"][b].expand_as(proj), dim=-1)
        per_sample.append((1 - cos).mean())
    gva = torch.stack(per_sample).mean()
    return ce + cfg.model.z_loss_weight * z + cfg.align.weight * gva, ce, gva, z


@pytest.mark.parametrize("layer", [1, 3, 4])
def test_arra_loss_equals_naive_full_logits_computation(layer):
    torch.manual_seed(0)
    cfg = _cfg(f"align.layer={layer}", "model.z_loss_weight=1e-2", "align.weight=0.7", "model.lm_loss_chunk_size=7")
    model = build_model(cfg.model, cfg.align)
    batch = _batch(model.vocab)
    out = model(batch)
    loss, ce, gva, z = _naive_loss(model, batch, cfg)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss_ar, ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss_gva, gva.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss_z, z.detach(), rtol=1e-5, atol=1e-5)
    assert out.num_aligned == 4 + 16 + 4

    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    ref_grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        if r is None:
            assert g is None or torch.count_nonzero(g) == 0, name
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=name)


def test_captured_layer_is_hf_hidden_states_index():
    torch.manual_seed(0)
    for layer in (1, 2, 4):
        model = build_model(*_sections(_cfg(f"align.layer={layer}")))
        batch = _batch(model.vocab)
        model._capturing = True
        out = model.backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   output_hidden_states=True, use_cache=False)
        model._capturing = False
        torch.testing.assert_close(model._captured, out.hidden_states[layer])


def test_image_logits_are_not_masked():
    torch.manual_seed(0)
    model = build_model(*_sections(_cfg()))
    batch = _batch(model.vocab)
    hf_logits = ChameleonForConditionalGeneration.forward(model.backbone, input_ids=batch["input_ids"]).logits
    assert torch.all(hf_logits[..., model.vocab.image_token_ids] == torch.finfo(hf_logits.dtype).min), "HF masks"
    hidden = model.backbone.model(input_ids=batch["input_ids"]).last_hidden_state
    ours = model.backbone.lm_head(hidden)
    assert torch.isfinite(ours[..., model.vocab.image_token_ids]).all()
    assert model(batch).loss_ar.isfinite()


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(*_sections(_cfg(f"model.activation_checkpointing={str(ckpt).lower()}")))
        model.train()
        out = model(_batch(model.vocab))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_ar_only_model_has_no_projector():
    model = build_model(*_sections(_cfg("align.weight=0")))
    assert model.align_head is None
    out = model(_batch(model.vocab))
    assert out.loss_gva.item() == 0.0 and out.num_aligned == 0


def test_maxpool_projector_has_no_parameters_and_trains_the_backbone():
    model = build_model(*_sections(_cfg("align.projector=maxpool")))
    assert sum(p.numel() for p in model.align_head.parameters()) == 0
    out = model(_batch(model.vocab))
    out.loss.backward()
    assert model.backbone.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_feature_width_mismatch_at_forward_is_explained():
    model = build_model(*_sections(_cfg()))
    batch = _batch(model.vocab, feature_dim=5)
    with pytest.raises(ValueError, match="width 5 but the projector was built for D=12"):
        model(batch)


# ---- Hugging Face checkpoint directories ---------------------------------------------------------


def _save_hf_checkpoint(path, extra_config=None):
    torch.manual_seed(3)
    hf_config = debug_chameleon_config(ModelConfig().debug, "sdpa")
    model = ChameleonForConditionalGeneration(hf_config)
    model.save_pretrained(path)
    if extra_config:
        config = json.loads((path / "config.json").read_text())
        config.update(extra_config)
        (path / "config.json").write_text(json.dumps(config))
    return model


def test_load_chameleon_dir_zeroes_image_rows_and_drops_vqgan(tmp_path):
    saved = _save_hf_checkpoint(tmp_path / "chameleon")
    model, vocab = load_backbone(ModelConfig(source="chameleon", path=str(tmp_path / "chameleon")))
    assert not hasattr(model.model, "vqmodel")
    image_rows = vocab.image_token_ids
    weight = model.lm_head.weight.detach()
    assert torch.count_nonzero(weight[image_rows]) == 0
    text_rows = torch.ones(weight.shape[0], dtype=torch.bool)
    text_rows[image_rows] = False
    torch.testing.assert_close(weight[text_rows], saved.lm_head.weight.detach()[text_rows])
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight, saved.model.layers[1].mlp.up_proj.weight)


def test_load_lumina_dir_with_extra_config_keys_keeps_image_rows(tmp_path):
    extra = {"z_loss_weight": 1e-5, "mask_image_logits": False, "architectures": ["ChameleonXLLMXForConditionalGeneration"]}
    saved = _save_hf_checkpoint(tmp_path / "lumina", extra)
    model, vocab = load_backbone(ModelConfig(source="lumina_mgpt", path=str(tmp_path / "lumina")))
    torch.testing.assert_close(model.lm_head.weight, saved.lm_head.weight)
    assert vocab.image_start_id == saved.config.vocabulary_map["<racm3:break>"]


# ---- residual dropout (Lumina-mGPT's `dropout`, model.residual_dropout) ----------------------------


def _lumina_layer_forward(layer, dropout: torch.nn.Module, swin_norm: bool):
    """Lumina-mGPT's ChameleonDecoderLayer / ChameleonSwinDecoderLayer forward (the model the ARRA
    reference trains), written out: residual + dropout(branch) for attention and MLP."""

    def forward(hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                output_attentions=False, use_cache=False, cache_position=None, **kwargs):
        attn_kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                           output_attentions=output_attentions, use_cache=use_cache, cache_position=cache_position, **kwargs)
        residual = hidden_states
        if swin_norm:
            attn, _ = layer.self_attn(hidden_states=hidden_states, **attn_kwargs)
            hidden_states = residual + dropout(layer.input_layernorm(attn))
            residual = hidden_states
            return (residual + dropout(layer.post_attention_layernorm(layer.mlp(hidden_states))),)
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **attn_kwargs)
        hidden_states = residual + dropout(attn)
        residual = hidden_states
        return (residual + dropout(layer.mlp(layer.post_attention_layernorm(hidden_states))),)

    return forward


def _stock_and_hooked(p: float, swin_norm: bool):
    """(stock HF Chameleon, the same weights with model.residual_dropout=p hooks)."""
    hf_config = debug_chameleon_config(ModelConfig().debug, "sdpa")
    hf_config.swin_norm = swin_norm
    torch.manual_seed(0)
    stock = ChameleonForConditionalGeneration(hf_config)
    hooked = ChameleonForConditionalGeneration(hf_config)
    hooked.load_state_dict(stock.state_dict())
    add_residual_dropout(hooked, p)
    return stock, hooked


def _hidden(model, batch, seed=7):
    torch.manual_seed(seed)
    return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state


@pytest.mark.parametrize("swin_norm", [False, True])
def test_residual_dropout_is_lumina_mgpt_dropout_on_attention_and_mlp_outputs(swin_norm):
    stock, hooked = _stock_and_hooked(0.3, swin_norm)
    batch = _batch(build_debug_vocab())
    for layer in stock.model.layers:
        layer.forward = _lumina_layer_forward(layer, torch.nn.Dropout(0.3), swin_norm)
    stock.train(), hooked.train()
    assert torch.equal(_hidden(hooked, batch), _hidden(stock, batch))  # same masks, same order: bit for bit
    assert not torch.equal(_hidden(hooked, batch, seed=7), _hidden(hooked, batch, seed=8))  # masks are drawn


def test_residual_dropout_zero_is_stock_chameleon_and_eval_turns_it_off():
    batch = _batch(build_debug_vocab())
    stock, untouched = _stock_and_hooked(0.0, swin_norm=False)
    assert all(not m._forward_hooks for m in untouched.modules())  # p=0 registers nothing
    stock.train(), untouched.train()
    assert torch.equal(_hidden(untouched, batch), _hidden(stock, batch))
    _, hooked = _stock_and_hooked(0.3, swin_norm=False)
    assert sum(len(m._forward_hooks) for m in hooked.modules()) == 2 * hooked.config.num_hidden_layers
    hooked.train()
    assert not torch.equal(_hidden(hooked, batch), _hidden(stock, batch))
    hooked.eval(), stock.eval()  # eval / generation: bit for bit the stock model
    assert torch.equal(_hidden(hooked, batch), _hidden(stock, batch))


def test_residual_dropout_comes_from_the_model_config_and_skeletons_have_none():
    model = build_model(*_sections(_cfg("model.residual_dropout=0.05")))
    hooks = [h for m in model.backbone.modules() for h in m._forward_hooks.values() if isinstance(h, ResidualDropout)]
    assert len(hooks) == 2 * model.backbone.config.num_hidden_layers and all(h.p == 0.05 for h in hooks)
    skeleton, _ = backbone_skeleton(_cfg("model.residual_dropout=0.05").model)  # what generation loads into
    assert not any(isinstance(h, ResidualDropout) for m in skeleton.modules() for h in m._forward_hooks.values())
    with pytest.raises(ConfigError, match="model.residual_dropout=1.0 must be in"):
        ModelConfig(residual_dropout=1.0).validate()


def test_residual_dropout_masks_replay_under_activation_checkpointing():
    """Non-reentrant checkpoint restores the RNG state for the recompute: the backward pass uses the
    forward pass's masks, so the gradients equal the un-checkpointed ones exactly as without dropout."""
    grads, losses = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(*_sections(_cfg(f"model.activation_checkpointing={str(ckpt).lower()}", "model.residual_dropout=0.2")))
        model.train()
        batch = _batch(model.vocab)
        torch.manual_seed(11)
        out = model(batch)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.manual_seed(0)
    no_dropout = build_model(*_sections(_cfg()))
    assert not torch.allclose(no_dropout(_batch(no_dropout.vocab)).loss, losses[0])  # the dropout was active
    assert torch.equal(losses[0], losses[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


# ---- projector initialisation (align.projector_init) --------------------------------------------


def test_projector_gets_hf_init_by_default_and_torch_init_by_key():
    torch.manual_seed(0)
    model = build_model(*_sections(_cfg("align.feature_dim=256")))
    std = model.backbone.config.initializer_range
    for linear in (model.align_head.fc1, model.align_head.fc2):
        assert linear.weight.std().item() == pytest.approx(std, rel=0.05)
        assert abs(linear.weight.mean().item()) < 0.1 * std
        assert torch.count_nonzero(linear.bias) == 0
    torch.manual_seed(0)
    model = build_model(*_sections(_cfg("align.feature_dim=256", "align.projector_init=torch")))
    for linear in (model.align_head.fc1, model.align_head.fc2):
        bound = 1 / linear.in_features**0.5  # nn.Linear: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), ..)
        assert linear.weight.abs().max().item() <= bound
        assert linear.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
        assert torch.count_nonzero(linear.bias) == linear.bias.numel()


# ---- <REP> (align.target=rep) -------------------------------------------------------------------


def _rep_batch(vocab, rep_token=True, feature_dim=12):
    g = torch.Generator().manual_seed(0)
    converter = SampleConverter("feat", max_seq_len=10_000, overlong="error")
    items, prompt_lens = [], []
    for words, side in ((2, 2), (6, 4)):
        codes = torch.randint(0, vocab.num_image_codes, (side, side), generator=g)
        prompt = [vocab.id(w) for w in "a blue ring at the bottom right".split()[:words]]
        tokens, prompt_len = conversation_tokens(prompt, image_to_tokens(codes, vocab), vocab, rep_token=rep_token)
        prompt_lens.append(prompt_len)
        items.append(converter({"tokens": torch.tensor(tokens).numpy(), "prompt_len": prompt_len,
                                "feat": torch.randn(feature_dim, generator=g).numpy()}))
    return Collator(vocab.pad_id, pad_to_multiple_of=8)(items), prompt_lens


def test_rep_aligns_the_reserved08795_token_that_opens_the_assistant_turn():
    torch.manual_seed(0)
    model = build_model(*_sections(_cfg("align.target=rep")))
    vocab = model.vocab
    assert model.rep_id == vocab.id("<reserved08795>") == vocab.id(REP_TOKEN)
    batch, prompt_lens = _rep_batch(vocab)
    for row, prompt_len in enumerate(prompt_lens):  # ... <eot> | <REP> <racm3:break> <grid h> ...
        assert batch["input_ids"][row, prompt_len] == model.rep_id
        assert batch["input_ids"][row, prompt_len + 1] == vocab.image_start_id
        assert batch["labels"][row, prompt_len] == model.rep_id  # supervised, as in the reference
    out = model(batch)
    assert out.num_aligned == len(prompt_lens)
    # the reference: adaptor(hidden_states[1][:, position of <REP>]) against the feature
    hidden = model.backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  output_hidden_states=True, use_cache=False).hidden_states[1]
    rows = torch.arange(len(prompt_lens))
    projected = model.align_head.project(hidden[rows, torch.tensor(prompt_lens)])
    expected = (1 - F.cosine_similarity(projected, batch["target_features"], dim=-1)).mean()
    torch.testing.assert_close(out.loss_gva, expected.detach(), rtol=1e-5, atol=1e-6)


def test_rep_on_data_without_the_token_is_an_error_and_image_start_stays_a_key():
    model = build_model(*_sections(_cfg("align.target=rep")))
    batch, _ = _rep_batch(model.vocab, rep_token=False)
    with pytest.raises(ValueError, match="no <reserved08795> token to align.*rep_token=true"):
        model(batch)
    model = build_model(*_sections(_cfg("align.target=rep", "align.rep_token=<racm3:break>")))
    assert model.rep_id == model.vocab.image_start_id
    assert model(batch).num_aligned == 2


def test_zero3_hooks_can_walk_the_model_output(monkeypatch):
    """DeepSpeed's ZeRO-3 hooks wrap every tensor of a module's output (``apply_to_tensors_only``) in
    the autograd function that gathers the module's parameters before its backward. They walk
    tuples, lists, dicts and namedtuples only; anything else got the warning "A module has unknown
    inputs or outputs type (ARRAOutput)" and the root module no pre-backward hook. ARRAOutput is a
    NamedTuple: it is walked, its tensors wrapped, its counters kept, and nothing is warned."""
    from deepspeed.runtime.zero import utils as zero_utils

    cfg = _cfg()
    model = build_model(*_sections(cfg))
    out = model(_batch(model.vocab))
    monkeypatch.setattr(zero_utils, "warned", False)
    warned = []
    monkeypatch.setattr(zero_utils.logger, "warning", warned.append)
    wrapped = []

    def wrap(tensor):
        wrapped.append(tensor)
        return tensor * 1.0

    walked = zero_utils.apply_to_tensors_only(wrap, out, warning_msg_fn=lambda value: f"unknown {type(value)}")
    assert not warned
    assert type(walked) is type(out)
    assert len(wrapped) == 6  # loss, loss_ar, loss_gva, loss_z, cos, cos_first
    assert walked.num_tokens == out.num_tokens and walked.num_aligned == out.num_aligned
    assert torch.equal(walked.loss, out.loss) and walked.loss.requires_grad
