"""Batched text-to-image sampling with a KV cache, classifier-free guidance and the image structure.

Rows of one forward pass (R = B, or 2B with guidance):

    rows 0..B-1    conditional:   <pad>* <s> prompt <eot> <racm3:break> <grid h> <grid w>
    rows B..2B-1   unconditional: <pad>*                   <racm3:break> <grid h> <grid w>

The unconditional branch drops the prompt and starts at the image start, as Lumina-mGPT's
``LLMImageStartTriggeredUnbatchedClassifierFreeGuidanceLogitsProcessor`` does; here it runs in the
same batch as the conditional rows instead of in a second model call. Prompts are left-padded (with
attention mask and position ids counted from each row's first real token), and every row is fed the
token its conditional row drew, so all rows step together. The layout is fixed by the requested size:

    for each of h rows: w image codes (drawn, image tokens only), <reserved08799> (forced)
    then <eoss> (forced)

so the result always decodes to an h x w code grid. Image-token logits are never masked: the model
is run as ``backbone.model`` + ``backbone.lm_head``, not through Hugging Face's
``ChameleonForConditionalGeneration.forward`` (which suppresses image tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from transformers import DynamicCache

from arra_ds.generate.sampling import (
    SamplingConfig,
    classifier_free_guidance,
    draw_uniforms,
    restrict_to,
    sample_generators,
    sample_top_k,
)
from arra_ds.tokens.layout import ImageGrid, tokens_to_image
from arra_ds.tokens.vocab import ChameleonVocab


@dataclass
class SampleBatch:
    codes: torch.Tensor  # [B, h, w] int64 VQ codes (CPU)
    image_tokens: list[list[int]]  # per sample: <racm3:break> .. <eoss>
    text_tokens: list[list[int]] = field(default_factory=list)  # per sample: tokens drawn after <eoss>


class ImageSampler:
    """Generate images (as VQ codes) for batches of tokenised prompts from a Chameleon backbone.

    ``backbone`` is a ``ChameleonForConditionalGeneration`` (or any module with ``.model`` returning
    ``last_hidden_state`` and a callable ``.lm_head``), in eval mode on its device.
    """

    def __init__(self, backbone: nn.Module, vocab: ChameleonVocab, cfg: SamplingConfig):
        cfg.validate()
        self.backbone = backbone
        self.vocab = vocab
        self.cfg = cfg
        self.layout = ImageGrid.for_pixels(*cfg.pixel_size())
        vocab_size = backbone.lm_head.weight.shape[0]
        image_mask = torch.zeros(vocab_size, dtype=torch.bool)  # [V]: image code tokens
        image_mask[vocab.image_token_ids] = True
        self._image_mask_cpu = image_mask
        self._stop_ids = {vocab.end_of_turn_id, vocab.eos_id}

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def conditional_prefix(self, prompt_ids: Sequence[int]) -> list[int]:
        """<s> prompt <eot> <racm3:break> <grid h> <grid w> (the layout of ``conversation_tokens``)."""
        return [self.vocab.bos_id, *prompt_ids, self.vocab.end_of_turn_id, *self.layout.prefix(self.vocab)]

    def prefix_length(self, prompt_ids: Sequence[int]) -> int:
        return len(prompt_ids) + 2 + 3

    # ---- model calls ----------------------------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Hidden state of the last position, [R, H]."""
        out = self.backbone.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        return out.last_hidden_state[:, -1]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.lm_head(hidden).float()  # [R, V]

    # ---- generation -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], pad_to: int = 0) -> SampleBatch:
        """Sample one image per prompt. ``prompts``: token ids of the prompt text (no <s>/<eot>);
        ``seeds``: one per prompt (see ``seed_for_sample``); ``pad_to``: left-pad every row to at
        least this prefix length, so a row's shapes do not depend on the other prompts in the batch."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        cfg, vocab, layout = self.cfg, self.vocab, self.layout
        device = self.device
        batch = len(prompts)
        guided = cfg.uses_guidance

        rows = [self.conditional_prefix(p) for p in prompts]
        if guided:
            rows += [layout.prefix(vocab)] * batch
        width = max(pad_to, max(len(r) for r in rows))
        input_ids = torch.full((len(rows), width), vocab.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, width - len(r) :] = 1
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_(min=0)  # [R, T]
        input_ids, attention_mask, position_ids = input_ids.to(device), attention_mask.to(device), position_ids.to(device)

        generators = sample_generators(list(seeds))
        image_mask = self._image_mask_cpu.to(device)
        cache = DynamicCache()
        hidden = self._forward(input_ids, attention_mask, position_ids, cache)
        next_position = position_ids[:, -1:] + 1  # [R, 1]

        body = torch.empty((batch, layout.body_length), dtype=torch.long, device=device)  # copied to the host once
        for step in range(layout.body_length):
            forced = layout.forced_token(step, vocab)
            if forced is not None:
                tokens = torch.full((batch,), forced, dtype=torch.long, device=device)
            else:
                logits = self._logits(hidden)
                cond = logits[:batch]
                if guided:
                    cond = classifier_free_guidance(cond, logits[batch:], cfg.guidance_scale)
                cond = restrict_to(cond, image_mask)
                tokens = sample_top_k(cond, cfg.image_top_k, cfg.temperature, draw_uniforms(generators))
            body[:, step] = tokens
            if step == layout.body_length - 1 and not cfg.max_text_tokens:
                break  # nothing reads the state after <eoss>
            feed = torch.cat([tokens, tokens]) if guided else tokens
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
            hidden = self._forward(feed[:, None], attention_mask, next_position, cache)
            next_position = next_position + 1

        text = [[] for _ in range(batch)]
        if cfg.max_text_tokens:
            text = self._sample_text(hidden, generators, attention_mask, next_position, cache, guided)

        prefix = layout.prefix(vocab)
        body = body.cpu()
        image_tokens = [prefix + body[i].tolist() for i in range(batch)]
        codes = torch.stack([tokens_to_image(t, vocab) for t in image_tokens])  # [B, h, w]; checks the layout
        return SampleBatch(codes=codes, image_tokens=image_tokens, text_tokens=text)

    def _sample_text(self, hidden, generators, attention_mask, next_position, cache, guided) -> list[list[int]]:
        """Text after <eoss>: text top-k, no guidance (Lumina-mGPT guides image tokens only), until a
        row draws <eot> or </s>, or ``max_text_tokens``. Finished rows are fed <pad> (masked out)."""
        cfg, vocab = self.cfg, self.vocab
        batch = len(generators)
        device = hidden.device
        text: list[list[int]] = [[] for _ in range(batch)]
        active = torch.ones(batch, dtype=torch.bool)
        for _ in range(cfg.max_text_tokens):
            logits = self._logits(hidden[:batch])
            rows = active.nonzero().squeeze(1)
            uniforms = draw_uniforms(generators, rows)
            drawn = sample_top_k(logits[rows.to(device)], cfg.text_top_k, cfg.temperature, uniforms).cpu()
            tokens = torch.full((batch,), vocab.pad_id, dtype=torch.long)
            tokens[rows] = drawn
            for row, token in zip(rows.tolist(), drawn.tolist()):
                text[row].append(token)
                if token in self._stop_ids:
                    active[row] = False
            if not active.any():
                break
            feed = torch.cat([tokens, tokens]) if guided else tokens
            step_mask = torch.cat([active, active]) if guided else active
            attention_mask = torch.cat([attention_mask, step_mask[:, None].long().to(device)], dim=1)
            hidden = self._forward(feed[:, None].to(device), attention_mask, next_position, cache)
            next_position = next_position + 1
        return text
