"""Alignment controls: the lambda schedule, the projector skipped once lambda is 0 for good, ``cos_first``,
and spatial (patch) targets on the code grid (text-to-image and class-to-image sequences)."""

import json
import math
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arra_ds.data.loader import Collator, SampleConverter
from arra_ds.errors import ConfigError
from arra_ds.model.arra import AlignConfig, build_model, resample_patch_grid
from arra_ds.model.config import ModelConfig
from arra_ds.model.llamagen.config import LlamaGenConfig
from arra_ds.tokens.layout import IGNORE_INDEX, conversation_tokens, image_to_tokens
from arra_ds.train.run_config import load_run_config
from tests.conftest import REPO_ROOT, free_port, launcher, subprocess_env
from tests.llamagen_helpers import GRID, NUM_CLASSES, TINY_GPT

FEATURE_DIM = 12
PATCH_SIDE = 3  # the encoder's patch grid in these tests: 3 x 3, resampled to every code grid
CODE_GRIDS = ((2, 2), (4, 4), (2, 4))  # (h, w) of the three samples of a batch


# ------------------------------------------------------------------------------------------------
# lambda schedule
# ------------------------------------------------------------------------------------------------


def reference_lambda(weight, schedule, warmup, stop, max_steps, step):
    """The documented formula, written out independently."""
    if stop and step >= stop:
        return 0.0
    if step < warmup:
        return weight * (step + 1) / warmup
    if schedule == "constant":
        return weight
    done = (step - warmup) / (max_steps - warmup)
    return weight * (1 - done) if schedule == "linear" else weight * (1 + math.cos(math.pi * done)) / 2


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup, stop", [(0, 0), (3, 0), (3, 7), (0, 5), (0, 12)])
def test_lambda_follows_the_formula_at_every_step(schedule, warmup, stop):
    max_steps = 10
    cfg = AlignConfig(weight=0.8, schedule=schedule, warmup_steps=warmup, stop_step=stop)
    cfg.validate()
    values = [cfg.align_weight_at(step, max_steps) for step in range(max_steps)]
    assert values == pytest.approx([reference_lambda(0.8, schedule, warmup, stop, max_steps, s) for s in range(max_steps)])
    end = stop if 0 < stop < max_steps else max_steps  # stop_step=12 lies after the run: never reached
    assert cfg.alignment_ends_at(max_steps) == end
    assert [cfg.alignment_ended(step, max_steps) for step in range(max_steps)] == [step >= end for step in range(max_steps)]
    assert all(value > 0 for value in values[:end])  # "0 for good" starts exactly where the steps say
    if warmup:
        assert values[warmup - 1] == pytest.approx(0.8)  # the ramp reaches align.weight on its last step


def test_ar_only_has_no_alignment_at_any_step():
    cfg = AlignConfig(weight=0.0, schedule="cosine", warmup_steps=2)
    assert cfg.alignment_ends_at(10) == 0 and cfg.alignment_ended(0, 10)
    assert {cfg.align_weight_at(step, 10) for step in range(10)} == {0.0}


@pytest.mark.parametrize("override, message", [
    ("align.schedule=step", r"align.schedule='step' is not a valid choice; use one of \['constant', 'linear', 'cosine'\]"),
    ("align.warmup_steps=-1", "must be >= 0"),
    ("align.stop_step=-2", "must be >= 0"),
    ("align.feature=dense", r"align.feature='dense' is not a valid choice; use one of \['global', 'patch'\]"),
    ("align.patch_offset=2", "align.patch_offset=2 must be 1"),
])
def test_schedule_and_feature_keys_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [override])


def test_patch_targets_need_code_positions():
    with pytest.raises(ConfigError, match="align.feature=patch .* align.target=rep has no code positions"):
        load_run_config(None, ["align.feature=patch", "align.target=rep", "align.rep_token=<racm3:break>"])


# ------------------------------------------------------------------------------------------------
# a debug-backbone batch with global and patch targets
# ------------------------------------------------------------------------------------------------


TINY_DEBUG = ["model.debug.hidden_size=32", "model.debug.num_hidden_layers=2", "model.debug.num_attention_heads=2",
              "model.debug.intermediate_size=64"]  # fmt: skip


def debug_model(*overrides):
    cfg = load_run_config(None, [f"align.feature_dim={FEATURE_DIM}", "align.weight=0.7", *TINY_DEBUG, *overrides])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.align), cfg


