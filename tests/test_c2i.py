"""Class-conditional sampling and evaluation: CFG with KV cache against a full-forward reference, top-k / top-p,
determinism, Inception Score, ADM reference batches, and launch/eval.py on a LlamaGen model, one and two ranks."""

import json
import subprocess
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from arra_ds.errors import ConfigError
from arra_ds.eval.extractors import build_extractor
from arra_ds.eval.fid import FeatureStats, StatsMismatchError, load_adm_reference_batch, read_reference
from arra_ds.eval.inception import POOL3_DIM, FIDInceptionV3
from arra_ds.eval.inception_score import class_probabilities, inception_score
from arra_ds.eval.runner import EvalConfig, run_eval
from arra_ds.generate.pipeline import build_samples
from arra_ds.generate.prompts import prompts_from_classes
from arra_ds.generate.sampler import Sampler
from arra_ds.generate.sampling import SamplingConfig, draw_codes, restrict_to_top_p, seed_for_sample
from arra_ds.model.llamagen.backbone import LLAMAGEN
from tests.conftest import REPO_ROOT, free_port, launcher, subprocess_env
from tests.llamagen_helpers import GRID, IMAGE_SIZE, TINY_GPT, TINY_VQ, save_tiny_vq, tiny_gpt


def ClassSamplingConfig(**keys) -> SamplingConfig:
    """Sampling settings resolved as the engine resolves them for a LlamaGen model."""
    return SamplingConfig(**keys).with_defaults(LLAMAGEN.sampling_defaults)


class ClassSampler:
    """The one sampler on a LlamaGen GPT: class ids -> codes [B, grid, grid]."""

    def __init__(self, model, cfg: SamplingConfig):
        self.sampler = Sampler(LLAMAGEN, model, None, cfg, (model.config.grid_size, model.config.grid_size))

    def generate(self, class_ids, seeds):
        return self.sampler.generate(class_ids, seeds).codes


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def upstream_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """LlamaGen's top_k_top_p_filtering (Hugging Face's), written out independently."""
    logits = logits.clone()
    if top_k > 0:
        logits[logits < torch.topk(logits, top_k)[0][..., -1, None]] = float("-inf")
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(1, sorted_indices, remove)] = float("-inf")
    return logits


@pytest.mark.parametrize("top_k, top_p", [(0, 0.6), (5, 0.9), (3, 1.0), (0, 1.0)])
def test_top_k_top_p_keep_what_upstream_keeps(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g) * 3
    expected = torch.isfinite(upstream_filter(logits, top_k, top_p))
    if top_k:
        values, indices = logits.topk(top_k)
        kept = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    else:
        kept = logits
    assert torch.equal(torch.isfinite(restrict_to_top_p(kept, top_p)), expected)
    # every draw lands inside the kept set; the distribution over it is softmax of the kept logits
    cfg = ClassSamplingConfig(image_top_k=top_k, top_p=top_p)
    for u in torch.linspace(0, 0.999, 7, dtype=torch.float64):
        codes = draw_codes(logits, cfg, torch.full((6,), float(u), dtype=torch.float64))
        assert expected.gather(1, codes[:, None]).all()


def reference_codes(model, labels, cfg: ClassSamplingConfig) -> torch.Tensor:
    """Greedy CFG decoding with a full forward over the whole prefix at every step (no KV cache)."""
    codes = torch.zeros((len(labels), 0), dtype=torch.long)
    null = torch.full_like(labels, model.null_class_id)
    for index in range(model.config.block_size):
        cond = model(labels, codes)[:, -1]
        if cfg.guides(index):
            uncond = model(null, codes)[:, -1]
            cond = uncond + cfg.guidance_scale * (cond - uncond)
        codes = torch.cat([codes, cond.argmax(-1, keepdim=True)], dim=1)
    return codes.view(len(labels), GRID, GRID)


@pytest.mark.parametrize("cfg_scale, cfg_interval", [(1.0, -1), (2.5, -1), (4.0, 3)])
def test_cached_cfg_sampling_matches_full_forward_reference(cfg_scale, cfg_interval):
    model = tiny_gpt()
    cfg = ClassSamplingConfig(guidance_scale=cfg_scale, guidance_interval=cfg_interval, temperature=0.0)
    labels = torch.tensor([0, 2, 1])
    codes = ClassSampler(model, cfg).generate(labels.tolist(), [1, 2, 3])
    assert codes.shape == (3, GRID, GRID) and codes.dtype == torch.long
    assert torch.equal(codes, reference_codes(model, labels, cfg))
    if cfg_interval >= 0:
        assert [cfg.guides(i) for i in range(7)] == [True] * (cfg_interval + 2) + [False] * (5 - cfg_interval)


