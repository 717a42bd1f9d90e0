"""ARRA loss pieces against hand-written references."""

import pytest
import torch
import torch.nn.functional as F

from arra_ds.kernels.align_loss_torch import gva_loss
from arra_ds.kernels.lm_loss_torch import chunked_lm_loss, reference_lm_loss
from arra_ds.model.arra import aligned_positions


def _lm_inputs(n=37, h=24, v=101, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1000])
@pytest.mark.parametrize("z_weight", [0.0, 1e-2])
def test_chunked_lm_loss_matches_full_logits(chunk, z_weight):
    hidden, weight, targets = _lm_inputs()
    loss, ce, z = chunked_lm_loss(hidden, weight, targets, z_weight, chunk)
    loss.backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()

    hidden.grad = weight.grad = None
    ref_loss, ref_ce, ref_z = reference_lm_loss(hidden, weight, targets, z_weight)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, ref_z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_hidden, hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_weight, weight.grad, rtol=1e-5, atol=1e-6)


def test_chunked_lm_loss_scales_with_upstream_gradient():
    hidden, weight, targets = _lm_inputs()
    loss, _, _ = chunked_lm_loss(hidden, weight, targets, 1e-3, 8)
    (3.0 * loss).backward()
    ref_h, ref_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref, _, _ = reference_lm_loss(hidden, weight, targets, 1e-3)
    (3.0 * ref).backward()
    torch.testing.assert_close(ref_h, hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref_w, weight.grad, rtol=1e-5, atol=1e-6)


def test_chunked_lm_loss_bf16_close_to_fp32_reference():
    hidden, weight, targets = _lm_inputs(dtype=torch.bfloat16)
    loss, _, _ = chunked_lm_loss(hidden, weight, targets, 1e-4, 8)
    loss.backward()
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref, _, _ = reference_lm_loss(h32, w32, targets, 1e-4)
    ref.backward()
    assert weight.grad.dtype == torch.bfloat16 and hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(hidden.grad.float(), h32.grad, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(weight.grad.float(), w32.grad, rtol=5e-2, atol=5e-3)


def test_chunked_lm_loss_with_no_rows_is_a_connected_zero():
    hidden, weight, targets = _lm_inputs(n=0)
    loss, ce, z = chunked_lm_loss(hidden, weight, targets, 1e-4, 8)
    loss.backward()
    assert loss.item() == 0.0 and ce.item() == 0.0
    assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0


def _reference_gva(projected, sample_idx, targets, kind, target_idx=None):
    """Literal reading of the definition: per sample mean over its rows, then mean over samples; the
    first-row cosine is each sample's first row's cosine, averaged over samples."""
    row_targets = targets[sample_idx if target_idx is None else target_idx]
    per_sample, cosines, firsts = [], [], []
    for b in range(int(sample_idx.max()) + 1):
        mine = (sample_idx == b).nonzero().flatten()
        if mine.numel() == 0:
            continue
        rows, t = projected[mine], row_targets[mine]
        cos = F.cosine_similarity(rows, t, dim=-1)
        per_sample.append((1 - cos).mean() if kind == "cosine" else ((rows - t) ** 2).mean(-1).mean())
        cosines.append(cos.mean())
        firsts.append(cos[0])
    return torch.stack(per_sample).mean(), torch.stack(cosines).mean(), torch.stack(firsts).mean()


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_gva_loss_averages_per_sample_then_over_samples(kind):
    g = torch.Generator().manual_seed(1)
    targets = torch.randn(4, 16, generator=g)
    # sample 0 has 1 row, sample 1 none, sample 2 has 9, sample 3 has 3: unequal weights matter
    sample_idx = torch.tensor([0] + [2] * 9 + [3] * 3)
    projected = torch.randn(sample_idx.numel(), 16, generator=g, requires_grad=True)
    loss, cos, cos_first = gva_loss(projected, sample_idx, targets, kind)
    ref_loss, ref_cos, ref_first = _reference_gva(projected, sample_idx, targets, kind)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cos, ref_cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cos_first, ref_first.detach(), rtol=1e-5, atol=1e-6)
    assert not cos.requires_grad and not cos_first.requires_grad
    loss.backward()
    assert projected.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_gva_loss_with_one_target_row_per_row(kind):
    """target_idx: each row against its own target (align.feature=patch), still averaged per sample;
    rows of a sample need not be contiguous, its first row is its lowest row number."""
    g = torch.Generator().manual_seed(2)
    sample_idx = torch.tensor([1, 1, 3, 1, 3, 0, 3, 3])
    targets = torch.randn(sample_idx.numel(), 16, generator=g)
    target_idx = torch.randperm(sample_idx.numel(), generator=g)
    projected = torch.randn(sample_idx.numel(), 16, generator=g, requires_grad=True)
    loss, cos, cos_first = gva_loss(projected, sample_idx, targets, kind, target_idx)
    ref_loss, ref_cos, ref_first = _reference_gva(projected, sample_idx, targets, kind, target_idx)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cos, ref_cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cos_first, ref_first.detach(), rtol=1e-5, atol=1e-6)
    grad = torch.autograd.grad(loss, projected)[0]
    ref_grad = torch.autograd.grad(ref_loss, projected)[0]
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_gva_loss_without_rows_is_zero():
    projected = torch.zeros(0, 8, requires_grad=True)
    loss, cos, cos_first = gva_loss(projected, torch.zeros(0, dtype=torch.long), torch.randn(2, 8))
    assert loss.item() == 0.0 and cos.item() == 0.0 and cos_first.item() == 0.0


