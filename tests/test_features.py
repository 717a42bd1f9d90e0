"""Feature encoders: open_clip (ViT and timm towers) and SAM, aggregations, batching, fp16, no downloads."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import SamModel

from arra_ds.errors import ConfigError
from arra_ds.data.features import (
    EncoderError,
    EncoderSpec,
    build_tiny_open_clip_dir,
    build_tiny_sam_dir,
    load_encoder,
    parse_encoder_arg,
)


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


def batch(encoder, pictures):
    return torch.stack([encoder.preprocess(p) for p in pictures])


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


def test_spec_validation_and_cli_syntax():
    with pytest.raises(ConfigError, match="SAM has no \\[CLS\\]"):
        EncoderSpec("medsam", "sam", model="x", aggregation="cls").validate()
    spec = parse_encoder_arg("biomedclip:avgpool=/models/biomedclip")
    assert (spec.name, spec.aggregation, spec.path, spec.column) == (
        "biomedclip_avgpool", "avgpool", "/models/biomedclip", "feat_biomedclip_avgpool")
    assert parse_encoder_arg("medsam").column == "feat_medsam"
    with pytest.raises(ConfigError, match="unknown encoder 'dino'"):
        parse_encoder_arg("dino")


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
    with pytest.raises(EncoderError, match="is not a directory"):
        load_encoder(EncoderSpec("medsam", "sam", path=str(tmp_path / "missing"), aggregation="avgpool"))