def test_sampling_is_deterministic_per_sample_and_guidance_matters():
    model = tiny_gpt()
    sampler = ClassSampler(model, ClassSamplingConfig(guidance_scale=2.0, image_top_k=20, top_p=0.95))
    seeds = [seed_for_sample(7, k) for k in range(4)]
    first = sampler.generate([0, 1, 2, 1], seeds)
    assert torch.equal(first, sampler.generate([0, 1, 2, 1], seeds))
    assert torch.equal(first[2:3], sampler.generate([2], seeds[2:3]))  # independent of batch mates
    assert not torch.equal(first[1], first[3])  # same class, other seed
    unguided = ClassSampler(model, ClassSamplingConfig(guidance_scale=1.0, image_top_k=20, top_p=0.95)).generate([0, 1, 2, 1], seeds)
    assert not torch.equal(first, unguided)
    assert int(first.min()) >= 0 and int(first.max()) < TINY_GPT["vocab_size"]


def test_sampling_settings_are_checked():
    with pytest.raises(ConfigError, match="guidance_scale"):
        ClassSamplingConfig(guidance_scale=0.0).validate()
    with pytest.raises(ConfigError, match="top_p"):
        ClassSamplingConfig(top_p=0.0).validate()
    with pytest.raises(ConfigError, match="null class"):
        ClassSampler(tiny_gpt(class_dropout_prob=0.0), ClassSamplingConfig(guidance_scale=2.0)).generate([0], [0])
    with pytest.raises(ValueError, match="class ids"):
        ClassSampler(tiny_gpt(), ClassSamplingConfig()).generate([5], [0])
    specs = build_samples(prompts_from_classes([4, 9]), 3, base_seed=1)
    assert [(s.index, s.prompt.class_id) for s in specs] == [(0, 4), (1, 4), (2, 4), (3, 9), (4, 9), (5, 9)]
    assert specs[4].seed == seed_for_sample(1, 4) and specs[4].file_name == "000004.png"


# ------------------------------------------------------------------------------------------------
# Inception Score and reference statistics
# ------------------------------------------------------------------------------------------------


def test_inception_score_of_known_distributions():
    classes = 10
    assert inception_score(np.full((40, classes), 1.0 / classes)) == pytest.approx(1.0)
    one_hot = np.eye(classes)[np.arange(40) % classes]
    assert inception_score(one_hot) == pytest.approx(classes)
    # splits are scored separately and averaged: one split of 2 classes, one of 5
    two_then_five = np.concatenate([np.eye(classes)[np.arange(20) % 2], np.eye(classes)[np.arange(20) % 5]])
    assert inception_score(two_then_five, split_size=20) == pytest.approx((2 + 5) / 2)
    # one split: confident predictions give exp(entropy of the class marginal), 0.35 / 0.35 / 0.1 / 0.1 / 0.1
    marginal = np.array([14, 14, 4, 4, 4]) / 40
    assert inception_score(two_then_five) == pytest.approx(np.exp(-(marginal * np.log(marginal)).sum()))


def test_class_probabilities_use_the_classifier_without_bias():
    torch.manual_seed(0)
    network = FIDInceptionV3()
    pool3 = np.random.default_rng(0).random((3, POOL3_DIM))
    probs = class_probabilities(pool3, network)
    expected = torch.softmax(torch.from_numpy(pool3) @ network.fc.weight.detach().double().t(), dim=-1).numpy()
    assert probs.shape == (3, 1008) and np.allclose(probs, expected) and np.allclose(probs.sum(1), 1)


def test_reference_files_of_both_kinds(tmp_path):
    extractor = build_extractor("inception", "random")
    rng = np.random.default_rng(1)
    ours = FeatureStats.from_features(rng.normal(size=(4, 3)), "inception", extractor.weights_hash)
    ours.save(tmp_path / "ours.npz")
    stats, note = read_reference(str(tmp_path / "ours.npz"), extractor.name, extractor.weights_hash)
    assert note is None and np.array_equal(stats.mu, ours.mu)
    FeatureStats(ours.mu, ours.sigma, 4, "inception", "other weights").save(tmp_path / "other.npz")
    with pytest.raises(StatsMismatchError, match="other weights"):
        read_reference(str(tmp_path / "other.npz"), extractor.name, extractor.weights_hash)
    np.savez(tmp_path / "adm.npz", mu=ours.mu, sigma=ours.sigma)
    stats, note = read_reference(str(tmp_path / "adm.npz"), extractor.name, extractor.weights_hash)
    assert "ADM reference batch" in note and np.array_equal(stats.sigma, ours.sigma)


def test_adm_reference_batch(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 6))
    stats = FeatureStats.from_features(features, "inception", "h")
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, mu=stats.mu.astype(np.float32), sigma=stats.sigma, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    loaded = load_adm_reference_batch(path)
    assert np.allclose(loaded.mu, stats.mu, atol=1e-6) and np.array_equal(loaded.sigma, stats.sigma)
    assert loaded.extractor == "inception" and loaded.source["format"] == "ADM reference batch"
    np.savez(tmp_path / "other.npz", arr_0=np.zeros(3))
    with pytest.raises(StatsMismatchError, match="mu"):
        load_adm_reference_batch(tmp_path / "other.npz")


