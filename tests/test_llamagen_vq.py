"""LlamaGen VQ-16 tokenizer: upstream key layout, strict loading, encode / decode against an
independent functional reference written from upstream tokenizer/tokenizer_image/vq_model.py,
nearest-code assignment, the quantiser's fixed point, and checkpoint errors.

Invariant tested: quantisation is idempotent, nearest_codes(lookup(c)) == c (a normalised codebook
entry is its own nearest entry), and codes do not change when latents are scaled (l2 normalisation).
encode(decode_codes(c)) == c is NOT an invariant: it needs a trained encoder / decoder pair, and
randomly initialised weights map a decoded image to unrelated latents.
"""

import argparse

import pytest
import torch
import torch.nn.functional as F

from arra_ds.errors import ConfigError, InputNotFoundError, UserError
from arra_ds.tokens.llamagen_vq import LlamaGenVQ, LlamaGenVQCheckpointError, LlamaGenVQConfig

# Five levels (stride 16) like VQ-16; a width change between levels exercises nin_shortcut.
TINY = {
    "codebook_size": 64, "codebook_embed_dim": 8, "base_channels": 32, "encoder_ch_mult": (1, 1, 2, 2, 2),
    "decoder_ch_mult": (1, 1, 2, 2, 2), "z_channels": 32, "num_res_blocks": 1,
}
USAGE_SLOTS = 65536  # upstream VectorQuantizer's codebook_used buffer


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


# ------------------------------------------------------------------------------------------------
# Independent reference (upstream names and formulas)
# ------------------------------------------------------------------------------------------------


def upstream_shapes(ch: int, enc_mult, dec_mult, z: int, blocks: int, codes: int, embed: int) -> dict:
    shapes = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    conv("encoder.conv_in", 3, ch, 3)
    block_in = ch
    for level, mult in enumerate(enc_mult):
        for j in range(blocks):
            res(f"encoder.conv_blocks.{level}.res.{j}", block_in, ch * mult)
            block_in = ch * mult
            if level == len(enc_mult) - 1:
                attn(f"encoder.conv_blocks.{level}.attn.{j}", block_in)
        if level != len(enc_mult) - 1:
            conv(f"encoder.conv_blocks.{level}.downsample.conv", block_in, block_in, 3)
    res("encoder.mid.0", block_in, block_in)
    attn("encoder.mid.1", block_in)
    res("encoder.mid.2", block_in, block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, z, 3)

    block_in = ch * dec_mult[-1]
    conv("decoder.conv_in", z, block_in, 3)
    res("decoder.mid.0", block_in, block_in)
    attn("decoder.mid.1", block_in)
    res("decoder.mid.2", block_in, block_in)
    for i, level in enumerate(reversed(range(len(dec_mult)))):
        for j in range(blocks + 1):
            res(f"decoder.conv_blocks.{i}.res.{j}", block_in, ch * dec_mult[level])
            block_in = ch * dec_mult[level]
            if level == len(dec_mult) - 1:
                attn(f"decoder.conv_blocks.{i}.attn.{j}", block_in)
        if level != 0:
            conv(f"decoder.conv_blocks.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, 3, 3)

    shapes["quantize.embedding.weight"] = (codes, embed)
    shapes["quantize.codebook_used"] = (USAGE_SLOTS,)
    conv("quant_conv", z, embed, 1)
    conv("post_quant_conv", embed, z, 1)
    return shapes


def tiny_shapes() -> dict:
    return upstream_shapes(
        TINY["base_channels"], TINY["encoder_ch_mult"], TINY["decoder_ch_mult"], TINY["z_channels"],
        TINY["num_res_blocks"], TINY["codebook_size"], TINY["codebook_embed_dim"],
    )


def random_upstream_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in tiny_shapes().items():
        if key == "quantize.codebook_used":
            state[key] = torch.randint(0, TINY["codebook_size"], shape, generator=g).float()
        elif len(shape) == 4:  # conv weights scaled by fan-in so activations stay O(1)
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=g) / fan_in ** 0.5
        elif len(shape) == 1 and "norm" in key and key.endswith(".weight"):  # GroupNorm scales near 1
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g)
    state["quantize.embedding.weight"] = torch.randn(tiny_shapes()["quantize.embedding.weight"], generator=g)
    return state


