"""Janus-Pro (model.source=janus) against stock transformers on a tiny random Janus: the VQ tokenizer, the ARRA
losses, sampling, the sample layout; the whole chain (README commands, 2-rank ZeRO-3, resume) is in
tests/test_janus_chain.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from janus_helpers import GRID, IMAGE_SIZE, NUM_CODES, save_tiny_janus, tiny_janus
from streaming import MDSWriter
from transformers import GenerationConfig, JanusForConditionalGeneration
from transformers.models.janus.modeling_janus import JanusVQVAE

from arra_ds.config import load_dataclass_config, to_dict
from arra_ds.data.schema import columns_for
from arra_ds.errors import ConfigError
from arra_ds.generate.prompts import load_prompts
from arra_ds.generate.sampler import Sampler
from arra_ds.generate.sampling import SamplingConfig
from arra_ds.model.arra import AlignConfig, build_model
from arra_ds.model.config import ModelConfig
from arra_ds.model.interface import LMHeadWithLoss
from arra_ds.model.janus import JanusModelConfig
from arra_ds.tokens import janus as layout
from arra_ds.tokens.layout import IGNORE_INDEX
from arra_ds.tokens.llamagen_vq import LlamaGenVQ
from arra_ds.train.run_config import RunConfig

PROMPTS = ["a red circle at the top left", "two blue squares", "a green cross in the center on a white background"]
FEATURE_DIM = 8
ALIGN_LAYER = 1


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    return save_tiny_janus(tmp_path_factory.mktemp("janus") / "Janus-Pro-tiny")


def janus_cfg(path, **keys) -> ModelConfig:
    cfg = ModelConfig(source="janus", path=str(path), attn_implementation="eager", **keys)
    cfg.validate()
    return cfg


def stock(path) -> JanusForConditionalGeneration:
    return JanusForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()


# ---- the VQ tokenizer ------------------------------------------------------------------------------------------


def test_vq_codes_and_pixels_equal_transformers_janus_vqvae():
    """tokens/llamagen_vq.py with the Janus checkpoint's tensors (renamed) encodes and decodes as JanusVQVAE does
    (codebook rows are unit vectors, as Janus keeps them; see tokens/janus.py for why that matters to encode)."""
    model, _ = tiny_janus(seed=3)
    hf_vq: JanusVQVAE = model.model.vqmodel
    vq = LlamaGenVQ(layout.llamagen_vq_config(model.config.vq_config.to_dict()))
    vq.load_upstream_state(layout.llamagen_vq_state(model.state_dict()), source="tiny Janus")
    pixels = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        _, _, hf_codes = hf_vq.encode(pixels)
        codes = vq.encode(pixels)  # [B, GRID, GRID]
        assert torch.equal(codes.flatten(), hf_codes)
        other = torch.randint(0, NUM_CODES, (3, GRID, GRID), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(vq.decode(other), hf_vq.decode(other.flatten(1)), rtol=1e-4, atol=1e-5)
    assert vq.downsample_factor == 16


# ---- the losses ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused_kernels", ["off", "on"])  # "on": the Triton kernel (interpreted on CPU)
def test_a_head_with_a_bias_gives_the_loss_of_its_full_logits(fused_kernels):
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(48, 16, generator=g))
    bias = torch.nn.Parameter(torch.randn(48, generator=g))
    hidden = torch.randn(10, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 48, (10,), generator=g)
    head = LMHeadWithLoss(weight, z_loss_weight=0.1, chunk_size=4, fused_kernels=fused_kernels, bias=bias)
    loss, ce, z = head(hidden, targets=targets)
    logits = F.linear(hidden, weight, bias)
    torch.testing.assert_close(head(hidden), logits)
    reference = F.cross_entropy(logits, targets) + 0.1 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    expected = torch.autograd.grad(reference, (hidden, weight, bias))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)



def make_batch(tokenizer, vocab, seed: int = 0) -> tuple[dict, list[tuple[list[int], torch.Tensor]]]:
    """Two samples of different prompt lengths, right-padded as the loader's Collator pads."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for text in PROMPTS[:2]:
        codes = torch.randint(0, NUM_CODES, (GRID, GRID), generator=g)
        tokens, prompt_len = vocab.sample_tokens(layout.encode_prompt(tokenizer, vocab, text), codes)
        samples.append((tokens, prompt_len))
    length = max(len(t) for t, _ in samples) + 3
    input_ids = torch.full((2, length), vocab.pad_id)
    labels = torch.full((2, length), IGNORE_INDEX)
    mask = torch.zeros((2, length), dtype=torch.long)
    for i, (tokens, prompt_len) in enumerate(samples):
        input_ids[i, : len(tokens)] = torch.tensor(tokens)
        labels[i, prompt_len : len(tokens)] = torch.tensor(tokens[prompt_len:])
        mask[i, : len(tokens)] = 1
    features = torch.randn(2, FEATURE_DIM, generator=g)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "target_features": features}, samples


