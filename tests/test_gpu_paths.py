"""Device-only checks of the paths the CPU suite cannot reach: the training forward/backward on CUDA in bf16
(SDPA's flash backend, the Triton kernels compiled for real) and image generation on CUDA.

All `gpu`-marked: skipped without CUDA (tests/conftest.py); bench/gpu/run.sh runs them on the GPU machine.
"""

import pytest
import torch
from gen_helpers import ImageSampler, image_tokens, packed_batch, tiny_backbone, tiny_vqgan
from torch.nn.attention import SDPBackend, sdpa_kernel

from arra_ds.generate.sampling import SamplingConfig
from arra_ds.model.arra import build_model
from arra_ds.tokens.layout import IGNORE_INDEX
from arra_ds.tokens.vocab import tokens_to_image
from arra_ds.train.run_config import load_run_config

pytestmark = pytest.mark.gpu

FEATURE_DIM = 12
SEQ_LEN = 256  # a multiple of 8 and of the flash kernel's tiles; every position real (packed, no padding)


def _model(dtype, device, *overrides):
    cfg = load_run_config(None, [f"align.feature_dim={FEATURE_DIM}", "model.z_loss_weight=1e-4", *overrides])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.align, dtype=dtype).to(device)


def _packed_batch(vocab, rows: int = 2, seed: int = 0) -> dict:
    return packed_batch(vocab, rows, SEQ_LEN, code_side=4, prompt_len=5, feature_dim=FEATURE_DIM, seed=seed)


def _loss_and_grads(model, batch):
    """One training forward + backward (train mode: activation checkpointing is active when configured)."""
    device = next(model.parameters()).device
    model.train()
    out = model({k: v.to(device) for k, v in batch.items()})
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_bf16_training_step_runs_on_flash_attention_and_matches_fp32():
    """The packed training batch takes SDPA's flash backend (no other backend allowed here), with the fused
    kernels compiled for the GPU, and its bf16 loss and gradients agree with the fp32 CPU torch path."""
    cpu = _model(torch.float32, "cpu", "model.attn_implementation=sdpa", "model.fused_kernels=off")
    gpu = _model(torch.bfloat16, "cuda", "model.attn_implementation=sdpa", "model.activation_checkpointing=true")
    gpu.load_state_dict(cpu.state_dict())  # the same weights, rounded to bf16 (a bf16 build draws others)
    batch = _packed_batch(gpu.vocab)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out, grads = _loss_and_grads(gpu, batch)
    assert out.num_aligned > 0
    ref, ref_grads = _loss_and_grads(cpu, batch)
    for name in ("loss", "loss_ar", "loss_gva", "loss_z"):
        torch.testing.assert_close(getattr(out, name).float().cpu(), getattr(ref, name), rtol=2e-2, atol=2e-3)
    assert grads.keys() == ref_grads.keys()
    for name, r in ref_grads.items():
        # bf16 weights and activations: normwise agreement (a wrong gradient is off by O(1))
        g = grads[name].float().cpu()
        assert torch.isfinite(g).all(), name
        assert (g - r).norm() <= 5e-2 * r.norm() + 1e-6, name


def test_padded_batch_matches_eager_attention_on_cuda():
    """Right-padded batches (a mask tensor: SDPA's efficient or math backend) equal eager attention."""
    batch = _packed_batch(_model(torch.float32, "cpu").vocab, rows=3, seed=1)
    for i, keep in enumerate((SEQ_LEN, SEQ_LEN - 37, SEQ_LEN - 101)):
        batch["attention_mask"][i, keep:] = 0
        batch["labels"][i, keep:] = IGNORE_INDEX
    sdpa = _model(torch.float32, "cuda", "model.attn_implementation=sdpa")
    eager = _model(torch.float32, "cuda", "model.attn_implementation=eager")
    eager.load_state_dict(sdpa.state_dict())
    out, grads = _loss_and_grads(sdpa, batch)
    ref, ref_grads = _loss_and_grads(eager, batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-4, atol=1e-5)
    for name, r in ref_grads.items():
        assert (grads[name] - r).norm() <= 1e-3 * r.norm() + 1e-7, name


def test_batched_sampler_on_cuda_is_reproducible_and_decodable():
    backbone, vocab = tiny_backbone(seed=0, attn="sdpa")
    backbone = backbone.to("cuda", torch.bfloat16)
    cfg = SamplingConfig(height=64, width=96, guidance_scale=3.0, image_top_k=40)
    sampler = ImageSampler(backbone, vocab, cfg)
    prompts = [[vocab.id(w) for w in text.split()] for text in ("a red circle", "two blue squares", "green")]
    first = sampler.generate(prompts, [5, 6, 7])
    again = sampler.generate(prompts, [5, 6, 7])
    assert torch.equal(first.codes, again.codes)  # same seeds, same batch: the same images
    assert first.codes.shape == (3, 4, 6)
    for i in range(3):
        assert tokens_to_image(image_tokens(first, i, vocab, cfg), vocab).shape == (4, 6)  # raises unless the layout is exact
    pixels = tiny_vqgan().to("cuda").decode(first.codes.to("cuda"))
    assert pixels.shape == (3, 3, 64, 96)
    assert torch.isfinite(pixels).all() and pixels.min() >= -1 and pixels.max() <= 1
