"""Chameleon VQGAN: original-checkpoint layout, strict loading, encode/decode, HF vqmodel parity."""

import copy
import json

import pytest
import torch
import yaml
from transformers import ChameleonConfig, ChameleonForConditionalGeneration
from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

from arra_ds.tokens.vocab import build_debug_tokenizer
from arra_ds.tokens.vqgan import VQGAN, VQGANConfig, VQGANError, fit_codebook, hf_vq_state_dict

# f = 16 like Chameleon (5 levels), attention at the 8x8 level of a 32-px reference resolution.
TINY = dict(n_embed=64, embed_dim=8, z_channels=16, ch=32, ch_mult=(1, 1, 2, 1, 1), num_res_blocks=1,
            attn_resolutions=(8,), resolution=32)


def smooth_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """[n, 3, h, w] in [-1, 1]: upsampled noise, so neighbouring patches differ but are not white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, h // 8, w // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def tiny_vqgan() -> VQGAN:
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**TINY))
    usage = fit_codebook(model, model.latents(smooth_images(8, 64, 64, seed=1)).permute(0, 2, 3, 1))
    assert (usage > 0).sum() > 16  # the codebook is spread over the latents, not collapsed
    return model


class LightningHparams:
    """A non-tensor object as Lightning pickles into checkpoints (refused by weights_only loading)."""

    def __init__(self):
        self.lr = 4.5e-6


def save_lightning_style(model: VQGAN, tmp_path, extra_state=None):
    yaml_path, ckpt_path = tmp_path / "vqgan.yaml", tmp_path / "vqgan.ckpt"
    model.save_original(yaml_path, ckpt_path)
    state = torch.load(ckpt_path, weights_only=True)["state_dict"]
    state.update(extra_state or {})
    torch.save({"state_dict": state, "epoch": 7, "hyper_parameters": LightningHparams()}, ckpt_path)
    return yaml_path, ckpt_path


def test_parameter_names_and_shapes_match_chameleon_hf_layout():
    """Our encoder/quantizer keys and shapes equal HF's ChameleonVQVAE for Chameleon's real config."""
    with torch.device("meta"):
        ours = VQGAN(VQGANConfig())  # defaults = Chameleon vqgan.yaml
        hf = ChameleonVQVAE(ChameleonVQVAEConfig())
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items() if not k.startswith("decoder.")}
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours_shapes == hf_shapes
    assert ours_shapes["quantize.embedding.weight"] == (8192, 256)
    assert ours.downsample_factor == 16
    # decoder keys follow taming: up[0] is the full-resolution level, conv_out gives RGB
    decoder = {k: tuple(v.shape) for k, v in ours.state_dict().items() if k.startswith("decoder.")}
    assert decoder["decoder.conv_in.weight"] == (512, 256, 3, 3)
    assert decoder["decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)
    assert decoder["decoder.up.4.upsample.conv.weight"] == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in decoder
    assert decoder["decoder.conv_out.weight"] == (3, 128, 3, 3)


def test_chameleon_yaml_parses_to_defaults(tmp_path):
    text = """
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 8192
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 512
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: []
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {disc_start: 0}
"""
    path = tmp_path / "vqgan.yaml"
    path.write_text(text)
    assert VQGANConfig.from_yaml(path) == VQGANConfig()
    path.write_text(text.replace("      dropout: 0.0", "      dropout: 0.0\n      mystery: 1"))
    with pytest.raises(VQGANError, match="mystery"):
        VQGANConfig.from_yaml(path)


def test_original_checkpoint_loads_strict(tiny_vqgan, tmp_path):
    extra = {"loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4)}  # training-only tensors are dropped
    yaml_path, ckpt_path = save_lightning_style(tiny_vqgan, tmp_path, extra)
    with pytest.raises(Exception):  # the plain weights-only load refuses the pickled hyper-parameter object
        torch.load(ckpt_path, weights_only=True)
    loaded = VQGAN.from_original(yaml_path, ckpt_path)
    for key, value in tiny_vqgan.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    pixels = smooth_images(2, 64, 96, seed=2)
    assert torch.equal(loaded.encode(pixels), tiny_vqgan.encode(pixels))


def test_strict_load_rejects_missing_extra_and_misshaped(tiny_vqgan, tmp_path):
    yaml_path, ckpt_path = save_lightning_style(tiny_vqgan, tmp_path)
    state = torch.load(ckpt_path, weights_only=False)["state_dict"]

    del state["decoder.conv_out.bias"]
    torch.save({"state_dict": state}, ckpt_path)
    with pytest.raises(VQGANError, match="decoder.conv_out.bias"):
        VQGAN.from_original(yaml_path, ckpt_path)

    state["decoder.conv_out.bias"] = torch.zeros(3)
    state["encoder.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, ckpt_path)
    with pytest.raises(VQGANError, match="encoder.extra.weight"):
        VQGAN.from_original(yaml_path, ckpt_path)

    del state["encoder.extra.weight"]
    torch.save({"state_dict": state}, ckpt_path)
    config = yaml.safe_load(yaml_path.read_text())
    config["model"]["params"]["embed_dim"] = 4
    yaml_path.write_text(yaml.safe_dump(config))
    with pytest.raises(VQGANError, match="tensor shapes differ"):
        VQGAN.from_original(yaml_path, ckpt_path)


def test_encode_decode_shapes_and_ranges(tiny_vqgan):
    pixels = smooth_images(3, 64, 96, seed=3)
    codes = tiny_vqgan.encode(pixels)
    assert codes.shape == (3, 4, 6) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < TINY["n_embed"]
    assert codes.unique().numel() > 4  # patches of different content get different codes
    out = tiny_vqgan.decode(codes)
    assert out.shape == (3, 3, 64, 96) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    fast = copy.deepcopy(tiny_vqgan).use_channels_last()
    assert torch.equal(fast.encode(pixels), codes)
    torch.testing.assert_close(fast.decode(codes), out, atol=1e-4, rtol=1e-4)  # same maths, other summation order
    with pytest.raises(ValueError, match="multiple of the VQGAN stride 16"):
        tiny_vqgan.encode(torch.zeros(1, 3, 40, 64))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tiny_vqgan.decode(torch.full((1, 2, 2), TINY["n_embed"]))


def test_codes_match_reference_quantizer(tiny_vqgan):
    """argmin over the codebook equals the brute-force nearest entry (the reference's definition)."""
    pixels = smooth_images(2, 32, 48, seed=4)
    latents = tiny_vqgan.latents(pixels).permute(0, 2, 3, 1)  # [B, h, w, D]
    book = tiny_vqgan.quantize.embedding.weight
    brute = ((latents[..., None, :] - book) ** 2).sum(-1).argmin(-1)
    assert torch.equal(tiny_vqgan.encode(pixels), brute)


def test_hf_vqmodel_gives_same_codes(tiny_vqgan, tmp_path):
    """A HF Chameleon checkpoint (model.vqmodel.*, converted as transformers does) encodes identically."""
    vocab = build_debug_tokenizer(num_image_codes=TINY["n_embed"]).get_vocab(with_added_tokens=True)
    hf_config = ChameleonConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocabulary_map=vocab, vq_config=tiny_vqgan.config.to_hf_vq_config(),
    )
    hf_model = ChameleonForConditionalGeneration(hf_config).eval()
    converted = hf_vq_state_dict(tiny_vqgan.state_dict())
    missing, unexpected = hf_model.load_state_dict(converted, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("model.vqmodel.")]
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    assert json.loads((hf_dir / "config.json").read_text())["vq_config"]["num_embeddings"] == TINY["n_embed"]

    from_hf = VQGAN.from_hf(hf_dir)
    pixels = smooth_images(2, 64, 64, seed=5)
    ours = tiny_vqgan.encode(pixels)
    assert torch.equal(from_hf.encode(pixels), ours)
    with torch.no_grad():
        _, _, hf_codes = hf_model.model.vqmodel.encode(pixels)
    assert torch.equal(hf_codes.view_as(ours), ours)
    with pytest.raises(VQGANError, match="no decoder"):
        from_hf.decode(ours)


def test_validate_rejects_group_norm_incompatible_widths():
    with pytest.raises(VQGANError, match="multiples of 32"):
        VQGAN(VQGANConfig(**{**TINY, "ch": 24}))