def test_losses_equal_an_independent_computation_with_stock_modules(janus_dir):
    z_weight = 1e-2
    cfg = janus_cfg(janus_dir, z_loss_weight=z_weight, janus=JanusModelConfig(prompt_dropout=0.0))
    model = build_model(cfg, AlignConfig(layer=ALIGN_LAYER, feature_dim=FEATURE_DIM))
    vocab, tokenizer = cfg.backbone.vocab(cfg), cfg.backbone.text_tokenizer(cfg)
    batch, samples = make_batch(tokenizer, vocab)
    out = model(batch)

    # the same batch through stock transformers, one sample at a time: text embeddings for the prompt, the
    # documented image-generation embeddings for the codes, the language model, the generation head
    reference = stock(janus_dir)
    ce_terms, z_terms, gva_per_sample = [], [], []
    head = model.align_head
    with torch.no_grad():
        for i, (tokens, prompt_len) in enumerate(samples):
            text = reference.get_input_embeddings()(torch.tensor([tokens[:prompt_len]]))
            image = reference.prepare_embeddings_for_image_generation(torch.tensor([tokens[prompt_len:]]))
            lm = reference.model.language_model(inputs_embeds=torch.cat([text, image], dim=1), output_hidden_states=True)
            predicting = slice(prompt_len - 1, len(tokens) - 1)  # <begin_of_image> .. the last code but one
            logits = reference.model.generation_head(lm.last_hidden_state[0, predicting]).float()  # [h*w, K]
            targets = torch.tensor(tokens[prompt_len:])
            ce_terms.append(F.cross_entropy(logits, targets, reduction="none"))
            z_terms.append(torch.logsumexp(logits, dim=-1).square())
            layer = lm.hidden_states[ALIGN_LAYER][0, predicting]
            projected = head.fc2(F.gelu(head.fc1(layer)))
            gva_per_sample.append((1 - F.cosine_similarity(projected, batch["target_features"][i][None], dim=-1)).mean())
    ce, z = torch.cat(ce_terms).mean(), torch.cat(z_terms).mean()
    torch.testing.assert_close(out.loss_ar, ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss_z, z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss_gva, torch.stack(gva_per_sample).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ce + z_weight * z + out.loss_gva, rtol=1e-5, atol=1e-6)
    assert out.num_tokens == out.num_aligned == 2 * GRID * GRID
    out.loss.backward()  # every trained tensor, the generation head's bias included, gets a gradient
    assert model.backbone.model.generation_head.vision_head.bias.grad.abs().sum() > 0
    assert model.backbone.model.generation_embeddings.weight.grad.abs().sum() > 0


def test_prompt_dropout_gives_the_unconditional_prompt_in_training_only(janus_dir):
    cfg = janus_cfg(janus_dir, janus=JanusModelConfig(prompt_dropout=0.999999))
    adapter = cfg.backbone.build(cfg, torch.float32, None, None)
    vocab, tokenizer = cfg.backbone.vocab(cfg), cfg.backbone.text_tokenizer(cfg)
    batch, samples = make_batch(tokenizer, vocab)
    is_code = batch["labels"] != IGNORE_INDEX
    dropped = adapter.drop_prompts(batch["input_ids"], is_code)
    for i, (tokens, prompt_len) in enumerate(samples):
        uncond = vocab.framed(vocab.unconditional_prompt(tokens[1 : prompt_len - 1]))
        assert dropped[i, :prompt_len].tolist() == uncond  # BOS, pads, <begin_of_image>: what sampling guides with
        assert torch.equal(dropped[i, prompt_len:], batch["input_ids"][i, prompt_len:])
    adapter.module.eval()
    eval_hidden = adapter.run(batch).hidden
    adapter.prompt_dropout = 0.0
    assert torch.equal(adapter.run(batch).hidden, eval_hidden)  # no dropout outside training
    with pytest.raises(ConfigError, match="prompt_dropout"):
        janus_cfg(janus_dir, janus=JanusModelConfig(prompt_dropout=1.0))
    foreign = dict(batch, input_ids=batch["input_ids"].masked_fill(is_code, NUM_CODES))  # not a code of this model
    with pytest.raises(ValueError, match="pretokenize_janus"):
        adapter.run(foreign)


# ---- sampling ------------------------------------------------------------------------------------------------


