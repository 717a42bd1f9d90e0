"""Sampler: image structure, CFG, batching + KV cache against a naive reference, seeds, top-k draws."""

import pytest
import torch
from gen_helpers import ImageSampler, image_tokens, tiny_backbone, tiny_vqgan

from arra_ds.errors import ConfigError
from arra_ds.generate.sampler import Sampler
from arra_ds.generate.sampling import (
    SamplingConfig,
    classifier_free_guidance,
    draw_uniforms,
    restrict_to,
    sample_generators,
    sample_top_k,
    seed_for_sample,
)
from arra_ds.model.config import ModelConfig
from arra_ds.model.debug import DEBUG
from arra_ds.model.llamagen.backbone import LLAMAGEN
from arra_ds.tokens.layout import ImageGrid, conversation_tokens, image_to_tokens
from arra_ds.tokens.vocab import REP_TOKEN, tokens_to_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_backbone(seed=0)


def encode(vocab, text):
    return [vocab.id(w) for w in text.split()]


PROMPTS = ["a red circle", "two blue squares at the top left", "green"]


def reference_generate(backbone, vocab, cfg: SamplingConfig, prompt_ids, seed):
    """One sample, no KV cache, no batching, unconditional branch as a separate model call, and
    Lumina-mGPT's guidance formula uncond + g * (cond - uncond)."""
    layout = ImageGrid.for_pixels(cfg.height, cfg.width)
    cond = [vocab.bos_id, *prompt_ids, vocab.end_of_turn_id, *layout.prefix(vocab)]
    uncond = list(layout.prefix(vocab))
    generator = sample_generators([seed])
    allowed = torch.zeros(backbone.lm_head.weight.shape[0], dtype=torch.bool)
    allowed[vocab.image_token_ids] = True

    def last_logits(tokens):
        hidden = backbone.model(input_ids=torch.tensor([tokens]), use_cache=False).last_hidden_state
        return backbone.lm_head(hidden[:, -1]).float()

    body = []
    for step in range(layout.body_length):
        forced = layout.forced_token(step, vocab)
        if forced is None:
            logits = last_logits(cond)
            if cfg.guidance_scale != 1.0:
                u = last_logits(uncond)
                logits = u + cfg.guidance_scale * (logits - u)
            logits = restrict_to(logits, allowed)
            token = int(sample_top_k(logits, cfg.image_top_k, cfg.temperature, draw_uniforms(generator))[0])
        else:
            token = forced
        body.append(token)
        cond.append(token)
        uncond.append(token)
    text = []
    for _ in range(cfg.max_text_tokens):
        token = int(sample_top_k(last_logits(cond), cfg.text_top_k, cfg.temperature, draw_uniforms(generator))[0])
        text.append(token)
        cond.append(token)
        if token in (vocab.end_of_turn_id, vocab.eos_id):
            break
    return layout.prefix(vocab) + body, text


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_batched_kv_cache_sampler_matches_reference(model, guidance):
    backbone, vocab = model
    cfg = SamplingConfig(height=64, width=96, guidance_scale=guidance, image_top_k=20, max_text_tokens=3)
    prompts = [encode(vocab, p) for p in PROMPTS]
    seeds = [seed_for_sample(7, k) for k in range(len(prompts))]
    batch = ImageSampler(backbone, vocab, cfg).generate(prompts, seeds)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        image_tokens_ref, text = reference_generate(backbone, vocab, cfg, p, s)
        assert image_tokens(batch, i, vocab, cfg) == image_tokens_ref
        assert batch.text_tokens[i] == text
    assert batch.codes.shape == (3, 4, 6)


