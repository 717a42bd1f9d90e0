"""Feature encoders: open_clip (ViT and timm towers), SAM, transformers vision towers (DINOv2, SigLIP) and timm
models; aggregations, patch features, batching, fp16, frozen and in eval mode, no downloads."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import SamModel

from arra_ds.data.features import (
    EncoderError,
    EncoderSpec,
    build_tiny_open_clip_dir,
    build_tiny_sam_dir,
    load_encoder,
    parse_encoder_arg,
)
from arra_ds.errors import ConfigError

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 56), (64, 48), (33, 33), (80, 20)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_open_clip_dir(tmp_path_factory.mktemp("clip"), seed=1)


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    return build_tiny_sam_dir(tmp_path_factory.mktemp("sam"), seed=2)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    """A tiny random transformers DINOv2 (4 x 4 patches of 7 px at its 28 px crop) + its image processor."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    out = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(4)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=7)).save_pretrained(out)  # fmt: skip
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, image_mean=IMAGENET_MEAN,
                      image_std=IMAGENET_STD).save_pretrained(out)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def dinov2_registers_dir(tmp_path_factory):
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    out = tmp_path_factory.mktemp("dinov2_reg")
    torch.manual_seed(5)
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=7,
        num_register_tokens=2)).save_pretrained(out)  # fmt: skip
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A tiny random transformers SigLIP vision tower (attention-pool head; 4 x 4 patches at 32 px)."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    out = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(6)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                         image_size=32, patch_size=8)).save_pretrained(out)  # fmt: skip
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


TIMM_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory):
    """timm's vit_tiny_patch16_224 at tiny dims, written by timm's own save_for_hf (config.json + safetensors)."""
    import timm
    from timm.models import save_for_hf

    out = tmp_path_factory.mktemp("timm")
    torch.manual_seed(7)
    save_for_hf(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_TINY), out, model_args=TIMM_TINY,
                safe_serialization=True)  # fmt: skip
    return out


def batch(encoder, pictures):
    return torch.stack([encoder.preprocess(p) for p in pictures])


def patch_batch(encoder, pictures):
    return torch.stack([encoder.patch_preprocess(p) for p in pictures])


def test_open_clip_cls_is_encode_image(clip_dir):
    encoder = load_encoder(EncoderSpec("tiny", "open_clip", path=str(clip_dir), aggregation="cls"))
    reference = open_clip.create_model(f"local-dir:{clip_dir}").eval()
    pixels = batch(encoder, images(3))
    assert pixels.shape == (3, 3, 32, 32)
    out = encoder.encode(pixels)
    assert out.dtype == torch.float16 and out.shape == (3, encoder.dim) == (3, 32)
    with torch.no_grad():
        expected = reference.encode_image(pixels)
    torch.testing.assert_close(out.float(), expected.half().float())


def test_open_clip_avgpool_and_concat(clip_dir):
    spec = EncoderSpec("tiny", "open_clip", path=str(clip_dir))
    cls = load_encoder(spec)
    avg = load_encoder(EncoderSpec("tiny", "open_clip", path=str(clip_dir), aggregation="avgpool"))
    cat = load_encoder(EncoderSpec("tiny", "open_clip", path=str(clip_dir), aggregation="concat"))
    pixels = batch(cls, images(2))
    visual = open_clip.create_model(f"local-dir:{clip_dir}").eval().visual
    with torch.no_grad():
        inter = visual.forward_intermediates(pixels, indices=1, normalize_intermediates=True, output_fmt="NLC")
        expected_avg = inter["image_intermediates"][-1].mean(dim=1) @ visual.proj
    torch.testing.assert_close(avg.encode(pixels).float(), expected_avg.half().float())
    assert cat.dim == 2 * cls.dim
    torch.testing.assert_close(cat.encode(pixels), torch.cat([cls.encode(pixels), avg.encode(pixels)], dim=1))
    assert not torch.allclose(cls.encode(pixels).float(), avg.encode(pixels).float())


