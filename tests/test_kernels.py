"""Triton kernels (kernels/) against their pure-torch references, and the ARRA model's fused path.

How the kernels run here: each test takes the ``device`` fixture.
- ``cpu``: Triton's CPU interpreter. tests/conftest.py sets TRITON_INTERPRET=1 when there is no
  CUDA, before any test module is imported: Triton decides compile-vs-interpret when
  ``triton.language`` (and each kernel module) is first imported, and torch imports triton.language
  lazily, so the variable has to be in place before anything imports torch's submodules or arra_ds.
  By hand: ``TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py``.
- ``cuda`` (``gpu`` marker, skipped without CUDA): the same tests on compiled kernels. On a CUDA
  machine the ``cpu`` variant is skipped unless the run sets TRITON_INTERPRET=1 itself (then both
  variants interpret), because Triton can only be imported one way per process.

Tolerances: kernel vs reference, max |a - b| <= rel * max |b| per tensor, with rel = 1e-5 (fp32)
and 3e-2 (bf16, kernel inputs in bf16, reference in fp32 on the same bf16-rounded values).
Losses: |a - b| <= rel * max(1, |b|) with rel = 1e-5 (fp32) and 1e-2 (bf16).
"""

from unittest import mock

import pytest
import torch

from arra_ds.data.loader import Collator
from arra_ds.errors import ConfigError
from arra_ds.kernels import ALIGN_MAX_FEATURE_DIM, check_launchable, triton_interpreter_enabled, use_fused_kernel
from arra_ds.kernels.lm_loss_torch import chunked_lm_loss, reference_lm_loss
from arra_ds.model.arra import AlignConfig, AlignHead, build_model
from arra_ds.model.config import ModelConfig
from arra_ds.model.debug import DebugModelConfig
from arra_ds.model.interface import LMHeadWithLoss
from arra_ds.tokens.layout import IGNORE_INDEX, conversation_tokens, image_to_tokens
from arra_ds.tokens.vocab import build_debug_tokenizer
from arra_ds.train.run_config import RunConfig, load_run_config

GRAD_REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
LOSS_REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cpu" and not triton_interpreter_enabled():
        pytest.skip("CUDA machine: Triton compiles for the GPU; run with TRITON_INTERPRET=1 for the CPU interpreter")
    return torch.device(request.param)


def assert_close_rel(actual, expected, rel, what):
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale + 1e-30, f"{what}: max abs error {err:.3g} > {rel} * max |ref| ({scale:.3g})"


def assert_loss_close(actual, expected, rel, what):
    err = abs(actual.item() - expected.item())
    assert err <= rel * max(1.0, abs(expected.item())), f"{what}: {actual.item()} vs reference {expected.item()}"


def leaf(x, dtype, device):
    return x.to(device=device, dtype=dtype).requires_grad_()


# ------------------------------------------------------------------------------------------------
# alignment projector + loss
# ------------------------------------------------------------------------------------------------


def _align_inputs(n, h, d, b, dtype, device, empty_samples=(), seed=0, per_row=False):
    """Random projector and rows; samples in ``empty_samples`` get no rows. ``per_row``: one target row
    per row (align.feature=patch), target [n + 3, d] with a shuffled ``target_idx``, rows of a sample
    interleaved with other samples' rows."""
    g = torch.Generator().manual_seed(seed)
    owners = torch.tensor([s for s in range(b) if s not in empty_samples])
    sample_idx = owners[torch.randint(0, len(owners), (n,), generator=g)]
    inputs = dict(
        hidden=leaf(torch.randn(n, h, generator=g), dtype, device),
        sample_idx=sample_idx.to(device),
        target=torch.randn(n + 3 if per_row else b, d, generator=g).to(device),  # fp32, like the data's features
        fc1_w=leaf(torch.randn(d, h, generator=g) / h**0.5, dtype, device),
        fc1_b=leaf(0.1 * torch.randn(d, generator=g), dtype, device),
        fc2_w=leaf(torch.randn(d, d, generator=g) / d**0.5, dtype, device),
        fc2_b=leaf(0.1 * torch.randn(d, generator=g), dtype, device),
    )
    if per_row:
        inputs["target_idx"] = torch.randperm(n + 3, generator=g)[:n].to(device)
    return inputs