def test_guidance_one_is_plain_sampling(model):
    backbone, vocab = model
    cond = torch.randn(4, 50)
    assert torch.equal(classifier_free_guidance(cond, torch.randn(4, 50), 1.0), cond)
    prompts = [encode(vocab, p) for p in PROMPTS]
    plain = ImageSampler(backbone, vocab, SamplingConfig(height=64, width=64, guidance_scale=1.0, image_top_k=30))
    guided = ImageSampler(backbone, vocab, SamplingConfig(height=64, width=64, guidance_scale=4.0, image_top_k=30))
    a = plain.generate(prompts, [1, 2, 3])
    b = guided.generate(prompts, [1, 2, 3])
    assert not torch.equal(a.codes, b.codes)  # guidance changes the images at all
    # plain sampling = the reference without an unconditional branch
    for i, p in enumerate(prompts):
        assert image_tokens(a, i, vocab, plain.cfg) == reference_generate(backbone, vocab, plain.cfg, p, [1, 2, 3][i])[0]


def test_samples_do_not_depend_on_batch_mates(model):
    backbone, vocab = model
    sampler = ImageSampler(backbone, vocab, SamplingConfig(height=64, width=64, guidance_scale=3.0, image_top_k=40))
    prompts = [encode(vocab, p) for p in PROMPTS]
    pad_to = max(sampler.prefix_length(p) for p in prompts)
    together = sampler.generate(prompts, [11, 12, 13], pad_to=pad_to)
    for i, p in enumerate(prompts):
        alone = sampler.generate([p], [11 + i], pad_to=pad_to)
        assert torch.equal(alone.codes[0], together.codes[i])
    again = sampler.generate(prompts, [11, 12, 13])
    assert torch.equal(again.codes, together.codes)
    other_seed = sampler.generate(prompts[:1], [99])
    assert not torch.equal(other_seed.codes[0], together.codes[0])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padding_is_exact(attn):
    backbone, vocab = tiny_backbone(seed=1, attn=attn)
    sampler = ImageSampler(backbone, vocab, SamplingConfig(height=64, width=64, guidance_scale=2.0, temperature=0.0))
    prompt = encode(vocab, "a red circle")
    short = sampler.generate([prompt], [0])
    padded = sampler.generate([prompt], [0], pad_to=sampler.prefix_length(prompt) + 7)
    assert torch.equal(short.codes, padded.codes)


class BiasedHead(torch.nn.Module):
    """lm_head plus a fixed logit bias: a model with strong preferences for chosen tokens."""

    def __init__(self, head, bias):
        super().__init__()
        self.head, self.bias = head, bias

    @property
    def weight(self):
        return self.head.weight

    def forward(self, hidden):
        return self.head(hidden) + self.bias


def biased_backbone(vocab, tokens, value):
    backbone, _ = tiny_backbone(seed=0)
    bias = torch.zeros(backbone.lm_head.weight.shape[0])
    bias[tokens] = value
    backbone.lm_head = BiasedHead(backbone.lm_head, bias)
    return backbone


