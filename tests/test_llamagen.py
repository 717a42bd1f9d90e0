"""LlamaGen c2i GPT: upstream key layout, logits against an independent reference, 2D RoPE, class
dropout, KV-cache decoding, checkpoint forms and errors.

The reference below is written from upstream autoregressive/models/gpt.py's formulas (functional,
over a state dict, explicit softmax attention, per-position RoPE angles) and shares no code with
arra_ds.model.llamagen.
"""

import argparse
import math

import pytest
import torch

from arra_ds.errors import ConfigError, InputNotFoundError, UserError
from arra_ds.model.llamagen.checkpoint import LlamaGenCheckpointError, load_llamagen_checkpoint
from arra_ds.model.llamagen.config import LlamaGenConfig
from arra_ds.model.llamagen.gpt import LlamaGenGPT
from arra_ds.model.llamagen.layers import apply_2d_rope, build_2d_rope_table

# A tiny model: head_dim 8 (two row pairs, two column pairs), a 4 x 4 code grid.
TINY = {"n_layer": 2, "n_head": 2, "dim": 16, "vocab_size": 37, "block_size": 16, "num_classes": 5, "multiple_of": 8}
NO_DROPOUT = {"token_dropout_p": 0.0, "resid_dropout_p": 0.0, "ffn_dropout_p": 0.0}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


# ------------------------------------------------------------------------------------------------
# Independent reference (upstream formulas)
# ------------------------------------------------------------------------------------------------


def upstream_ffn_dim(dim: int, multiple_of: int) -> int:
    hidden = int(2 * (4 * dim) / 3)
    return hidden if hidden % multiple_of == 0 else hidden + multiple_of - hidden % multiple_of


def upstream_shapes(n_layer: int, dim: int, vocab: int, num_classes: int, multiple_of: int) -> dict:
    """Upstream Transformer's state-dict names and shapes (c2i, class_dropout_prob > 0, no buffers)."""
    ffn = upstream_ffn_dim(dim, multiple_of)
    shapes = {
        "cls_embedding.embedding_table.weight": (num_classes + 1, dim),
        "tok_embeddings.weight": (vocab, dim),
        "norm.weight": (dim,),
        "output.weight": (vocab, dim),
    }
    for i in range(n_layer):
        shapes.update({
            f"layers.{i}.attention.wqkv.weight": (3 * dim, dim),
            f"layers.{i}.attention.wo.weight": (dim, dim),
            f"layers.{i}.feed_forward.w1.weight": (ffn, dim),
            f"layers.{i}.feed_forward.w3.weight": (ffn, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, ffn),
            f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.ffn_norm.weight": (dim,),
        })
    return shapes


def random_upstream_state(seed: int = 0, **sizes) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = upstream_shapes(sizes["n_layer"], sizes["dim"], sizes["vocab_size"], sizes["num_classes"], sizes["multiple_of"])
    # Scaled so activations stay O(1) through the blocks; norms near 1 like trained weights.
    state = {k: torch.randn(s, generator=g) * (0.3 if len(s) == 2 else 0.1) for k, s in shapes.items()}
    for key, value in state.items():
        if key.endswith("norm.weight"):
            state[key] = 1.0 + value
    return state