GRAD_NAMES = ("hidden", "fc1_w", "fc1_b", "fc2_w", "fc2_b")


def _fp32_copies(inputs):
    return {k: (v.detach().float().requires_grad_() if k in GRAD_NAMES else v) for k, v in inputs.items()}


def _check_align_against_reference(inputs, kind, dtype, upstream=1.0):
    from arra_ds.kernels.align_loss import fused_projection_loss, reference_projection_loss

    loss, cos, cos_first = fused_projection_loss(**inputs, kind=kind)
    grads = torch.autograd.grad(upstream * loss, [inputs[k] for k in GRAD_NAMES])
    ref_inputs = _fp32_copies(inputs)
    ref_loss, ref_cos, ref_first = reference_projection_loss(**ref_inputs, kind=kind)
    ref_grads = torch.autograd.grad(upstream * ref_loss, [ref_inputs[k] for k in GRAD_NAMES])

    assert loss.dtype == torch.float32 and cos.dtype == torch.float32 and not cos.requires_grad
    assert cos_first.dtype == torch.float32 and not cos_first.requires_grad
    assert_loss_close(loss, ref_loss, LOSS_REL_TOL[dtype], "loss")
    assert_loss_close(cos, ref_cos, LOSS_REL_TOL[dtype], "mean cosine")
    assert_loss_close(cos_first, ref_first, LOSS_REL_TOL[dtype], "first-row cosine")
    for name, grad, ref in zip(GRAD_NAMES, grads, ref_grads):
        assert grad.dtype == dtype and grad.shape == ref.shape, name
        assert torch.count_nonzero(ref) > 0, f"degenerate test: reference grad of {name} is zero"
        assert_close_rel(grad, ref, GRAD_REL_TOL[dtype], f"d loss / d {name}")