def test_timm_tower_like_biomedclip(tmp_path):
    """BiomedCLIP's open_clip config uses a timm ViT trunk + linear projection; cls = encode_image."""
    directory = build_tiny_open_clip_dir(tmp_path / "timm", seed=3, image_size=160, timm_model_name="test_vit")
    encoder = load_encoder(EncoderSpec("bmc", "open_clip", path=str(directory)))
    reference = open_clip.create_model(f"local-dir:{directory}").eval()
    pixels = batch(encoder, images(2, seed=1))
    with torch.no_grad():
        expected = reference.encode_image(pixels)
    torch.testing.assert_close(encoder.encode(pixels).float(), expected.half().float())
    avg = load_encoder(EncoderSpec("bmc", "open_clip", path=str(directory), aggregation="avgpool"))
    assert avg.encode(pixels).shape == (2, 32)


def test_preprocess_constants_come_from_the_config(clip_dir, sam_dir):
    grey = Image.new("RGB", (50, 70), (51, 102, 153))
    clip = load_encoder(EncoderSpec("tiny", "open_clip", path=str(clip_dir)))
    pixels = clip.preprocess(grey)
    expected = (torch.tensor([51, 102, 153]) / 255 - 0.5) / 0.25  # mean 0.5, std 0.25 in open_clip_config.json
    torch.testing.assert_close(pixels[:, 16, 16], expected, atol=1e-5, rtol=0)
    sam = load_encoder(EncoderSpec("tsam", "sam", path=str(sam_dir), aggregation="avgpool"))
    sam_pixels = sam.preprocess(grey)
    assert sam_pixels.shape == (3, 64, 64)  # longest side 64, padded to 64 x 64 (preprocessor_config.json)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(sam_pixels[:, 10, 10], (torch.tensor([51, 102, 153]) / 255 - mean) / std, atol=1e-4, rtol=0)


def test_sam_avgpool_matches_reference(sam_dir):
    encoder = load_encoder(EncoderSpec("tsam", "sam", path=str(sam_dir), aggregation="avgpool"))
    pixels = batch(encoder, images(3))
    reference = SamModel.from_pretrained(sam_dir).eval()
    with torch.no_grad():
        expected = reference.vision_encoder(pixel_values=pixels).last_hidden_state.mean(dim=(2, 3))
    out = encoder.encode(pixels)
    assert out.shape == (3, 16) and encoder.dim == 16 and out.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected.half().float())