def t2i_batch(vocab, seed=0):
    """Three text-to-image samples with code grids CODE_GRIDS, their 3 x 3 patch features through the real
    loader (converter + collator), and a global feature each."""
    g = torch.Generator().manual_seed(seed)
    converter = SampleConverter("patch_enc", max_seq_len=10_000, overlong="error")
    items = []
    for words, (h, w) in zip((2, 6, 4), CODE_GRIDS):
        codes = torch.randint(0, vocab.num_image_codes, (h, w), generator=g)
        prompt = [vocab.id(word) for word in "a blue ring at the bottom right".split()[:words]]
        tokens, prompt_len = conversation_tokens(prompt, image_to_tokens(codes, vocab), vocab)
        patches = torch.randn(PATCH_SIDE * PATCH_SIDE, FEATURE_DIM, generator=g).half().numpy()
        items.append(converter({"tokens": np.asarray(tokens, dtype=np.int32), "prompt_len": prompt_len, "patch_enc": patches}))
    batch = Collator(vocab.pad_id, pad_to_multiple_of=8)(items)
    batch.pop("meta")
    batch["target_features"] = torch.randn(len(items), FEATURE_DIM, generator=g)
    return batch


# ------------------------------------------------------------------------------------------------
# the effective lambda per forward, and no projector once lambda is 0 for good
# ------------------------------------------------------------------------------------------------


def test_set_align_step_scales_the_term_then_skips_the_projector():
    model, _ = debug_model("align.schedule=linear", "align.warmup_steps=2", "align.stop_step=3")
    batch = t2i_batch(model.vocab)
    head_calls, capturing = [], []
    model.align_head.register_forward_hook(lambda module, args, out: head_calls.append(1))
    model.adapter.layer_output(model.align.layer).register_forward_hook(lambda m, a, o: capturing.append(model._capturing))

    assert model.set_align_step(0, 10) == pytest.approx(0.35)  # warm-up: 0.7 * 1 / 2
    ramp = model(batch)
    full_weight = model.set_align_step(1, 10)
    full = model(batch)
    assert full_weight == pytest.approx(0.7) and full.num_aligned == ramp.num_aligned > 0
    assert len(head_calls) == 2 and capturing == [True, True]
    torch.testing.assert_close(ramp.loss_gva, full.loss_gva)
    lm_only = full.loss.detach() - 0.7 * full.loss_gva
    torch.testing.assert_close(ramp.loss.detach(), lm_only + 0.35 * ramp.loss_gva)

    assert model.set_align_step(3, 10) == 0.0
    after = model(batch)
    assert len(head_calls) == 2, "the projector ran after lambda reached 0 for good"
    assert capturing[-1] is False and model._captured is None  # the layer hook captured nothing
    assert after.num_aligned == 0 and after.loss_gva.item() == after.cos.item() == after.cos_first.item() == 0.0
    torch.testing.assert_close(after.loss, lm_only)
    assert all(not p.requires_grad for p in model.align_head.parameters())
    after.loss.backward()
    assert all(p.grad is None for p in model.align_head.parameters())  # nothing in the graph touches them
    assert model.backbone.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0

    assert model.set_align_step(2, 10) > 0  # the step decides both ways (e.g. a resume with a later stop_step)
    assert all(p.requires_grad for p in model.align_head.parameters())


# ------------------------------------------------------------------------------------------------
# cos_first: the first aligned position has seen only the condition
# ------------------------------------------------------------------------------------------------

COS_FIRST_WORDS = "a red blue green square circle triangle at the top left right bottom center large small".split()


def cos_first_batch(vocab, case, num_samples, g):
    """``prompt``: eight prompts, the target a function of the prompt, random pictures. ``picture``: one
    prompt for every image, uniform 4 x 4 pictures of one of eight codes, the target a function of that code."""
    basis = torch.randn(8, 8, generator=torch.Generator().manual_seed(99))
    items, targets = [], []
    for i in range(num_samples):
        colour = int(torch.randint(0, 8, (), generator=g))
        if case == "prompt":
            words = [COS_FIRST_WORDS[i % 8], COS_FIRST_WORDS[(3 * (i % 8) + 1) % len(COS_FIRST_WORDS)]]
            codes, target = torch.randint(0, 16, (4, 4), generator=g), basis[i % 8]
        else:
            words, codes, target = ["a", "square"], torch.full((4, 4), colour), basis[colour]
        tokens, prompt_len = conversation_tokens([vocab.id(w) for w in words], image_to_tokens(codes, vocab), vocab)
        labels = torch.tensor(tokens)
        labels[:prompt_len] = IGNORE_INDEX
        items.append({"input_ids": torch.tensor(tokens), "labels": labels})
        targets.append(target)
    batch = Collator(vocab.pad_id)(items)
    batch.pop("meta")
    batch["target_features"] = torch.stack(targets)
    return batch