# (N, H, D, B, samples without rows): N around the row block (16..64), H and D not powers of two,
# D = 80 spans two fc2 output slices, B = 1.
ALIGN_SHAPES = [
    (1, 24, 16, 1, ()),
    (7, 72, 40, 4, (1, 3)),
    (37, 100, 48, 5, (0,)),
    (130, 72, 80, 3, (2,)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", ALIGN_SHAPES, ids=lambda s: "N{}-H{}-D{}-B{}".format(*s[:4]))
def test_align_kernel_cosine_matches_reference(device, shape, dtype):
    n, h, d, b, empty = shape
    _check_align_against_reference(_align_inputs(n, h, d, b, dtype, device, empty), "cosine", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [ALIGN_SHAPES[1], ALIGN_SHAPES[3]], ids=["N7", "N130"])
def test_align_kernel_mse_matches_reference(device, shape, dtype):
    n, h, d, b, empty = shape
    _check_align_against_reference(_align_inputs(n, h, d, b, dtype, device, empty), "mse", dtype)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", ALIGN_SHAPES[1:], ids=lambda s: "N{}-H{}-D{}-B{}".format(*s[:4]))
def test_align_kernel_with_one_target_row_per_row(device, shape, dtype, kind):
    """align.feature=patch: target [M, D] read through target_idx, still averaged per sample."""
    n, h, d, b, empty = shape
    _check_align_against_reference(_align_inputs(n, h, d, b, dtype, device, empty, per_row=True), kind, dtype)


def test_align_kernel_scales_with_upstream_gradient_and_leaves_target_alone(device):
    inputs = _align_inputs(37, 24, 16, 3, torch.float32, device, seed=1)
    inputs["target"].requires_grad_()
    _check_align_against_reference(inputs, "cosine", torch.float32, upstream=-2.5)
    assert inputs["target"].grad is None


def test_align_kernel_projection_below_norm_eps(device):
    """p = 0 (fc2 zeroed): F.normalize's clamp branch, where only the tangential term is left."""
    from arra_ds.kernels.align_loss import fused_projection_loss, reference_projection_loss

    inputs = _align_inputs(9, 24, 16, 2, torch.float32, device)
    with torch.no_grad():
        inputs["fc2_w"].zero_()
        inputs["fc2_b"].zero_()
    loss, cos, _ = fused_projection_loss(**inputs)
    grads = torch.autograd.grad(loss, [inputs[k] for k in GRAD_NAMES])
    ref_loss, _, _ = reference_projection_loss(**inputs)
    ref_grads = torch.autograd.grad(ref_loss, [inputs[k] for k in GRAD_NAMES])
    assert loss.item() == pytest.approx(1.0) and cos.item() == 0.0
    for name, grad, ref in zip(GRAD_NAMES, grads, ref_grads):
        assert_close_rel(grad, ref, GRAD_REL_TOL[torch.float32], f"d loss / d {name}")


def test_align_kernel_without_rows_is_a_connected_zero(device):
    from arra_ds.kernels.align_loss import fused_projection_cosine_loss

    inputs = _align_inputs(0, 24, 16, 2, torch.float32, device)
    loss = fused_projection_cosine_loss(**inputs)
    loss.backward()
    assert loss.item() == 0.0
    for name in ("fc1_w", "fc1_b", "fc2_w", "fc2_b"):
        assert inputs[name].grad is not None and torch.count_nonzero(inputs[name].grad) == 0


def test_align_kernel_rejects_bad_inputs(device):
    from arra_ds.kernels.align_loss import fused_projection_loss

    inputs = _align_inputs(7, 24, 16, 2, torch.float32, device)
    with pytest.raises(ValueError, match="holds indices outside the M=2 target rows"):
        fused_projection_loss(**{**inputs, "sample_idx": inputs["sample_idx"] + 5})
    with pytest.raises(ValueError, match="holds indices outside the M=2 target rows"):
        fused_projection_loss(**inputs, target_idx=torch.full_like(inputs["sample_idx"], 2))
    with pytest.raises(ValueError, match=r"target_idx must have shape \(7,\)"):
        fused_projection_loss(**inputs, target_idx=inputs["sample_idx"][:3])
    with pytest.raises(ValueError, match=r"target must be \[M, D=16\]"):
        fused_projection_loss(**{**inputs, "target": inputs["target"][:, :8]})
    with pytest.raises(ValueError, match="fc2_w is torch.bfloat16 but hidden is torch.float32"):
        fused_projection_loss(**{**inputs, "fc2_w": inputs["fc2_w"].bfloat16()})
    with pytest.raises(ValueError, match="unknown alignment loss"):
        fused_projection_loss(**inputs, kind="l1")


# ------------------------------------------------------------------------------------------------
# LM head + cross-entropy + z-loss
# ------------------------------------------------------------------------------------------------


def _lm_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = leaf(torch.randn(n, h, generator=g), dtype, device)
    weight = leaf(0.3 * torch.randn(v, h, generator=g), dtype, device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, targets


def _reference_lm(hidden, weight, targets, z_weight, upstream=1.0):
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    loss, ce, z = reference_lm_loss(h32, w32, targets, z_weight)
    grads = torch.autograd.grad(upstream * loss, [h32, w32])
    return (loss, ce, z), grads


# (N, H, V, chunk, z_w): V = 20000 > the 16384-wide tile takes two vocabulary slices at one row per
# program; the small vocabularies take many rows per program, with row tails and several chunks.
LM_CASES = [(1, 24, 101, 2048, 1e-2), (37, 24, 101, 16, 0.0), (130, 72, 300, 64, 1e-2), (37, 24, 20000, 2048, 1e-2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", LM_CASES, ids=lambda c: "N{}-H{}-V{}-chunk{}-z{}".format(*c))
def test_lm_kernel_matches_reference(device, case, dtype):
    from arra_ds.kernels.lm_loss import fused_lm_loss

    n, h, v, chunk, z_weight = case
    hidden, weight, targets = _lm_inputs(n, h, v, dtype, device)
    loss, ce, z = fused_lm_loss(hidden, weight, targets, z_weight, chunk)
    grads = torch.autograd.grad(loss, [hidden, weight])
    (ref_loss, ref_ce, ref_z), ref_grads = _reference_lm(hidden, weight, targets, z_weight)

    assert not ce.requires_grad and not z.requires_grad
    for name, value, ref in (("loss", loss, ref_loss), ("ce", ce, ref_ce), ("z", z, ref_z)):
        assert value.dtype == torch.float32
        assert_loss_close(value, ref, LOSS_REL_TOL[dtype], name)
    for name, grad, ref in zip(("hidden", "weight"), grads, ref_grads):
        assert grad.dtype == dtype
        assert_close_rel(grad, ref, GRAD_REL_TOL[dtype], f"d loss / d {name}")


def test_lm_kernel_agrees_with_torch_chunked_version(device):
    from arra_ds.kernels.lm_loss import fused_lm_loss

    hidden, weight, targets = _lm_inputs(130, 72, 300, torch.float32, device, seed=2)
    fused = fused_lm_loss(hidden, weight, targets, 1e-3, 50)
    fused_grads = torch.autograd.grad(fused[0], [hidden, weight])
    chunked = chunked_lm_loss(hidden, weight, targets, 1e-3, 50)
    chunked_grads = torch.autograd.grad(chunked[0], [hidden, weight])
    for value, ref in zip(fused, chunked):
        assert_loss_close(value, ref, 1e-6, "loss/ce/z")
    for grad, ref in zip(fused_grads, chunked_grads):
        assert_close_rel(grad, ref, 1e-6, "grad")


def test_lm_kernel_upstream_gradient_and_frozen_weight(device):
    from arra_ds.kernels.lm_loss import fused_lm_loss

    hidden, weight, targets = _lm_inputs(37, 24, 101, torch.float32, device, seed=3)
    weight.requires_grad_(False)
    loss, _, _ = fused_lm_loss(hidden, weight, targets, 1e-2, 8)
    (grad_hidden,) = torch.autograd.grad(3.0 * loss, [hidden])
    _, (ref_grad_hidden, _) = _reference_lm(hidden, weight, targets, 1e-2, upstream=3.0)
    assert_close_rel(grad_hidden, ref_grad_hidden, GRAD_REL_TOL[torch.float32], "d loss / d hidden")
    assert weight.grad is None


def test_lm_kernel_without_rows_is_a_connected_zero(device):
    from arra_ds.kernels.lm_loss import fused_lm_loss

    hidden, weight, targets = _lm_inputs(0, 24, 101, torch.float32, device)
    loss, ce, z = fused_lm_loss(hidden, weight, targets, 1e-2)
    loss.backward()
    assert loss.item() == ce.item() == z.item() == 0.0
    assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("z_weight", [0.0, 1e-2])
def test_liger_fused_linear_cross_entropy_semantics(device, z_weight):
    """What kernels/lm_loss.py's docstring states about Liger-Kernel 0.8.5: same loss and gradients
    (mean over non-ignored rows, z_w * mean lse^2), but the z it returns is already weighted."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    hidden, weight, targets = _lm_inputs(37, 24, 101, torch.float32, device, seed=4)
    ignored = torch.zeros_like(targets, dtype=torch.bool)
    ignored[::3] = True
    liger_loss, liger_z, _, _ = LigerFusedLinearCrossEntropyFunction.apply(
        hidden, weight, targets.masked_fill(ignored, IGNORE_INDEX), None, None, IGNORE_INDEX,
        z_weight, 0.0, "mean", None, True, torch.float32,
    )  # fmt: skip
    grads = torch.autograd.grad(liger_loss, [hidden, weight])

    keep = ~ignored
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref_loss, _, ref_z = reference_lm_loss(h32[keep], w32, targets[keep], z_weight)
    ref_grads = torch.autograd.grad(ref_loss, [h32, w32])
    assert_loss_close(liger_loss, ref_loss, 1e-5, "liger loss")
    assert liger_z.item() == pytest.approx(z_weight * ref_z.item(), rel=1e-5, abs=1e-12)
    for name, grad, ref in zip(("hidden", "weight"), grads, ref_grads):
        assert_close_rel(grad, ref, 1e-5, f"liger d loss / d {name}")


# ------------------------------------------------------------------------------------------------
# wiring: model.fused_kernels
# ------------------------------------------------------------------------------------------------


def test_fused_kernels_on_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = ModelConfig(fused_kernels="on")
    if torch.cuda.is_available():
        cfg.validate()
    else:
        with pytest.raises(ConfigError, match="model.fused_kernels=on needs a CUDA device"):
            cfg.validate()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg.validate()
    ModelConfig(fused_kernels="auto").validate()


@pytest.mark.parametrize("mode", ["on", "off", "auto"])
def test_fused_kernels_override_keeps_its_yaml_spelling(mode):
    # YAML 1.1 reads a bare on/off as a boolean; the Literal field must still get the string
    assert load_run_config(None, [f"model.fused_kernels={mode}"]).model.fused_kernels == mode


def test_fused_kernel_mode_resolution():
    cpu = torch.zeros(1)
    assert use_fused_kernel("on", cpu) and not use_fused_kernel("off", cpu) and not use_fused_kernel("auto", cpu)
    with pytest.raises(ValueError, match="not one of"):
        use_fused_kernel("yes", cpu)
    with pytest.raises(ValueError, match="fused alignment kernel takes D <="):
        AlignHead(8, ALIGN_MAX_FEATURE_DIM + 1, "mlp", "cosine", fused_kernels="on")


def test_cpu_tensors_need_kernels_built_for_the_interpreter():
    from triton.runtime.jit import JITFunction

    def kernel():
        pass

    with pytest.raises(RuntimeError, match="Triton was imported for CUDA"):
        check_launchable(torch.zeros(1), JITFunction(kernel), "kernels.example")


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_align_head_fused_branch_matches_torch_branch(device, kind):
    torch.manual_seed(0)
    head = AlignHead(40, 24, "mlp", kind, fused_kernels="on").to(device)
    inputs = _align_inputs(37, 40, 24, 4, torch.float32, device, empty_samples=(2,))
    hidden, sample_idx, target = inputs["hidden"], inputs["sample_idx"], inputs["target"]
    results = {}
    for mode in ("on", "off"):
        head.fused_kernels = mode
        head.zero_grad()
        loss, cos, cos_first = head(hidden, sample_idx, target)
        loss.backward()
        results[mode] = (loss.detach(), cos, cos_first, [p.grad.clone() for p in head.parameters()])
    assert_loss_close(results["on"][0], results["off"][0], 1e-5, "loss")
    assert_loss_close(results["on"][1], results["off"][1], 1e-5, "cos")
    assert_loss_close(results["on"][2], results["off"][2], 1e-5, "cos_first")
    for grad, ref in zip(results["on"][3], results["off"][3]):
        assert_close_rel(grad, ref, 1e-5, "projector grad")


def test_lm_head_fused_branch_matches_torch_branch(device):
    hidden, weight, targets = _lm_inputs(37, 24, 101, torch.float32, device, seed=5)
    head = LMHeadWithLoss(torch.nn.Parameter(weight.detach()), z_loss_weight=1e-3, chunk_size=16, fused_kernels="on")
    fused = head(hidden, targets=targets)
    (fused_grad,) = torch.autograd.grad(fused[0], [head.weight])
    head.fused_kernels = "off"
    torch_path = head(hidden, targets=targets)
    (torch_grad,) = torch.autograd.grad(torch_path[0], [head.weight])
    for value, ref in zip(fused, torch_path):
        assert_loss_close(value, ref, 1e-6, "loss/ce/z")
    assert_close_rel(fused_grad, torch_grad, 1e-6, "lm_head grad")


# ------------------------------------------------------------------------------------------------
# a short training run: fused kernels and torch path give the same loss curve
# ------------------------------------------------------------------------------------------------

TRAIN_STEPS = 10
CURVE_REL_TOL = 1e-5  # per step, every logged value: |fused - torch| <= tol * max(1, |torch|)


def _tiny_run_config(fused_kernels: str, feature_dim: int) -> RunConfig:
    model = ModelConfig(
        debug=DebugModelConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, num_image_codes=64,
            max_position_embeddings=128,
        ),
        attn_implementation="eager",
        z_loss_weight=1e-2,
        lm_loss_chunk_size=32,
        fused_kernels=fused_kernels,
    )
    model.validate()
    align = AlignConfig(weight=1.0, layer=1, encoder="demo", feature_dim=feature_dim)
    align.validate()
    return RunConfig(model=model, align=align)


def _tiny_batches(vocab, feature_dim, device):
    """Two fixed batches of 3; the last sample of the second has no supervised tokens at all."""
    g = torch.Generator().manual_seed(7)
    tokenizer = build_debug_tokenizer(num_image_codes=vocab.num_image_codes)
    captions = ["a red square", "a blue ring at the top", "a green bar at the bottom left"]
    collate = Collator(pad_id=vocab.pad_id)
    batches = []
    for batch_no in range(2):
        items = []
        for sample_no, caption in enumerate(captions):
            codes = torch.randint(0, vocab.num_image_codes, (4, 4), generator=g)
            prompt = tokenizer.encode(caption, add_special_tokens=False).ids
            tokens, prompt_len = conversation_tokens(prompt, image_to_tokens(codes, vocab), vocab)
            tokens = torch.tensor(tokens)
            labels = tokens.clone()
            labels[: len(labels) if (batch_no, sample_no) == (1, 2) else prompt_len] = IGNORE_INDEX
            items.append({"input_ids": tokens, "labels": labels})
        batch = collate(items)
        batch["target_features"] = torch.randn(3, feature_dim, generator=g)
        batches.append({k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)})
    return batches


def _train_curve(fused_kernels, device):
    """Per step [loss, loss_ar, loss_gva, loss_z, cos], and how often each kernel ran."""
    from arra_ds.kernels import align_loss, lm_loss

    feature_dim = 24
    cfg = _tiny_run_config(fused_kernels, feature_dim)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.align).to(device)
    batches = _tiny_batches(model.vocab, feature_dim, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    curve = []
    align_loss_fn, lm_loss_fn = align_loss.fused_projection_loss, lm_loss.fused_lm_loss
    with (
        mock.patch.object(align_loss, "fused_projection_loss", wraps=align_loss_fn) as align_spy,
        mock.patch.object(lm_loss, "fused_lm_loss", wraps=lm_loss_fn) as lm_spy,
    ):
        for step in range(TRAIN_STEPS):
            out = model(batches[step % 2])
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            curve.append([out.loss.item(), out.loss_ar.item(), out.loss_gva.item(), out.loss_z.item(), out.cos.item()])
    return torch.tensor(curve), (align_spy.call_count, lm_spy.call_count)


def test_training_curve_fused_matches_torch(device):
    fused_curve, fused_calls = _train_curve("on", device)
    torch_curve, torch_calls = _train_curve("off", device)

    assert fused_calls == (TRAIN_STEPS, TRAIN_STEPS) and torch_calls == (0, 0)
    err = (fused_curve - torch_curve).abs()
    bound = CURVE_REL_TOL * torch_curve.abs().clamp(min=1.0)
    assert bool((err <= bound).all()), f"curves differ by up to {err.max():.3g}:\n{fused_curve}\n{torch_curve}"
    # the run trains: the loss on the first batch goes down, the alignment cosine goes up
    assert torch_curve[-2, 0] < torch_curve[0, 0] and torch_curve[-2, 4] > torch_curve[0, 4]