def test_batched_cached_sampling_draws_what_transformers_generate_draws(janus_dir, one_torch_thread):
    """Greedy CFG sampling of prompts of different lengths in one left-padded batch = stock ``generate(...,
    generation_mode="image")`` on each prompt alone (which masks the prompt with pads for the unconditional rows)."""
    cfg = janus_cfg(janus_dir)
    module = cfg.backbone.skeleton(cfg, torch.float32)
    module.load_state_dict({k: v for k, v in stock(janus_dir).state_dict().items() if k in module.state_dict()},
                           assign=True)
    vocab, tokenizer = cfg.backbone.vocab(cfg), cfg.backbone.text_tokenizer(cfg)
    conditions = [cfg.backbone.encode_prompt(tokenizer, vocab, p) for p in PROMPTS]
    grid = cfg.backbone.sampling_grid(cfg, 0, 0)
    assert grid == (GRID, GRID)
    sampler = Sampler(cfg.backbone, module.eval(), vocab, SamplingConfig(temperature=0.0, guidance_scale=3.0), grid)
    codes = sampler.generate(conditions, seeds=[0, 1, 2]).codes  # [3, GRID, GRID]

    reference = stock(janus_dir)
    generation = GenerationConfig.from_pretrained(janus_dir)
    last_scores = []
    for condition, drawn in zip(conditions, codes):
        ids = torch.tensor([vocab.framed(condition)])
        expected = reference.generate(inputs=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                      generation_config=generation, do_sample=False, guidance_scale=3.0,
                                      return_dict_in_generate=True, output_scores=True)
        assert torch.equal(drawn.flatten(), expected.sequences[0])
        last_scores.append(expected.scores)  # [2, K]: the conditional and unconditional logits of the last code
    # the logits themselves (codes alone could agree by luck): feed the drawn codes, compare the last step
    stepper = sampler.stepper
    stepper.start(conditions, guided=True)
    flat = codes.flatten(1)
    for step in range(GRID * GRID - 1):
        stepper.feed(torch.cat([flat[:, step], flat[:, step]]))
    logits = stepper.logits()  # [6, K]: 3 conditional rows, then 3 unconditional ones
    torch.testing.assert_close(logits[:3], torch.stack([s[0] for s in last_scores]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[3:], torch.stack([s[1] for s in last_scores]), rtol=1e-4, atol=1e-5)


def test_sampling_size_and_defaults(janus_dir):
    cfg = janus_cfg(janus_dir)
    assert cfg.backbone.sampling_grid(cfg, 2 * IMAGE_SIZE, IMAGE_SIZE) == (2 * GRID, GRID)
    with pytest.raises(ConfigError, match="multiple of 16"):
        cfg.backbone.sampling_grid(cfg, IMAGE_SIZE + 8, 0)
    assert SamplingConfig().with_defaults(cfg.backbone.sampling_defaults).guidance_scale == 5.0  # Janus's cfg_weight


# ---- the sample layout -----------------------------------------------------------------------------------------


def test_mds_samples_read_back_as_prompts_and_codes(janus_dir, tmp_path):
    cfg = janus_cfg(janus_dir)
    vocab, tokenizer = cfg.backbone.vocab(cfg), cfg.backbone.text_tokenizer(cfg)
    g = torch.Generator().manual_seed(0)
    written = []
    with MDSWriter(out=str(tmp_path / "mds"), columns=columns_for([])) as writer:
        for i, text in enumerate(PROMPTS):
            codes = torch.randint(0, NUM_CODES, (GRID, GRID), generator=g)
            prompt_ids = layout.encode_prompt(tokenizer, vocab, text)
            tokens, prompt_len = vocab.sample_tokens(prompt_ids, codes)
            assert tokenizer.decode(tokens[:prompt_len], skip_special_tokens=False).split()[:3] == [
                layout.BOS, layout.USER_ROLE, ":"]
            writer.write({"tokens": np.asarray(tokens, np.int32), "prompt_len": np.int32(prompt_len), "caption": text,
                          "uid": f"img{i}"})
            written.append((prompt_ids, codes))
    prompts = load_prompts(tmp_path / "mds", vocab).prompts
    assert [p.text for p in prompts] == PROMPTS
    for prompt, (prompt_ids, codes) in zip(prompts, written):
        assert prompt.prompt_ids == prompt_ids
        assert np.array_equal(prompt.real_codes, codes.numpy())
    with pytest.raises(ValueError, match="framed"):
        vocab.split_sample([vocab.pad_id, 1, 2, 3], 2)


# ---- the recipes -------------------------------------------------------------------------------------------------


def flat(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from flat(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def test_the_7b_recipe_is_the_1b_recipe_on_eight_gpus_and_both_are_arras_setting():
    one, seven = (dict(flat(to_dict(load_dataclass_config(RunConfig, REPO_ROOT / "configs" / f"janus_pro_{size}_arra.yaml",
                                                          ())))) for size in ("1b", "7b"))
    assert {k for k in one if one[k] != seven[k]} == {"model.path", "output_dir"}
    expected = {"model.source": "janus", "model.janus.prompt_dropout": 0.1, "model.z_loss_weight": 1e-5,
                "model.activation_checkpointing": True, "align.weight": 1.0, "align.layer": 1, "align.target": "hybnext",
                "align.encoder": "biomedclip", "optim.lr": 2e-5, "optim.weight_decay": 0.05, "optim.betas": [0.9, 0.95],
                "train.global_batch_size": 96, "train.max_steps": 23040}
    assert {k: one[k] for k in expected} == expected
    for world in (1, 2, 4, 8):  # the micro-batch divides the global batch on the GPU counts the README names
        assert expected["train.global_batch_size"] % (one["train.micro_batch_size"] * world) == 0