def test_structure_constraint_always_gives_a_decodable_image(model):
    _, vocab = model
    # A model that wants to end the image, start a new one, break the row or write text at every step.
    unwanted = [vocab.image_end_id, vocab.image_start_id, vocab.row_end_id, vocab.id("red"), vocab.eos_id]
    backbone = biased_backbone(vocab, unwanted, 50.0)
    vq = tiny_vqgan()
    for height, width, guidance in [(64, 64, 1.0), (32, 96, 3.0), (96, 32, 4.0)]:
        cfg = SamplingConfig(height=height, width=width, guidance_scale=guidance, image_top_k=5)
        out = ImageSampler(backbone, vocab, cfg).generate([encode(vocab, "a red circle"), [vocab.id("blue")]], [3, 4])
        for tokens in (image_tokens(out, i, vocab, cfg) for i in range(2)):
            codes = tokens_to_image(tokens, vocab)  # raises unless the layout is exact
            assert codes.shape == (height // 16, width // 16)
            body = [t for t in tokens[3:-1] if t != vocab.row_end_id]
            assert len(body) == codes.numel() and bool(vocab.is_image_code(torch.tensor(body)).all())
        pixels = vq.decode(out.codes)
        assert pixels.shape == (2, 3, height, width)
        assert pixels.min() >= -1 and pixels.max() <= 1


def test_text_after_the_image_stops_at_end_of_turn(model):
    _, vocab = model
    backbone = biased_backbone(vocab, [vocab.end_of_turn_id], 50.0)
    cfg = SamplingConfig(height=32, width=32, guidance_scale=2.0, text_top_k=3, max_text_tokens=6)
    out = ImageSampler(backbone, vocab, cfg).generate([encode(vocab, "a red circle"), encode(vocab, "blue")], [0, 1])
    assert out.text_tokens == [[vocab.end_of_turn_id], [vocab.end_of_turn_id]]
    free = ImageSampler(model[0], vocab, cfg).generate([encode(vocab, "a red circle")], [0])
    assert len(free.text_tokens[0]) == cfg.max_text_tokens  # the unbiased model runs to the limit


def test_sample_top_k_draws():
    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf"), 0.5]])
    assert sample_top_k(logits, 1, 1.0, torch.tensor([0.99])).item() == 2  # top-1 = argmax
    assert sample_top_k(logits, 5, 0.0, torch.tensor([0.5])).item() == 2  # temperature 0 = greedy
    # top-5 with only 4 finite logits: -inf is never drawn, even for u -> 1
    assert sample_top_k(logits, 5, 1.0, torch.tensor([1 - 1e-12])).item() != 3
    # inverse-CDF draws follow softmax(top-k / T)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = sample_top_k(logits.expand(20000, -1), 3, 0.7, u)
    freq = torch.bincount(draws, minlength=5).double() / 20000
    expected = torch.zeros(5, dtype=torch.float64)
    expected[[2, 1, 4]] = torch.softmax(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64) / 0.7, dim=0)
    assert torch.allclose(freq, expected, atol=0.015)


def test_sampling_config_errors():
    with pytest.raises(ConfigError, match="multiple of 32"):
        DEBUG.sampling_grid(ModelConfig(), 500, 0)
    with pytest.raises(ConfigError, match="guidance_scale"):
        SamplingConfig(guidance_scale=0).validate()
    assert seed_for_sample(0, 1) != seed_for_sample(1, 0)
    assert len({seed_for_sample(0, k) for k in range(1000)}) == 1000


def test_rep_token_data_samples_after_rep_as_in_training(model):
    """A model trained on rep_token=true data (align.target=rep) saw <REP> open every answer: its sampling prefix is
    the training sequence up to the first code, conditional and unconditional rows alike."""
    backbone, vocab = model
    grid = ImageGrid(4, 4)
    prompt = [vocab.bos_id + 5, vocab.bos_id + 6]
    training, _ = conversation_tokens(prompt, image_to_tokens(torch.zeros(4, 4, dtype=torch.long), vocab), vocab, rep_token=True)
    with_rep = DEBUG.stepper(backbone, vocab, (4, 4), rep_token=True)
    prefix = with_rep.conditional_prefix(prompt)
    assert training[: len(prefix)] == prefix and prefix[-4] == vocab.id(REP_TOKEN)
    assert with_rep.prefix_length(prompt) == len(prefix)
    assert DEBUG.stepper(backbone, vocab, (4, 4)).conditional_prefix(prompt) == prefix[:-4] + grid.prefix(vocab)
    cfg = SamplingConfig(height=64, width=64, guidance_scale=2.0, image_top_k=0)
    batch = Sampler(DEBUG, backbone, vocab, cfg, (4, 4), rep_token=True).generate([prompt], [0])
    assert tokens_to_image(grid.prefix(vocab) + batch.tokens[0].tolist(), vocab).shape == (4, 4)


def test_layouts_without_an_answer_turn_refuse_rep_token_data():
    with pytest.raises(ConfigError, match="rep_token=true"):
        LLAMAGEN.stepper(None, None, (2, 2), rep_token=True)
