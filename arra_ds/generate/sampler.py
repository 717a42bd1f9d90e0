"""Batched autoregressive image sampling with a KV cache and classifier-free guidance, for any backbone.

One loop (``sample_images``) drives the backbone's ``ImageStepper`` (``model/interface.py``): the stepper runs
the model, knows the sequence layout (its prefix, the structure tokens it forces, which tokens a code position
may take, how drawn tokens become a code grid); this loop guides, filters and draws (``generate/sampling.py``)
with one generator per sample, so a sample's codes depend on its seed alone. With guidance the stepper keeps
B unconditional rows after the B conditional ones and both halves are fed the token the conditional row drew.

After the image the Chameleon family can go on sampling text (``sampling.max_text_tokens``): text top-k, no
guidance (Lumina-mGPT guides image tokens only), until a row draws an end-of-turn token; finished rows are fed
the pad token, masked out of attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from arra_ds.errors import ConfigError
from arra_ds.generate.sampling import (
    SamplingConfig,
    classifier_free_guidance,
    draw_codes,
    draw_uniforms,
    sample_generators,
    sample_top_k,
)
from arra_ds.model.interface import Backbone, ImageStepper
from arra_ds.tokens.vocab import ChameleonVocab


@dataclass
class SampleBatch:
    codes: torch.Tensor  # [B, h, w] int64 VQ codes (CPU)
    tokens: torch.Tensor  # [B, num_steps] int64: every token after the prefix, drawn or forced (CPU)
    text_tokens: list[list[int]] = field(default_factory=list)  # per sample: tokens drawn after the image


@torch.inference_mode()
def sample_images(
    stepper: ImageStepper, conditions: Sequence, seeds: Sequence[int], cfg: SamplingConfig, pad_to: int = 0
) -> SampleBatch:
    """One image per condition (prompt token ids or a class id); ``seeds``: one per condition (``seed_for_sample``);
    ``pad_to``: left-pad every prefix to at least this length, so a row's shapes do not depend on its batch mates.
    ``cfg`` is resolved against the backbone's defaults (no None)."""
    if len(conditions) != len(seeds):
        raise ValueError(f"got {len(conditions)} conditions but {len(seeds)} seeds")
    if not conditions:
        raise ValueError("sampling needs at least one condition")
    batch = len(conditions)
    guided = cfg.uses_guidance
    stepper.start(conditions, guided, pad_to)
    generators = sample_generators(list(seeds))
    device = stepper.device
    drawn = torch.empty((batch, stepper.num_steps), dtype=torch.long, device=device)  # to the host once, at the end
    code_index = 0
    for step in range(stepper.num_steps):
        forced = stepper.forced_token(step)
        if forced is not None:
            tokens = torch.full((batch,), forced, dtype=torch.long, device=device)
        else:
            logits = stepper.logits()  # [R, V] fp32
            cond = logits[:batch]
            if cfg.guides(code_index):
                cond = classifier_free_guidance(cond, logits[batch:], cfg.guidance_scale)
            tokens = draw_codes(cond, cfg, draw_uniforms(generators), stepper.allowed)
            code_index += 1
        drawn[:, step] = tokens
        if step == stepper.num_steps - 1 and not cfg.max_text_tokens:
            break  # nothing reads the state after the last code
        stepper.feed(torch.cat([tokens, tokens]) if guided else tokens)
    text = _sample_text(stepper, generators, cfg, guided) if cfg.max_text_tokens else [[] for _ in range(batch)]
    drawn = drawn.cpu()
    return SampleBatch(codes=stepper.codes(drawn), tokens=drawn, text_tokens=text)


def _sample_text(stepper: ImageStepper, generators, cfg: SamplingConfig, guided: bool) -> list[list[int]]:
    if not stepper.text_stop_ids:
        raise ConfigError("sampling.max_text_tokens > 0: this backbone draws no text after the image; set it to 0")
    batch = len(generators)
    text: list[list[int]] = [[] for _ in range(batch)]
    active = torch.ones(batch, dtype=torch.bool)
    for _ in range(cfg.max_text_tokens):
        logits = stepper.logits()[:batch]
        rows = active.nonzero().squeeze(1)
        uniforms = draw_uniforms(generators, rows)
        drawn = sample_top_k(logits[rows.to(logits.device)], cfg.text_top_k, cfg.temperature, uniforms).cpu()
        tokens = torch.full((batch,), stepper.pad_id, dtype=torch.long)
        tokens[rows] = drawn
        for row, token in zip(rows.tolist(), drawn.tolist()):
            text[row].append(token)
            if token in stepper.text_stop_ids:
                active[row] = False
        if not active.any():
            break
        feed = torch.cat([tokens, tokens]) if guided else tokens
        attend = torch.cat([active, active]) if guided else active
        stepper.feed(feed, attend)
    return text


class Sampler:
    """Sampling from one loaded model: ``backbone`` (its registry entry), ``module`` (eval mode, on its device),
    its text ``vocab`` (None for a class-conditional model), the code ``grid`` (h, w) and the settings; ``rep_token``:
    the model was trained with <REP> opening the assistant turn (``RunData.rep_token``)."""

    def __init__(
        self, backbone: Backbone, module: nn.Module, vocab: ChameleonVocab | None, cfg: SamplingConfig,
        grid: tuple[int, int], rep_token: bool = False,
    ):
        cfg.validate()
        self.cfg = cfg.with_defaults(backbone.sampling_defaults)
        self.grid = grid
        self.stepper = backbone.stepper(module, vocab, grid, rep_token)  # reusable: ``start`` resets it for every batch

    def prefix_length(self, condition) -> int:
        return self.stepper.prefix_length(condition)

    def generate(self, conditions: Sequence, seeds: Sequence[int], pad_to: int = 0) -> SampleBatch:
        return sample_images(self.stepper, conditions, seeds, self.cfg, pad_to)