def reference_angle(position: int, pair: int, head_dim: int, grid: int, base: float = 10000.0) -> float | None:
    """Rotation angle of `pair` at sequence `position`; None for the class token (zeroed upstream)."""
    if position == 0:
        return None
    row, col = divmod(position - 1, grid)
    quarter = head_dim // 4
    k, step = (pair, row) if pair < quarter else (pair - quarter, col)
    return step * base ** (-(2 * k) / (head_dim // 2))


def reference_rotate(x: torch.Tensor, grid: int) -> torch.Tensor:
    """x [B, S, H, D] -> rotated, pair by pair with explicit angles (double precision)."""
    out = torch.zeros_like(x, dtype=torch.float64)
    head_dim = x.shape[-1]
    for position in range(x.shape[1]):
        for pair in range(head_dim // 2):
            angle = reference_angle(position, pair, head_dim, grid)
            if angle is None:
                continue  # cos = sin = 0: the class token's q and k become zero
            a, b = x[:, position, :, 2 * pair].double(), x[:, position, :, 2 * pair + 1].double()
            out[:, position, :, 2 * pair] = a * math.cos(angle) - b * math.sin(angle)
            out[:, position, :, 2 * pair + 1] = b * math.cos(angle) + a * math.sin(angle)
    return out.to(x.dtype)


def reference_forward(state: dict, n_head: int, grid: int, class_ids, codes, eps: float = 1e-5):
    """Returns (logits [B, 1 + T, V], [hidden after block 1, block 2, ...])."""

    def rms(x, w):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w

    h = torch.cat([state["cls_embedding.embedding_table.weight"][class_ids][:, None], state["tok_embeddings.weight"][codes]], 1)
    batch, seq, dim = h.shape
    head_dim = dim // n_head
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    after_block = []
    i = 0
    while f"layers.{i}.attention.wqkv.weight" in state:
        p = f"layers.{i}."
        x = rms(h, state[p + "attention_norm.weight"])
        q, k, v = (x @ state[p + "attention.wqkv.weight"].t()).split(dim, -1)
        q, k, v = (t.reshape(batch, seq, n_head, head_dim) for t in (q, k, v))
        q, k = reference_rotate(q, grid), reference_rotate(k, grid)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attended = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, dim)
        h = h + attended @ state[p + "attention.wo.weight"].t()
        x = rms(h, state[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(x @ state[p + "feed_forward.w1.weight"].t())
        h = h + (gate * (x @ state[p + "feed_forward.w3.weight"].t())) @ state[p + "feed_forward.w2.weight"].t()
        after_block.append(h)
        i += 1
    logits = rms(h, state["norm.weight"]) @ state["output.weight"].t()
    return logits, after_block


def tiny_model(state: dict | None = None, **overrides) -> LlamaGenGPT:
    torch.manual_seed(0)
    model = LlamaGenGPT(LlamaGenConfig(**{**TINY, **NO_DROPOUT, **overrides}))
    if state is not None:
        load_llamagen_checkpoint(model, state)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Layout, sizes, init
# ------------------------------------------------------------------------------------------------


def test_state_dict_has_upstream_names_and_shapes():
    model = LlamaGenGPT(LlamaGenConfig(**TINY))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == upstream_shapes(TINY["n_layer"], TINY["dim"], TINY["vocab_size"], TINY["num_classes"], TINY["multiple_of"])
    # forward hooks and the ARRA head need these attributes under these names
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == TINY["n_layer"]
    assert model.output.weight.shape == (TINY["vocab_size"], TINY["dim"])


def test_no_null_class_row_without_class_dropout():
    model = LlamaGenGPT(LlamaGenConfig(**TINY, class_dropout_prob=0.0))
    assert model.cls_embedding.embedding_table.weight.shape[0] == TINY["num_classes"]


@pytest.mark.parametrize("size, layers, heads, dim, millions", [("B", 12, 12, 768, 111), ("L", 24, 16, 1024, 343), ("XL", 36, 20, 1280, 775)])
def test_named_sizes_match_upstream(size, layers, heads, dim, millions):
    config = LlamaGenConfig(size=size)
    assert (config.resolved_n_layer, config.resolved_n_head, config.resolved_dim) == (layers, heads, dim)
    assert config.ffn_dim == upstream_ffn_dim(dim, 256)
    with torch.device("meta"):
        model = LlamaGenGPT(config)
    expected = upstream_shapes(layers, dim, 16384, 1000, 256)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions  # upstream gpt.py comments


def test_explicit_dims_override_size():
    config = LlamaGenConfig(size="L", n_layer=3)
    assert (config.resolved_n_layer, config.resolved_n_head, config.resolved_dim) == (3, 16, 1024)


def test_upstream_init():
    torch.manual_seed(0)
    model = LlamaGenGPT(LlamaGenConfig(n_layer=1, n_head=4, dim=128, vocab_size=512, num_classes=10))
    assert torch.count_nonzero(model.output.weight) == 0  # upstream zeroes the LM head
    assert torch.equal(model.norm.weight, torch.ones(128))
    for weight in (model.tok_embeddings.weight, model.layers[0].attention.wqkv.weight, model.layers[0].feed_forward.w2.weight):
        assert weight.mean().abs() < 0.002 and abs(weight.std().item() - 0.02) < 0.001


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"size": "M"}, "model.llamagen.size"),
        ({"dim": 20, "n_head": 2}, "model.llamagen.dim / n_head"),  # head_dim 10: not a multiple of 4
        ({"dim": 18, "n_head": 4}, "model.llamagen.dim="),
        ({"block_size": 12}, "model.llamagen.block_size"),
        ({"class_dropout_prob": 1.0}, "model.llamagen.class_dropout_prob"),
        ({"cls_token_num": 2}, "model.llamagen.cls_token_num"),
        ({"vocab_size": 0}, "model.llamagen.vocab_size"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("/", "\\/").replace(".", "\\.")) as info:
        LlamaGenGPT(LlamaGenConfig(**{**TINY, **overrides}))
    assert isinstance(info.value, UserError)


# ------------------------------------------------------------------------------------------------
# Numerics against the reference
# ------------------------------------------------------------------------------------------------


def test_logits_match_independent_reference():
    state = random_upstream_state(**TINY)
    model = tiny_model(state)
    g = torch.Generator().manual_seed(1)
    null = TINY["num_classes"]
    for length in (0, 5, TINY["block_size"]):  # class token only, a prefix, the full grid
        class_ids = torch.tensor([0, 3, null])
        codes = torch.randint(0, TINY["vocab_size"], (3, length), generator=g)
        expected, _ = reference_forward(state, TINY["n_head"], 4, class_ids, codes)
        with torch.no_grad():
            got = model(class_ids, codes)
        assert got.shape == (3, 1 + length, TINY["vocab_size"]) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_hidden_and_block_hook_match_reference():
    """forward_hidden is the normed last hidden; a hook on layers[L-1] sees block L's output."""
    state = random_upstream_state(**TINY)
    model = tiny_model(state)
    class_ids, codes = torch.tensor([1, 4]), torch.randint(0, TINY["vocab_size"], (2, 9))
    captured = []
    handle = model.layers[0].register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        hidden = model.forward_hidden(class_ids, codes)
    handle.remove()
    expected_logits, after_block = reference_forward(state, TINY["n_head"], 4, class_ids, codes)
    assert hidden.shape == (2, 10, TINY["dim"])
    torch.testing.assert_close(captured[0], after_block[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.logits(hidden), expected_logits, rtol=1e-5, atol=1e-5)


def test_training_mode_without_dropout_matches_reference_and_checkpointing_keeps_grads():
    state = random_upstream_state(**TINY)
    class_ids, codes = torch.tensor([2, 0]), torch.randint(0, TINY["vocab_size"], (2, 15))
    expected, _ = reference_forward(state, TINY["n_head"], 4, class_ids, codes)
    # without class dropout the class table has no null row
    no_null_row = {**state, "cls_embedding.embedding_table.weight": state["cls_embedding.embedding_table.weight"][:-1]}
    grads = []
    for recompute in (False, True):
        model = tiny_model(no_null_row, class_dropout_prob=0.0, gradient_checkpointing=recompute).train()
        block_calls, attention_calls = [], []
        model.layers[0].register_forward_hook(lambda module, args, output, log=block_calls: log.append(output))
        model.layers[0].attention.register_forward_hook(lambda module, args, output, log=attention_calls: log.append(output))
        logits = model(class_ids, codes)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        logits.square().mean().backward()
        # Recomputation is real (the attention runs again in backward), yet the block's own hook, the
        # one an ARRA capture uses, fires once: torch's non-reentrant recompute stops inside the block.
        assert len(attention_calls) == (2 if recompute else 1)
        assert len(block_calls) == 1
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# 2D RoPE
# ------------------------------------------------------------------------------------------------


def test_rope_table_angles_and_class_token():
    grid, head_dim = 4, 8
    table = build_2d_rope_table(grid, head_dim, 10000.0, cls_token_num=1)
    assert table.shape == (1 + grid * grid, head_dim // 2, 2)
    assert torch.count_nonzero(table[0]) == 0  # class token: cos = sin = 0 (upstream), not identity
    for row in range(grid):
        for col in range(grid):
            position = 1 + row * grid + col
            for pair in range(head_dim // 2):
                angle = reference_angle(position, pair, head_dim, grid)
                assert table[position, pair, 0].item() == pytest.approx(math.cos(angle), abs=1e-6)
                assert table[position, pair, 1].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_apply_rope_rotates_pairs_at_code_positions():
    grid, head_dim = 4, 8
    table = build_2d_rope_table(grid, head_dim, 10000.0, cls_token_num=1)
    x = torch.randn(2, 1 + grid * grid, 3, head_dim)
    torch.testing.assert_close(apply_2d_rope(x, table), reference_rotate(x, grid), rtol=1e-5, atol=1e-6)
    # code (row 2, column 1): a unit vector in pair 0 turns by 2 rad (row), in pair 2 by 1 rad (column)
    unit = torch.zeros(1, 1 + grid * grid, 1, head_dim)
    unit[..., 0] = 1.0
    unit[..., 4] = 1.0
    rotated = apply_2d_rope(unit, table)[0, 1 + 2 * grid + 1, 0]
    torch.testing.assert_close(rotated[[0, 1, 4, 5]], torch.tensor([math.cos(2), math.sin(2), math.cos(1), math.sin(1)]))


# ------------------------------------------------------------------------------------------------
# Class dropout
# ------------------------------------------------------------------------------------------------


def test_class_dropout_only_in_training():
    probability, batch = 0.25, 4000
    model = tiny_model(class_dropout_prob=probability)
    class_ids = torch.arange(batch) % TINY["num_classes"]
    no_codes = torch.zeros(batch, 0, dtype=torch.long)
    with torch.no_grad():
        conditional = model.forward_hidden(class_ids, no_codes)[:, 0]
        null = model.forward_hidden(torch.tensor([model.null_class_id]), no_codes[:1])[0, 0]
        assert not torch.isclose(conditional, null.expand_as(conditional), atol=1e-6).all(dim=1).any()
        for _ in range(2):  # eval never drops
            torch.testing.assert_close(model.forward_hidden(class_ids, no_codes)[:, 0], conditional)
        model.train()
        torch.manual_seed(123)
        trained = model.forward_hidden(class_ids, no_codes)[:, 0]
    dropped = torch.isclose(trained, null.expand_as(trained), atol=1e-6).all(dim=1)
    kept = torch.isclose(trained, conditional, atol=1e-6).all(dim=1)
    assert bool((dropped ^ kept).all())  # each row is either its class or the null class
    sigma = math.sqrt(probability * (1 - probability) / batch)
    assert abs(dropped.float().mean().item() - probability) < 5 * sigma


# ------------------------------------------------------------------------------------------------
# KV-cache decoding
# ------------------------------------------------------------------------------------------------


def test_kv_cache_decoding_matches_full_forward_with_cfg_rows():
    state = random_upstream_state(**TINY)
    model = tiny_model(state)
    labels = torch.tensor([1, 4])
    class_ids = torch.cat([labels, torch.full_like(labels, model.null_class_id)])  # cond and uncond rows
    codes = torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"])).repeat(2, 1)
    with torch.no_grad():
        full = model(class_ids, codes[:, :-1])  # [4, block_size, V]: position t predicts code t
        logits, cache = model.prefill(class_ids)
        steps = [logits]
        for position in range(TINY["block_size"] - 1):
            logits, cache = model.decode_step(codes[:, position], cache, position)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full[:2], full[2:])  # the null class really conditions differently


def test_decode_step_checks_position():
    model = tiny_model()
    with torch.no_grad():
        _, cache = model.prefill(torch.tensor([0]))
        with pytest.raises(ValueError, match="position"):
            model.decode_step(torch.tensor([3]), cache, position=1)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def _assert_loaded(model: LlamaGenGPT, state: dict) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("form", ["model", "module", "top_level"])
def test_checkpoint_forms_load_strictly(tmp_path, form):
    state = random_upstream_state(seed=3, **TINY)
    if form == "top_level":
        checkpoint = dict(state)
    else:  # as train_c2i.py writes it: weights plus optimizer state, step and argparse args
        checkpoint = {form: state, "optimizer": {"state": {}}, "steps": 5000, "args": argparse.Namespace(gpt_model="GPT-B")}
    path = tmp_path / f"{form}.pt"
    torch.save(checkpoint, path)
    for source in (path, str(path), checkpoint):
        model = tiny_model()
        load_llamagen_checkpoint(model, source)
        _assert_loaded(model, state)


def test_checkpoint_weights_key_and_derived_rope_table():
    state = random_upstream_state(seed=4, **TINY)
    model = tiny_model()
    # upstream's serve/HF variants save the RoPE table as a buffer; it is recomputed, not loaded
    load_llamagen_checkpoint(model, {"model": {}, "ema": {**state, "freqs_cis": torch.zeros(17, 4, 2)}}, weights_key="ema")
    _assert_loaded(model, state)


def test_bad_checkpoints_name_the_keys(tmp_path):
    state = random_upstream_state(**TINY)
    model = tiny_model()
    missing = {k: v for k, v in state.items() if k != "layers.1.feed_forward.w3.weight"}
    with pytest.raises(LlamaGenCheckpointError, match=r"missing keys 1 \[layers\.1\.feed_forward\.w3\.weight\]") as info:
        load_llamagen_checkpoint(model, {"model": missing})
    assert isinstance(info.value, UserError)
    with pytest.raises(LlamaGenCheckpointError, match=r"unexpected keys 1 \[layers\.2\.attention\.wo\.weight\]"):
        load_llamagen_checkpoint(model, {**state, "layers.2.attention.wo.weight": torch.zeros(16, 16)})
    wrong_vocab = {**state, "output.weight": torch.zeros(99, TINY["dim"])}
    with pytest.raises(LlamaGenCheckpointError, match=r"output\.weight: checkpoint \(99, 16\) vs model \(37, 16\)"):
        load_llamagen_checkpoint(model, wrong_vocab)
    with pytest.raises(LlamaGenCheckpointError, match="not tensors"):
        load_llamagen_checkpoint(model, {"steps": 3, **state})
    with pytest.raises(LlamaGenCheckpointError, match="'ema'"):
        load_llamagen_checkpoint(model, {"model": state}, weights_key="ema")
    with pytest.raises(InputNotFoundError, match="nothing.pt"):
        load_llamagen_checkpoint(model, tmp_path / "nothing.pt")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(LlamaGenCheckpointError, match="damaged.pt"):
        load_llamagen_checkpoint(model, damaged)
