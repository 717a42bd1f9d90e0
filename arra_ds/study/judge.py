"""The study's judge: the attribute model (``arra_ds.demo.attributes``) trained on VQ-reconstructed
train scenes, and what it measures: prompt fidelity of pictures, and its own accuracy.

Training pictures are the train split's VQ codes painted back into pixels by ``CodePainter``: the
demo VQGAN's decoder gives every 16-px patch one colour that depends on its code alone (its convs
use their centre taps, its upsampling is nearest), so painting the codes is the decoder's output
without running it (~0.5 s a picture at 192 px on one CPU core). ``CodePainter.check`` compares
painted and decoded pictures and refuses a decoder for which that does not hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from arra_ds.demo.attributes import (
    AttributeNetConfig,
    SceneAttributeNet,
    attribute_loss,
    attribute_targets,
    save_attribute_net,
)
from arra_ds.demo.scenes import FIDELITY_ASPECTS, SLOTS, SceneAttributes, parse_caption
from arra_ds.generate.pipeline import decode_to_uint8
from arra_ds.study.config import JudgeTrainConfig
from arra_ds.tokens.layout import CODE_PATCH_PX

PAINT_TOLERANCE = 2  # uint8 levels: the decoder's GroupNorm couples patches by ~1e-4 of a level's range


@dataclass
class CodePainter:
    colours: torch.Tensor  # uint8 [K, 3]: the decoded colour of each code

    @classmethod
    def from_decoder(cls, decoder, num_codes: int) -> "CodePainter":
        strip = decode_to_uint8(decoder, torch.arange(num_codes).view(1, num_codes))  # [16, 16 K, 3]
        centre = CODE_PATCH_PX // 2
        return cls(torch.from_numpy(strip[centre, centre::CODE_PATCH_PX].copy()))

    def patch_colours(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> uint8 colour of each patch [B, 3, h, w] (the mean colour the judge reads)."""
        return self.colours[codes].permute(0, 3, 1, 2)

    def paint(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> uint8 pictures [B, 3, 16 h, 16 w]."""
        patches = self.patch_colours(codes)
        return patches.repeat_interleave(CODE_PATCH_PX, dim=2).repeat_interleave(CODE_PATCH_PX, dim=3)

    def check(self, decoder, code_grids: list[np.ndarray]) -> int:
        """Largest |painted - decoded| over ``code_grids`` (uint8 levels); ValueError above the tolerance."""
        worst = 0
        for codes in code_grids:
            codes = torch.from_numpy(np.asarray(codes, dtype=np.int64))
            decoded = torch.from_numpy(decode_to_uint8(decoder, codes)).permute(2, 0, 1).int()
            worst = max(worst, int((self.paint(codes[None])[0].int() - decoded).abs().max()))
        if worst > PAINT_TOLERANCE:
            raise ValueError(
                f"the VQGAN's decoder is not patch-local (painted and decoded pictures differ by {worst} levels); the "
                "study's judge is trained on painted codes and needs the closed-form demo VQGAN"
            )
        return worst


def _with_noise(codes: torch.Tensor, max_fraction: float, num_codes: int, generator: torch.Generator) -> torch.Tensor:
    """Replace up to ``max_fraction`` of each grid's codes by random codes (isolated speckles are not shapes)."""
    if max_fraction <= 0:
        return codes
    batch = codes.shape[0]
    fraction = torch.rand(batch, 1, 1, generator=generator) * max_fraction
    replace = torch.rand(codes.shape, generator=generator) < fraction
    random_codes = torch.randint(0, num_codes, codes.shape, generator=generator)
    return torch.where(replace, random_codes, codes)


def train_judge(cfg: JudgeTrainConfig, code_size: int, painter: CodePainter, codes: torch.Tensor,
                scenes: list[SceneAttributes], out_dir: Path, seed: int, progress: bool = True) -> dict:
    """Train the attribute model on painted ``codes`` [N, h, w] with ground truth ``scenes``; save it."""
    torch.manual_seed(seed)
    net = SceneAttributeNet(AttributeNetConfig(code_size=code_size, channels=cfg.channels, feature_dim=cfg.feature_dim))
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.01)
    targets = attribute_targets(scenes)
    generator = torch.Generator().manual_seed(seed)
    num_codes = painter.colours.shape[0]
    losses = []
    bar = tqdm(range(cfg.steps), desc="judge: train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))
        index = torch.randint(0, len(scenes), (cfg.batch_size,), generator=generator)
        noisy = _with_noise(codes[index], cfg.noise_fraction, num_codes, generator)
        logits = net(net.normalise(painter.patch_colours(noisy)))  # = net.patch_colours(painter.paint(noisy))
        loss = attribute_loss(logits, {name: value[index] for name, value in targets.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    weights = save_attribute_net(net.eval(), out_dir)
    return {"weights": str(weights), "steps": cfg.steps, "scenes": len(scenes), "final_loss": float(np.mean(losses[-20:]))}


def attribute_accuracy(seen: list[SceneAttributes], truth: list[SceneAttributes]) -> dict[str, float]:
    """How well the judge reads pictures whose ground truth is known: background, occupancy per slot,
    and kind / colour / size of the shapes that are there; ``exact``: the whole scene."""
    counts = {"background": [], "occupancy": [], "kind": [], "colour": [], "size": [], "exact": []}
    for s, t in zip(seen, truth):
        counts["background"].append(s.background == t.background)
        counts["exact"].append(s == t)
        for slot in SLOTS:
            a, b = s.slots[slot], t.slots[slot]
            counts["occupancy"].append((a is None) == (b is None))
            if b is not None:
                counts["kind"].append(a is not None and a.kind == b.kind)
                counts["colour"].append(a is not None and a.colour == b.colour)
                counts["size"].append(a is not None and a.size == b.size)
    return {name: float(np.mean(values)) if values else float("nan") for name, values in counts.items()}


def prompt_fidelity(seen: list[SceneAttributes], captions: list[str]) -> dict:
    """Fraction of pictures that satisfy their prompt, per aspect (``FIDELITY_ASPECTS``), and of the
    whole prompt per caption form (``all_single``, ``all_pair``, ``all_count``)."""
    checks, modes = [], []
    for attributes, caption in zip(seen, captions):
        spec = parse_caption(caption)
        checks.append(spec.check(attributes))
        modes.append(spec.mode)
    result = {aspect: float(np.mean([c[aspect] for c in checks])) for aspect in FIDELITY_ASPECTS}
    for mode in sorted(set(modes)):
        result[f"all_{mode}"] = float(np.mean([c["all"] for c, m in zip(checks, modes) if m == mode]))
    result["num_pictures"] = len(checks)
    return result
