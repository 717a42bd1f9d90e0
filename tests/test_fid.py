"""Frechet distance, statistics files and the FID feature extractors (random weights, no downloads)."""

import numpy as np
import pytest
import torch

from arra_ds.eval.extractors import WeightsNotFoundError, build_extractor, state_dict_hash, xrv_preprocess
from arra_ds.eval.fid import FeatureStats, StatsMismatchError, frechet_distance, load_stats, mean_and_covariance
from arra_ds.eval.inception import FIDInceptionV3


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def independent_fid(mu1, s1, mu2, s2):
    """tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)): symmetric eigendecompositions, no sqrtm."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ s2 @ root1
    eig = np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig)))


def random_stats(rng, n, d, shift=0.0):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + shift
    return mean_and_covariance(x)


def test_frechet_distance_matches_independent_float64():
    rng = np.random.default_rng(0)
    for d in (1, 5, 64):
        mu1, s1 = random_stats(rng, 400, d)
        mu2, s2 = random_stats(rng, 300, d, shift=0.5)
        ours = frechet_distance(mu1, s1, mu2, s2)
        assert ours == pytest.approx(independent_fid(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
        assert ours > 0
    # float32 inputs are promoted: the result is the float64 one
    assert frechet_distance(mu1.astype(np.float32), s1.astype(np.float32), mu2, s2) == pytest.approx(
        independent_fid(mu1.astype(np.float32).astype(np.float64), s1.astype(np.float32).astype(np.float64), mu2, s2), rel=1e-9
    )


def test_fid_of_a_set_with_itself_is_zero_also_when_singular():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(10, 32))  # N < D: singular covariance, the eps retry path
    mu, sigma = mean_and_covariance(features)
    assert np.linalg.matrix_rank(sigma) < 32
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-4
    other = rng.normal(size=(10, 32)) + 1.0
    assert frechet_distance(mu, sigma, *mean_and_covariance(other)) > 10


def test_singular_product_is_retried_with_eps(monkeypatch):
    """The eps retry: a non-finite (or non-real) root of S1 S2 is recomputed from (S1 + eps I)(S2 + eps I)."""
    import scipy.linalg

    rng = np.random.default_rng(3)
    mu1, s1 = random_stats(rng, 50, 6)
    mu2, s2 = random_stats(rng, 50, 6, shift=1.0)
    real_sqrtm = scipy.linalg.sqrtm
    seen = []

    def failing_once(matrix):
        seen.append(matrix.copy())
        return np.full_like(matrix, np.nan) if len(seen) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    value = frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
    assert len(seen) == 2
    assert np.allclose(seen[1], (s1 + 1e-6 * np.eye(6)) @ (s2 + 1e-6 * np.eye(6)))
    assert value == pytest.approx(independent_fid(mu1, s1, mu2, s2), rel=1e-5)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: real_sqrtm(m) + 5j)
    with pytest.raises(ValueError, match="not real"):
        frechet_distance(mu1, s1, mu2, s2)


def test_large_feature_scales_are_not_refused():
    """Random-weight extractors give features ~1e3: round-off imaginary parts scale with them."""
    rng = np.random.default_rng(4)
    a = np.maximum(rng.normal(size=(12, 300)), 0) * 1000  # ReLU features, N << D
    b = np.maximum(rng.normal(size=(6, 300)) + 0.2, 0) * 1000
    mu1, s1 = mean_and_covariance(a)
    mu2, s2 = mean_and_covariance(b)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(independent_fid(mu1, s1, mu2, s2), rel=1e-6)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_file_round_trip_and_refusal(tmp_path):
    rng = np.random.default_rng(2)
    stats = FeatureStats.from_features(rng.normal(size=(20, 8)), "xrv", "abc123", {"reference": "folder"})
    stats.save(tmp_path / "ref.npz")
    loaded = load_stats(tmp_path / "ref.npz", "xrv", "abc123")
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    assert loaded.num_samples == 20 and loaded.source == {"reference": "folder"}
    with pytest.raises(StatsMismatchError, match="inception"):
        load_stats(tmp_path / "ref.npz", "inception", "abc123")
    with pytest.raises(StatsMismatchError, match="weights"):
        load_stats(tmp_path / "ref.npz", "xrv", "other")
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mu, sigma=stats.sigma)
    with pytest.raises(StatsMismatchError, match="no extractor"):
        load_stats(tmp_path / "pytorch_fid.npz", "xrv", "abc123")


def test_inception_layout_is_pytorch_fid_weights_layout(tmp_path):
    """Names and shapes of torchvision's Inception3(num_classes=1008, aux_logits=False), the layout of
    pt_inception-2015-12-05: such a file loads strictly."""
    from torchvision.models.inception import Inception3

    reference = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    ours = FIDInceptionV3()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }
    weights = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(weights, tmp_path / "pt_inception.pth")
    extractor = build_extractor("inception", str(tmp_path / "pt_inception.pth"))
    assert extractor.weights_hash == state_dict_hash(extractor.network)
    assert torch.equal(extractor.network.Mixed_7c.branch_pool.conv.weight, reference.Mixed_7c.branch_pool.conv.weight)


def test_inception_matches_pytorch_fid_structure():
    """Same weights in torchvision's Inception3 with pytorch-fid's FID patches (average pools that
    ignore padding in the A, C and E blocks, a max pool in Mixed_7c) give the same pool3 features."""
    import torch.nn.functional as F
    import torchvision.models.inception as tv_inception

    torch.manual_seed(0)
    ours = FIDInceptionV3().eval()
    for module in ours.modules():  # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    reference = tv_inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False).eval()
    reference.load_state_dict(ours.state_dict())
    in_last_block = []
    reference.Mixed_7c.register_forward_pre_hook(lambda *_: in_last_block.append(True))
    plain_avg_pool = F.avg_pool2d

    def fid_pool(x, kernel_size, stride=None, padding=0, **kwargs):
        if in_last_block:
            return F.max_pool2d(x, kernel_size, stride, padding)
        return plain_avg_pool(x, kernel_size, stride, padding, count_include_pad=False)

    images = torch.rand(2, 3, 120, 100)
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(tv_inception.F, "avg_pool2d", fid_pool)
        x = 2 * F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) - 1
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
            x = getattr(reference, name)(x)
        expected = x.flatten(1)
    assert in_last_block  # the patch saw the last block
    with torch.no_grad():  # (outside the patch: it replaces torch.nn.functional.avg_pool2d itself)
        assert torch.allclose(ours(images), expected, atol=1e-5)


def test_inception_extractor_random_weights():
    extractor = build_extractor("inception", "random")
    images = torch.randint(0, 256, (2, 3, 80, 64), dtype=torch.uint8)
    features = extractor.extract(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float64
    assert torch.isfinite(features).all() and (features >= 0).all()  # after ReLU + average pool
    assert not torch.equal(features[0], features[1])
    assert build_extractor("inception", "random").weights_hash == extractor.weights_hash  # fixed seed
    with pytest.raises(ValueError, match="uint8"):
        extractor.extract(images.float())


def test_xrv_extractor_random_weights_and_preprocessing(tmp_path):
    extractor = build_extractor("xrv", "random")
    # preprocessing: grey = channel mean, [-1024, 1024], centre crop of the long side, 224 px
    image = torch.zeros(1, 3, 100, 300, dtype=torch.uint8)
    image[..., 100:200] = 255  # the centre square is white, the sides black
    prepared = xrv_preprocess(image)
    assert prepared.shape == (1, 1, 224, 224)
    assert torch.allclose(prepared, torch.full_like(prepared, 1024.0))
    black = xrv_preprocess(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert torch.equal(black, torch.full_like(black, -1024.0))

    # at 224 px no resize happens: exactly torchxrayvision's normalize(img, 255).mean(2)
    import torchxrayvision as xrv

    pixels = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    theirs = torch.from_numpy(xrv.datasets.normalize(pixels, 255).mean(2)[None, None].astype(np.float32))
    ours = xrv_preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    assert torch.allclose(ours, theirs, atol=1e-3)

    features = extractor.extract(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8))
    assert features.shape == (3, 1024) and torch.isfinite(features).all()
    # a torchxrayvision-format weights file (a pickled DenseNet) loads and changes the hash
    torch.manual_seed(5)
    densenet = xrv.models.DenseNet(weights=None)
    torch.save(densenet, tmp_path / "xrv.pt")
    loaded = build_extractor("xrv", str(tmp_path / "xrv.pt"))
    assert loaded.weights_hash != extractor.weights_hash
    assert torch.equal(loaded.network.densenet.features.conv0.weight, densenet.features.conv0.weight)


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="Nothing is downloaded"):
        build_extractor("inception", str(tmp_path / "missing.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not match"):
        build_extractor("xrv", str(tmp_path / "wrong.pth"))
    with pytest.raises(ValueError, match="unknown feature extractor"):
        build_extractor("dino", "random")