# ------------------------------------------------------------------------------------------------
# launch/eval.py on a released-format LlamaGen file
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("c2i_eval")
    torch.save({"model": tiny_gpt().state_dict()}, root / "c2i_tiny.pt")  # an upstream-format checkpoint
    save_tiny_vq(root / "vq.pt")
    (root / "vq.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(asdict(TINY_VQ)))))  # its architecture
    rng = np.random.default_rng(0)
    stats = FeatureStats.from_features(rng.normal(size=(8, POOL3_DIM)), "inception", "adm")
    np.savez(root / "ref.npz", mu=stats.mu, sigma=stats.sigma)  # ADM's format: no extractor name
    return root


def eval_args(root, out, fid: bool = False) -> list[str]:
    """4 samples in chunks of 3 and 1. FID (a 2048 x 2048 matrix square root, a minute on a busy core) only
    where it is what the test is about."""
    llamagen = [f"backbone.llamagen.{k}={v}" for k, v in TINY_GPT.items()]
    return [
        f"model={root / 'c2i_tiny.pt'}", f"vqgan_checkpoint={root / 'vq.pt'}", f"vqgan_config={root / 'vq.yaml'}",
        *([f"reference_stats={{inception: {root / 'ref.npz'}}}"] if fid else []),
        "extractor_weights={inception: random}", "classes=[0,2]", "samples_per_prompt=2", "batch_size=3",
        f"output_dir={out}", "sampling.image_top_k=20", "progress_bar=false", "ms_ssim=false", *llamagen,
    ]


def eval_config(root, out, fid: bool = False) -> EvalConfig:
    from arra_ds.config import apply_overrides, from_dict  # the launcher's own parsing of key=value

    return from_dict(EvalConfig, apply_overrides({}, eval_args(root, out, fid)))


def test_eval_writes_images_and_report_and_resumes(eval_assets, tmp_path):
    out = tmp_path / "eval"
    report = run_eval(eval_config(eval_assets, out))
    images = sorted((out / "images").glob("*.png"))
    assert [p.name for p in images] == [f"{k:06d}.png" for k in range(4)]
    assert Image.open(images[0]).size == (IMAGE_SIZE, IMAGE_SIZE)
    manifest = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [m["class_id"] for m in manifest] == [0, 0, 2, 2]
    assert report["generation"] == {"generated": 4, "reused": 0}
    score = report["metrics"]["inception_score"]
    assert 1.0 <= score <= 2.0 and report["metrics"]["fid_inception"] is None  # FID: test_two_ranks_write_what_one_rank_writes
    assert report["checkpoint"]["kind"] == "llamagen_checkpoint"
    assert json.loads((out / "report.json").read_text())["metrics"] == report["metrics"]

    first = (out / "images" / "000003.png").read_bytes()
    (out / "images" / "000003.png").unlink()
    again = run_eval(eval_config(eval_assets, out))
    assert again["generation"] == {"generated": 1, "reused": 3}
    assert (out / "images" / "000003.png").read_bytes() == first
    assert again["metrics"] == {"fid_inception": None, "inception_score": pytest.approx(score), "ms_ssim_paired": None,
                                "ms_ssim_diversity": None, "clip_score": None}


def test_eval_settings_are_checked(eval_assets, tmp_path):
    cfg = eval_config(eval_assets, tmp_path / "x")
    cfg.classes = [0, 7]
    with pytest.raises(ConfigError, match="the model has 3 classes"):
        run_eval(cfg)
    cfg = eval_config(eval_assets, tmp_path / "x")
    cfg.vqgan_checkpoint = str(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="vqgan_checkpoint"):
        run_eval(cfg)


@pytest.mark.slow
def test_two_ranks_write_what_one_rank_writes(eval_assets, tmp_path):
    one = tmp_path / "one"
    single = run_eval(eval_config(eval_assets, one, fid=True))
    assert np.isfinite(single["metrics"]["fid_inception"]) and single["metrics"]["fid_inception"] > 0
    assert any("ADM reference batch" in note for note in single["notes"])
    assert single["reference"]["inception"]["source"]["format"] == "ADM reference batch"
    two = tmp_path / "two"
    cmd = [launcher("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "launch/eval.py",
           *eval_args(eval_assets, two)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for k in range(4):
        assert (two / "images" / f"{k:06d}.png").read_bytes() == (one / "images" / f"{k:06d}.png").read_bytes()
    report = json.loads((two / "report.json").read_text())  # same PNGs: the same features, so the same FID
    assert report["world_size"] == 2 and report["metrics"]["inception_score"] == single["metrics"]["inception_score"]