@pytest.mark.parametrize("case", ["prompt", "picture"])
def test_cos_first_tells_a_target_predictable_from_the_prompt(case, one_torch_thread):
    """A tiny model trained a few steps. When the target is a function of the prompt, the first aligned
    position predicts it as well as the others (cos_first ~ cos): the loss says nothing about the picture.
    When it is a function of the picture, only positions that have read codes can: cos_first << cos."""
    torch.manual_seed(0)
    cfg = load_run_config(None, ["align.feature_dim=8", *TINY_DEBUG, "model.debug.num_image_codes=16", "demo.num_image_codes=16"])
    model = build_model(cfg.model, cfg.align)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        out = model(cos_first_batch(model.vocab, case, 8, g))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = model(cos_first_batch(model.vocab, case, 64, torch.Generator().manual_seed(123)))
    cos, cos_first = out.cos.item(), out.cos_first.item()
    assert cos > 0.9, (cos, cos_first)  # the alignment target is learnt in both cases
    if case == "prompt":
        assert cos_first > 0.9 and abs(cos - cos_first) < 0.05, (cos, cos_first)
    else:
        assert cos - cos_first > 0.25, (cos, cos_first)


# ------------------------------------------------------------------------------------------------
# patch targets
# ------------------------------------------------------------------------------------------------


def test_resampling_keeps_equal_grids_averages_coarser_and_interpolates_finer():
    ramp = torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 4, 2).reshape(1, 16, 2)  # value = patch row
    assert torch.equal(resample_patch_grid(ramp, (4, 4), (4, 4)), ramp)
    coarse = resample_patch_grid(ramp, (4, 4), (2, 2)).view(2, 2, 2)
    assert coarse[:, 0, 0].tolist() == [0.5, 2.5]  # each code: the mean of the 2 x 2 patches it covers
    small = torch.arange(2.0).view(1, 2, 1, 1).expand(1, 2, 2, 2).reshape(1, 4, 2)
    fine = resample_patch_grid(small, (2, 2), (4, 4)).view(4, 4, 2)
    assert fine[:, 0, 0].tolist() == [0.0, 0.25, 0.75, 1.0]  # code centres at -0.25, 0.25, 0.75, 1.25 patch rows
    wide = resample_patch_grid(torch.randn(2, 9, 5), (3, 3), (2, 4))
    assert wide.shape == (2, 8, 5)


def naive_patch_loss(model, batch, offset):
    """From HF's hidden states with per-sample loops: the k-th code-predicting position of a sample against
    the patch feature, resampled to that sample's code grid, of code k - offset (raster order)."""
    layer = model.align.layer
    out = model.backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True, use_cache=False)
    layer_hidden = out.hidden_states[layer]
    image_ids = set(model.vocab.image_token_ids.tolist())
    losses, firsts, num_rows = [], [], 0
    for b, (h, w) in enumerate(CODE_GRIDS):
        grid = batch["target_patches"][b].view(PATCH_SIDE, PATCH_SIDE, FEATURE_DIM).permute(2, 0, 1)[None]
        if h <= PATCH_SIDE and w <= PATCH_SIDE:  # the documented rule: area when coarser, else bilinear
            resampled = F.interpolate(grid, size=(h, w), mode="area")[0]  # [D, h, w]
        else:
            resampled = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        positions = [t for t in range(batch["labels"].shape[1] - 1) if int(batch["labels"][b, t + 1]) in image_ids]
        assert len(positions) == h * w
        cosines = []
        for k, t in enumerate(positions):
            if k - offset < 0:
                continue
            row, col = divmod(k - offset, w)
            projected = model.align_head.project(layer_hidden[b, t])
            cosines.append(F.cosine_similarity(projected, resampled[:, row, col], dim=0))
        losses.append(1 - torch.stack(cosines).mean())
        firsts.append(cosines[0])
        num_rows += len(cosines)
    return torch.stack(losses).mean(), torch.stack(firsts).mean(), num_rows


