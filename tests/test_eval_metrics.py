"""MS-SSIM (paired and diversity forms) and CLIP-Score with a tiny random open_clip model."""

import numpy as np
import pytest
import torch
from gen_helpers import drawn_image

from arra_ds.eval.clip_score import RANDOM_CLIP_CONTEXT, build_clip_scorer, count_tokens
from arra_ds.eval.msssim import MSSSIMConfig, diversity_ms_ssim, ms_ssim_per_pair

SMALL_WINDOW = MSSSIMConfig(win_size=3)  # 64-px test images; the default window needs > 160 px


def images(indices, size=64):
    return torch.from_numpy(np.stack([drawn_image(i, size) for i in indices])).permute(0, 3, 1, 2).contiguous()


def test_paired_ms_ssim():
    a, b = images([0, 1]), images([0, 2])
    scores = ms_ssim_per_pair(a, b, SMALL_WINDOW)
    assert scores.shape == (2,) and scores.dtype == torch.float64
    assert scores[0].item() == pytest.approx(1.0)
    assert 0 < scores[1].item() < 0.99
    noisy = (a.int() + torch.randint(-40, 40, a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255).to(torch.uint8)
    assert ms_ssim_per_pair(a, noisy, SMALL_WINDOW)[0] < 0.99
    with pytest.raises(ValueError, match="one size"):
        ms_ssim_per_pair(a, images([0, 1], size=96), SMALL_WINDOW)
    with pytest.raises(ValueError, match="at least 161 px"):
        ms_ssim_per_pair(a, b, MSSSIMConfig())


def test_diversity_ms_ssim():
    same = images([3, 3, 3])
    assert diversity_ms_ssim(same, SMALL_WINDOW) == pytest.approx(1.0)
    varied = images([3, 4, 5])
    pairwise = ms_ssim_per_pair(images([3, 3, 4]), images([4, 5, 5]), SMALL_WINDOW).mean().item()
    assert diversity_ms_ssim(varied, SMALL_WINDOW) == pytest.approx(pairwise)
    assert diversity_ms_ssim(varied, SMALL_WINDOW) < 0.99
    with pytest.raises(ValueError, match="two samples"):
        diversity_ms_ssim(images([1]), SMALL_WINDOW)


@pytest.fixture(scope="module")
def clip():
    return build_clip_scorer("random")


def test_clip_score_is_the_cosine_of_the_embeddings(clip):
    batch = images([0, 1, 2])
    texts = ["a red circle", "a green square", "a blue ring"]
    scores = clip.scores(batch, texts)
    assert scores.shape == (3,) and np.all(np.abs(scores) <= 1)
    with torch.no_grad():
        from PIL import Image

        pixels = torch.stack([clip.preprocess(Image.fromarray(drawn_image(i))) for i in range(3)])
        img = clip.model.encode_image(pixels)
        txt = clip.model.encode_text(clip.tokenizer(texts))
        expected = torch.nn.functional.cosine_similarity(img, txt).double().numpy()
    assert np.allclose(scores, expected, atol=1e-6)
    # image i scored against prompt i, not against the whole batch
    assert clip.scores(batch[[1, 0, 2]], [texts[1], texts[0], texts[2]]) == pytest.approx(scores[[1, 0, 2]])


def test_clip_text_length_limit_is_counted_and_handled(clip):
    short = "a red circle"
    long = " ".join(["red circle on the left"] * 20)
    assert count_tokens(clip.tokenizer, short) == int((clip.tokenizer([short])[0] != 0).sum())
    assert clip.truncated([short, long]) == [False, True]
    assert clip.context_length == RANDOM_CLIP_CONTEXT
    # the long prompt is cut to its beginning and still scored
    head = " ".join(long.split()[:40])
    assert clip.scores(images([0, 0]), [long, head]) == pytest.approx([clip.scores(images([0]), [head])[0]] * 2)


def test_clip_spec_errors():
    with pytest.raises(ValueError, match="ARCH:WEIGHTS"):
        build_clip_scorer("ViT-B-32")
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        build_clip_scorer("ViT-B-32:/nonexistent/weights.bin")