# ---- aligned positions over a right-padded, mixed-length batch built with the real layout -------


def _batch(vocab):
    from arra_ds.data.loader import Collator, SampleConverter
    from arra_ds.tokens.layout import conversation_tokens, image_to_tokens

    converter = SampleConverter(None, max_seq_len=10_000, overlong="error")
    items, image_spans = [], []
    for prompt_len_words, side in ((3, 2), (7, 4), (1, 2)):
        codes = torch.arange(side * side).view(side, side) % vocab.num_image_codes
        image = image_to_tokens(codes, vocab)
        prompt = [vocab.id(w) for w in "a red square at the top left".split()[:prompt_len_words]]
        tokens, prompt_len = conversation_tokens(prompt, image, vocab)
        items.append(converter({"tokens": torch.tensor(tokens).numpy(), "prompt_len": prompt_len}))
        image_spans.append((prompt_len, prompt_len + len(image)))
    return Collator(vocab.pad_id, pad_to_multiple_of=8)(items), image_spans


def test_hybnext_positions_are_exactly_the_tokens_before_image_codes(debug_vocab):
    batch, spans = _batch(debug_vocab)
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[debug_vocab.image_token_ids] = True
    b_idx, t_idx = aligned_positions(batch["input_ids"], batch["labels"], mask, debug_vocab.image_start_id, "hybnext", 1024)
    expected = set()
    for b in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][b].tolist()
        for t in range(len(ids) - 1):
            if batch["attention_mask"][b, t + 1] and mask[ids[t + 1]] and t + 1 >= spans[b][0]:
                expected.add((b, t))
    got = set(zip(b_idx.tolist(), t_idx.tolist()))
    assert got == expected
    # never padding, never the prompt
    for b, t in got:
        assert batch["attention_mask"][b, t] == 1 and t >= spans[b][0]
    # one aligned position per image code
    assert len(got) == 2 * 2 + 4 * 4 + 2 * 2


def test_rep_position_is_the_image_start_token(debug_vocab):
    batch, spans = _batch(debug_vocab)
    b_idx, t_idx = aligned_positions(
        batch["input_ids"], batch["labels"], torch.zeros(1000, dtype=torch.bool), debug_vocab.image_start_id, "rep", 1024
    )
    assert b_idx.tolist() == [0, 1, 2]
    assert t_idx.tolist() == [s for s, _ in spans]
    assert all(batch["input_ids"][b, t] == debug_vocab.image_start_id for b, t in zip(b_idx, t_idx))


def test_slice_positions_follow_the_reference_code(debug_vocab):
    batch, _ = _batch(debug_vocab)
    length = batch["input_ids"].shape[1]
    b_idx, t_idx = aligned_positions(
        batch["input_ids"], batch["labels"], torch.zeros(1000, dtype=torch.bool), 0, "slice", 5
    )
    # [-(5 + 1):-1] of every row, padding included, exactly like hidden[:, -1025:-1] with 1024
    assert t_idx.view(3, 5)[0].tolist() == list(range(length - 6, length - 1))
    assert b_idx.tolist() == [0] * 5 + [1] * 5 + [2] * 5


@pytest.fixture
def debug_vocab():
    from arra_ds.tokens.vocab import build_debug_vocab

    return build_debug_vocab(num_image_codes=64)