class Reference:
    """Functional upstream forward over a state dict."""

    def __init__(self, state: dict):
        self.s = state

    def conv(self, name, x, stride=1, padding=None):
        w = self.s[f"{name}.weight"]
        pad = w.shape[-1] // 2 if padding is None else padding
        return F.conv2d(x, w, self.s[f"{name}.bias"], stride=stride, padding=pad)

    def norm(self, name, x):
        return F.group_norm(x, 32, self.s[f"{name}.weight"], self.s[f"{name}.bias"], eps=1e-6)

    @staticmethod
    def swish(x):
        return x * torch.sigmoid(x)

    def res(self, name, x):
        h = self.conv(f"{name}.conv1", self.swish(self.norm(f"{name}.norm1", x)))
        h = self.conv(f"{name}.conv2", self.swish(self.norm(f"{name}.norm2", h)))
        shortcut = self.conv(f"{name}.nin_shortcut", x) if f"{name}.nin_shortcut.weight" in self.s else x
        return shortcut + h

    def attn(self, name, x):
        b, c, hh, ww = x.shape
        h = self.norm(f"{name}.norm", x)
        q, k, v = (self.conv(f"{name}.{p}", h).reshape(b, c, hh * ww) for p in ("q", "k", "v"))
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / c ** 0.5, dim=-1)  # [B, query, key]
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, hh, ww)
        return x + self.conv(f"{name}.proj_out", out)

    def level(self, prefix, h):
        j = 0
        while f"{prefix}.res.{j}.conv1.weight" in self.s:
            h = self.res(f"{prefix}.res.{j}", h)
            if f"{prefix}.attn.{j}.q.weight" in self.s:
                h = self.attn(f"{prefix}.attn.{j}", h)
            j += 1
        return h

    def latents(self, x):
        h = self.conv("encoder.conv_in", x)
        level = 0
        while f"encoder.conv_blocks.{level}.res.0.conv1.weight" in self.s:
            h = self.level(f"encoder.conv_blocks.{level}", h)
            if f"encoder.conv_blocks.{level}.downsample.conv.weight" in self.s:
                h = self.conv(f"encoder.conv_blocks.{level}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
            level += 1
        h = self.res("encoder.mid.2", self.attn("encoder.mid.1", self.res("encoder.mid.0", h)))
        h = self.conv("encoder.conv_out", self.swish(self.norm("encoder.norm_out", h)))
        return self.conv("quant_conv", h)

    def decode(self, quant):
        h = self.conv("decoder.conv_in", self.conv("post_quant_conv", quant))
        h = self.res("decoder.mid.2", self.attn("decoder.mid.1", self.res("decoder.mid.0", h)))
        level = 0
        while f"decoder.conv_blocks.{level}.res.0.conv1.weight" in self.s:
            h = self.level(f"decoder.conv_blocks.{level}", h)
            if f"decoder.conv_blocks.{level}.upsample.conv.weight" in self.s:
                h = self.conv(f"decoder.conv_blocks.{level}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
            level += 1
        return self.conv("decoder.conv_out", self.swish(self.norm("decoder.norm_out", h)))

    def unit_codebook(self):
        book = self.s["quantize.embedding.weight"]
        return book / book.norm(dim=1, keepdim=True)

    def codes(self, latents):
        """Nearest unit codebook entry of each unit latent = largest cosine similarity."""
        unit = latents / latents.norm(dim=1, keepdim=True)
        return torch.einsum("bdhw,kd->bhwk", unit, self.unit_codebook()).argmax(dim=-1)


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def loaded():
    state = random_upstream_state()
    model = LlamaGenVQ(LlamaGenVQConfig(**TINY))
    model.load_upstream_state(state, source="test state")
    return model, state


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_state_dict_has_upstream_names_and_shapes():
    model = LlamaGenVQ(LlamaGenVQConfig(**TINY))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == tiny_shapes()


def test_default_config_is_vq16_layout():
    model = LlamaGenVQ()
    expected = upstream_shapes(128, (1, 1, 2, 2, 4), (1, 1, 2, 2, 4), 256, 2, 16384, 8)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 72  # upstream README: 72M
    assert model.downsample_factor == 16


def test_fresh_codebook_is_l2_normalised():
    book = LlamaGenVQ(LlamaGenVQConfig(**TINY)).quantize.embedding.weight
    torch.testing.assert_close(book.norm(dim=1), torch.ones(TINY["codebook_size"]))


def test_encode_decode_match_reference(loaded):
    model, state = loaded
    reference = Reference(state)
    pixels = smooth_images(3, 32, seed=1)
    with torch.no_grad():
        latents = model.latents(pixels)
        torch.testing.assert_close(latents, reference.latents(pixels), rtol=1e-4, atol=1e-4)
        codes = model.encode(pixels)
        assert codes.shape == (3, 2, 2) and codes.dtype == torch.int64
        assert torch.equal(codes, reference.codes(latents))
        assert codes.unique().numel() > 1
        pixels_out = model.decode_codes(codes)
        quantised = reference.unit_codebook()[codes].permute(0, 3, 1, 2)
        assert pixels_out.shape == (3, 3, 32, 32)
        torch.testing.assert_close(pixels_out, reference.decode(quantised), rtol=1e-4, atol=1e-4)


def test_encode_decode_deterministic(loaded):
    model, _ = loaded
    pixels = smooth_images(2, 64, seed=2)
    codes = model.encode(pixels)
    assert codes.shape == (2, 4, 4)
    assert torch.equal(model.encode(pixels), codes)
    decoded = model.decode_codes(codes)
    assert decoded.shape == (2, 3, 64, 64)
    assert torch.equal(model.decode_codes(codes), decoded)


def test_quantiser_is_idempotent_and_scale_invariant(loaded):
    model, _ = loaded
    codes = torch.arange(TINY["codebook_size"]).view(4, 4, 4)
    quantised = model.quantize.lookup(codes)  # [4, 8, 4, 4] unit vectors
    torch.testing.assert_close(quantised.norm(dim=1), torch.ones(4, 4, 4))
    assert torch.equal(model.quantize.nearest_codes(quantised), codes)
    latents = torch.randn(2, TINY["codebook_embed_dim"], 3, 5)
    assert torch.equal(model.quantize.nearest_codes(7.5 * latents), model.quantize.nearest_codes(latents))


def test_checkpoint_file_forms(tmp_path, loaded):
    _, state = loaded
    pixels = smooth_images(1, 32, seed=3)
    expected = Reference(state).codes(Reference(state).latents(pixels))
    as_trained = {"model": state, "optimizer": {"state": {}}, "steps": 10, "args": argparse.Namespace(vq_model="VQ-16")}
    for name, checkpoint in (("trained.pt", as_trained), ("bare.pt", dict(state))):
        torch.save(checkpoint, tmp_path / name)
        model = LlamaGenVQ.from_checkpoint(tmp_path / name, LlamaGenVQConfig(**TINY))
        assert not model.training
        assert torch.equal(model.quantize.codebook_used, state["quantize.codebook_used"])
        assert torch.equal(model.encode(pixels), expected)


def test_bad_checkpoints_name_the_keys(tmp_path, loaded):
    _, state = loaded
    config = LlamaGenVQConfig(**TINY)

    def load(checkpoint):
        path = tmp_path / "vq.pt"
        torch.save(checkpoint, path)
        return LlamaGenVQ.from_checkpoint(path, config)

    without_usage = {k: v for k, v in state.items() if k != "quantize.codebook_used"}
    with pytest.raises(LlamaGenVQCheckpointError, match=r"missing keys 1 \[quantize\.codebook_used\]") as info:
        load({"model": without_usage})
    assert isinstance(info.value, UserError)
    with pytest.raises(LlamaGenVQCheckpointError, match=r"unexpected keys 1 \[encoder\.extra\.weight\]"):
        load({"model": {**state, "encoder.extra.weight": torch.zeros(1)}})
    with pytest.raises(LlamaGenVQCheckpointError, match=r"quantize\.embedding\.weight: checkpoint \(16384, 8\) vs model \(64, 8\)"):
        load({"model": {**state, "quantize.embedding.weight": torch.zeros(16384, 8)}})
    with pytest.raises(LlamaGenVQCheckpointError, match="not tensors"):
        load({"weights": state})
    with pytest.raises(InputNotFoundError, match="missing.pt"):
        LlamaGenVQ.from_checkpoint(tmp_path / "missing.pt", config)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"base_channels": 24}, "tokens.llamagen_vq.base_channels"),
        ({"decoder_ch_mult": (1, 1, 2, 2)}, "tokens.llamagen_vq.encoder_ch_mult"),
        ({"codebook_size": 0}, "tokens.llamagen_vq.codebook_size"),
        ({"dropout_p": 1.5}, "tokens.llamagen_vq.dropout_p"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", "\\.")):
        LlamaGenVQ(LlamaGenVQConfig(**{**TINY, **overrides}))


def test_bad_inputs_are_rejected(loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match="multiple of the tokenizer stride 16"):
        model.encode(torch.zeros(1, 3, 24, 32))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode_codes(torch.full((1, 2, 2), 64))