def test_batched_equals_one_at_a_time(clip_dir, sam_dir):
    for spec in (EncoderSpec("t", "open_clip", path=str(clip_dir)), EncoderSpec("s", "sam", path=str(sam_dir), aggregation="avgpool")):
        encoder = load_encoder(spec)
        pixels = batch(encoder, images(4))
        single = torch.cat([encoder.encode(pixels[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(encoder.encode(pixels).float(), single.float(), atol=2e-3, rtol=2e-3)


def test_open_clip_and_sam_patch_features(clip_dir, sam_dir):
    """Patch tokens through the same projection as the global feature: their mean is the avgpool feature."""
    encoder = load_encoder(EncoderSpec("tiny", "open_clip", path=str(clip_dir), aggregation="avgpool"))
    pixels = patch_batch(encoder, images(2))
    visual = open_clip.create_model(f"local-dir:{clip_dir}").eval().visual
    with torch.no_grad():
        inter = visual.forward_intermediates(pixels, indices=1, normalize_intermediates=True, output_fmt="NLC")
        expected = inter["image_intermediates"][-1] @ visual.proj  # [B, 16, 32]
    patches = encoder.encode_patches(pixels)
    assert patches.shape == (2, 16, 32) and patches.dtype == torch.float16
    torch.testing.assert_close(patches.float(), expected.half().float())
    torch.testing.assert_close(patches.float().mean(dim=1), encoder.encode(pixels).float(), atol=2e-3, rtol=2e-3)

    sam = load_encoder(EncoderSpec("tsam", "sam", path=str(sam_dir), aggregation="avgpool"))
    pixels = patch_batch(sam, images(2))
    assert pixels.shape == (2, 3, 64, 64)  # the whole picture resized to the padded input, no padding
    with torch.no_grad():
        neck = SamModel.from_pretrained(sam_dir).eval().vision_encoder(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(sam.encode_patches(pixels).float(), neck.flatten(2).transpose(1, 2).half().float())


def test_patch_preprocess_resizes_the_whole_picture(clip_dir):
    """The encoder's own preprocessing centre-crops; patch features must see what the VQ codes see."""
    picture = images(1)[0].resize((64, 32))  # wide: a centre crop would cut its sides
    encoder = load_encoder(EncoderSpec("tiny", "open_clip", path=str(clip_dir)))
    patch_pixels = encoder.patch_preprocess(picture)
    expected = (np.asarray(picture.resize((32, 32), Image.Resampling.BICUBIC), np.float32) / 255 - 0.5) / 0.25
    torch.testing.assert_close(patch_pixels, torch.from_numpy(expected.transpose(2, 0, 1)).contiguous())
    assert not torch.allclose(patch_pixels, encoder.preprocess(picture))


@pytest.mark.parametrize("registers", [False, True])
def test_hf_dinov2_cls_avgpool_and_patches(dinov2_dir, dinov2_registers_dir, registers):
    from transformers import AutoImageProcessor, AutoModel

    directory = dinov2_registers_dir if registers else dinov2_dir
    pictures = images(3)
    reference = AutoModel.from_pretrained(directory).eval()
    processor = AutoImageProcessor.from_pretrained(directory, use_fast=False)
    pixels = processor(images=[p.convert("RGB") for p in pictures], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = reference(pixel_values=pixels)
    prefix = 1 + (2 if registers else 0)  # [CLS] and the register tokens come before the 16 patches
    cls = load_encoder(EncoderSpec("dino", "hf", path=str(directory)))
    torch.testing.assert_close(batch(cls, pictures), pixels)  # the checkpoint's own processor (resize, crop 28)
    assert cls.dim == 32
    torch.testing.assert_close(cls.encode(pixels).float(), out.pooler_output.half().float())
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])  # [CLS] after the final layernorm
    avg = load_encoder(EncoderSpec("dino", "hf", path=str(directory), aggregation="avgpool"))
    torch.testing.assert_close(avg.encode(pixels).float(), out.last_hidden_state[:, prefix:].mean(1).half().float())
    patches = cls.encode_patches(pixels)
    assert patches.shape == (3, 16, 32)
    torch.testing.assert_close(patches.float(), out.last_hidden_state[:, prefix:].half().float())
    assert patch_batch(cls, pictures).shape == (3, 3, 28, 28)  # the crop's size, the whole picture


def test_hf_siglip_pooled_head_and_patches(siglip_dir):
    from transformers import SiglipImageProcessor, SiglipVisionModel

    pictures = images(2)
    reference = SiglipVisionModel.from_pretrained(siglip_dir).eval()
    pixels = SiglipImageProcessor.from_pretrained(siglip_dir)(images=[p.convert("RGB") for p in pictures],
                                                              return_tensors="pt")["pixel_values"]  # fmt: skip
    with torch.no_grad():
        out = reference(pixel_values=pixels)
    encoder = load_encoder(EncoderSpec("siglip", "hf", path=str(siglip_dir)))
    torch.testing.assert_close(batch(encoder, pictures), pixels)
    torch.testing.assert_close(encoder.encode(pixels).float(), out.pooler_output.half().float())  # attention-pool head
    torch.testing.assert_close(encoder.encode_patches(pixels).float(), out.last_hidden_state.half().float())
    concat = load_encoder(EncoderSpec("siglip", "hf", path=str(siglip_dir), aggregation="concat"))
    assert concat.dim == 64 and concat.encode(pixels).shape == (2, 64)


def test_timm_model_pooling_and_patches(timm_dir):
    import timm
    from timm.data import create_transform, resolve_model_data_config

    pictures = images(2)
    reference = timm.create_model(f"local-dir:{timm_dir}", pretrained=True).eval()
    transform = create_transform(**resolve_model_data_config(reference), is_training=False)
    pixels = torch.stack([transform(p.convert("RGB")) for p in pictures])
    with torch.no_grad():
        tokens = reference.forward_features(pixels)
        pooled = reference.forward_head(tokens, pre_logits=True)
    encoder = load_encoder(EncoderSpec("vit", "timm", path=str(timm_dir)))
    torch.testing.assert_close(batch(encoder, pictures), pixels)  # timm's eval transform from its pretrained_cfg
    torch.testing.assert_close(encoder.encode(pixels).float(), pooled.half().float())
    torch.testing.assert_close(encoder.encode_patches(pixels).float(), tokens[:, 1:].half().float())
    avg = load_encoder(EncoderSpec("vit", "timm", path=str(timm_dir), aggregation="avgpool"))
    torch.testing.assert_close(avg.encode(pixels).float(), tokens[:, 1:].mean(1).half().float())


def test_every_encoder_is_frozen_and_in_eval_mode(clip_dir, sam_dir, dinov2_dir, siglip_dir, timm_dir, tmp_path):
    """An encoder left in train mode changes the targets (REPA issue 45); dropout makes it visible."""
    timm_tower = build_tiny_open_clip_dir(tmp_path / "timm_tower", seed=3, image_size=160, timm_model_name="test_vit")
    specs = [
        EncoderSpec("a", "open_clip", path=str(clip_dir)), EncoderSpec("b", "open_clip", path=str(timm_tower)),
        EncoderSpec("c", "sam", path=str(sam_dir), aggregation="avgpool"), EncoderSpec("d", "hf", path=str(dinov2_dir)),
        EncoderSpec("e", "hf", path=str(siglip_dir)), EncoderSpec("f", "timm", path=str(timm_dir)),
    ]  # fmt: skip
    assert {spec.kind for spec in specs} == {"open_clip", "sam", "hf", "timm"}
    for spec in specs:
        encoder = load_encoder(spec)
        modules = list(encoder.modules())
        assert len(modules) > 3 and all(not m.training for m in modules), spec
        assert all(not p.requires_grad for p in encoder.parameters()), spec


def test_spec_validation_and_cli_syntax():
    with pytest.raises(ConfigError, match="SAM has no \\[CLS\\]"):
        EncoderSpec("medsam", "sam", model="x", aggregation="cls").validate()
    spec = parse_encoder_arg("biomedclip:avgpool=/models/biomedclip")
    assert (spec.name, spec.aggregation, spec.path, spec.column) == (
        "biomedclip_avgpool", "avgpool", "/models/biomedclip", "feat_biomedclip_avgpool")
    assert parse_encoder_arg("medsam").column == "feat_medsam"
    with pytest.raises(ConfigError, match="unknown encoder 'dino'"):
        parse_encoder_arg("dino")
    dinov2 = parse_encoder_arg("dinov2=/models/dinov2-base")
    assert (dinov2.kind, dinov2.path, dinov2.column) == ("hf", "/models/dinov2-base", "feat_dinov2")
    assert parse_encoder_arg("timm:avgpool=/models/vit").column == "feat_timm_avgpool"
    with pytest.raises(ConfigError, match="timm encoder loads from a local directory"):
        parse_encoder_arg("timm")


def test_nothing_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr("transformers.utils.hub.TRANSFORMERS_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(EncoderError, match="not in the local Hugging Face cache"):
        load_encoder(parse_encoder_arg("clip"))
    with pytest.raises(EncoderError, match="not in the local Hugging Face cache"):
        load_encoder(parse_encoder_arg("biomedclip"))
    with pytest.raises(EncoderError, match="without downloading"):
        load_encoder(parse_encoder_arg("medsam"))
    with pytest.raises(EncoderError, match="without downloading"):
        load_encoder(parse_encoder_arg("dinov2"))
    with pytest.raises(EncoderError, match="must be a directory with config.json"):
        load_encoder(EncoderSpec("vit", "timm", path=str(tmp_path)))
    with pytest.raises(EncoderError, match="is not a directory"):
        load_encoder(EncoderSpec("medsam", "sam", path=str(tmp_path / "missing"), aggregation="avgpool"))
