"""The ARRA model end to end on the debug backbone, and loading Hugging Face checkpoint directories."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import ChameleonForConditionalGeneration

from arra_ds.train.run_config import load_run_config
from arra_ds.data.loader import Collator, SampleConverter
from arra_ds.tokens.layout import conversation_tokens, image_to_tokens
from arra_ds.model.arra import build_model
from arra_ds.model.backbone import ModelConfig, debug_chameleon_config, load_backbone
from arra_ds.tokens.layout import IGNORE_INDEX


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
    assert len(wrapped) == 5  # loss, loss_ar, loss_gva, loss_z, cos
    assert walked.num_tokens == out.num_tokens and walked.num_aligned == out.num_aligned
    assert torch.equal(walked.loss, out.loss) and walked.loss.requires_grad