@pytest.mark.parametrize("offset", [0, 1])
def test_patch_loss_equals_a_naive_computation_with_gradients(offset):
    model, _ = debug_model("align.feature=patch", f"align.patch_offset={offset}", "model.z_loss_weight=1e-2")
    batch = t2i_batch(model.vocab)
    assert batch["target_patches"].shape == (3, PATCH_SIDE * PATCH_SIDE, FEATURE_DIM)
    assert batch["patch_grid"].tolist() == [PATCH_SIDE, PATCH_SIDE]
    params = list(model.parameters())
    out = model(batch)
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)

    model.align_active = False  # the model's LM loss alone (checked against full logits in test_model.py)
    lm = model(batch).loss
    model.align_active = True
    gva, first, num_rows = naive_patch_loss(model, batch, offset)
    assert out.num_aligned == num_rows == sum(h * w for h, w in CODE_GRIDS) - offset * len(CODE_GRIDS)
    torch.testing.assert_close(out.loss_gva, gva.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.cos_first, first.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, (lm + 0.7 * gva).detach(), rtol=1e-5, atol=1e-6)
    ref_grads = torch.autograd.grad(lm + 0.7 * gva, params, allow_unused=True)
    for (name, _), grad, ref in zip(model.named_parameters(), grads, ref_grads):
        if ref is None:
            assert grad is None or torch.count_nonzero(grad) == 0, name
        else:
            torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.count_nonzero(grads[[n for n, _ in model.named_parameters()].index("align_head.fc1.weight")]) > 0


def test_patch_targets_through_the_fused_kernel_match_the_torch_path():
    """The fused alignment kernel takes one target row per aligned row (Triton's interpreter on CPU)."""
    model, _ = debug_model("align.feature=patch")
    batch = t2i_batch(model.vocab, seed=3)
    results = {}
    for mode in ("on", "off"):
        model.align_head.fused_kernels = mode
        model.zero_grad()
        out = model(batch)
        out.loss.backward()
        results[mode] = (out, [p.grad.clone() for p in model.align_head.parameters()])
    (fused, fused_grads), (plain, plain_grads) = results["on"], results["off"]
    for key in ("loss", "loss_gva", "cos", "cos_first"):
        torch.testing.assert_close(getattr(fused, key), getattr(plain, key), rtol=1e-5, atol=1e-6, msg=key)
    for grad, ref in zip(fused_grads, plain_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("offset", [0, 1])
def test_class_to_image_sequences_align_on_their_square_code_grid(offset, one_torch_thread):
    """LlamaGen: the sequence holds only the GRID x GRID codes; position k predicts code k."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(source="llamagen", fused_kernels="off", llamagen=LlamaGenConfig(
        **TINY_GPT, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.1))
    model = build_model(model_cfg, AlignConfig(weight=0.5, feature="patch", patch_offset=offset, feature_dim=6, encoder="clip"))
    model.eval()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, TINY_GPT["vocab_size"], (2, GRID * GRID), generator=g)
    patches = torch.randn(2, 4, 6, generator=g)  # a 2 x 2 patch grid, upsampled to the 4 x 4 codes
    batch = {"class_ids": torch.randint(0, NUM_CLASSES, (2,), generator=g), "input_ids": codes, "labels": codes.clone(),
             "attention_mask": torch.ones_like(codes), "target_patches": patches, "patch_grid": torch.tensor([2, 2])}
    out = model(batch)
    assert out.num_aligned == 2 * (GRID * GRID - offset)

    captured = []
    handle = model.backbone.layers[0].register_forward_hook(lambda m, a, o: captured.append(o))
    model.backbone.forward_hidden(batch["class_ids"], codes[:, :-1])
    handle.remove()
    projected = model.align_head.project(captured[0])  # [B, T, D]: position k predicts code k
    grid = patches.view(2, 2, 2, 6).permute(0, 3, 1, 2)
    targets = F.interpolate(grid, size=(GRID, GRID), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(2, -1, 6)
    cos = F.cosine_similarity(projected[:, offset:], targets[:, : GRID * GRID - offset], dim=-1)  # [B, T - offset]
    torch.testing.assert_close(out.loss_gva, (1 - cos.mean(dim=1)).mean().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.cos_first, cos[:, 0].mean().detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# align.stop_step under DeepSpeed ZeRO-3 (2 ranks)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_zero3_stop_step_skips_the_projector_and_changes_nothing_else(tmp_path):
    """tests/zero3_align_probe.py: skipping the projector from align.stop_step on (every rank decides alike)
    gives exactly the run whose projector keeps running with lambda = 0: the same losses, the same clipped
    grad norms, the same projector. Without the freeze in set_align_step, ZeRO-3 would keep applying the
    projector's last gradient (its grad norm stays ~30 here, clipping shrinks the backbone's update)."""
    result_file = tmp_path / "probe.json"
    cmd = [launcher("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "tests/zero3_align_probe.py",
           str(result_file)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    skip, reference = result["skip"], result["zero_weight"]
    assert skip["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert skip["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-6)
    assert skip["projector"] == pytest.approx(reference["projector"], rel=1e-6, abs=1e-9)
    assert skip["grad_norm"][2] < 0.5 * skip["grad_norm"][1]  # the projector's large gradient is gone from step 2
