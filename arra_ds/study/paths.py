"""Where a study keeps what it makes (everything below ``output_dir``).

    study_config.yaml          the resolved study config (a rerun must match it)
    data/scenes/train/*.png    drawn pictures; train.json / heldout.json (conversation JSON), scenes.jsonl
    data/train_mds/            pre-tokenised train split (tokens, feat_<clip.name>, caption, uid)
    data/train_rep_mds/        the same with <REP> opening every answer, for arms with align.target=rep
    data/heldout_mds/          pre-tokenised held-out prompts
    data/heldout/recon/*.png   VQ reconstructions of the held-out pictures; data/heldout/prompts.json (+ .txt)
    data/heldout/reference/    fresh real pictures of the evaluated prompts (FID reference); floor/ (FID floor)
    models/                    text_tokenizer.json, vqgan.yaml/.ckpt, clip/ (+ randclip/), judge/
    reference/scene.npz        FID reference statistics (data/heldout/reference)
    setup.json                 the data and models: sizes, CLIP and judge quality, ceilings, chance levels
    timing.jsonl               wall and CPU seconds of every stage and process, one line per invocation
    runs/<arm>/seed_<s>/       a training run (the trainer's run dir), train.log, study_run.yaml
        eval/step_<n>/         launch/eval.py output (images/, report.json) + fidelity.json
    report.md, report.json, curves.png, samples.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from arra_ds.checkpoints import CHECKPOINTS_DIR, tag_for


@dataclass(frozen=True)
class StudyPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "study_config.yaml"

    # ---- data ----
    @property
    def scenes(self) -> Path:
        return self.root / "data" / "scenes"

    @property
    def scenes_done(self) -> Path:
        return self.scenes / "done.json"

    @property
    def scene_records(self) -> Path:
        return self.scenes / "scenes.jsonl"

    def conversations(self, split: str) -> Path:
        return self.scenes / f"{split}.json"

    def mds(self, split: str) -> Path:
        return self.root / "data" / f"{split}_mds"

    @property
    def heldout_recon(self) -> Path:
        return self.root / "data" / "heldout" / "recon"

    @property
    def heldout_prompts(self) -> Path:
        return self.root / "data" / "heldout" / "prompts.json"

    @property
    def eval_prompts_text(self) -> Path:
        """The evaluated prompts without real pictures (no paired MS-SSIM)."""
        return self.root / "data" / "heldout" / "prompts.txt"

    @property
    def reference_pictures(self) -> Path:
        return self.root / "data" / "heldout" / "reference"

    @property
    def floor_pictures(self) -> Path:
        return self.root / "data" / "heldout" / "floor"

    # ---- models ----
    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def tokenizer(self) -> Path:
        return self.models / "text_tokenizer.json"

    @property
    def vqgan_yaml(self) -> Path:
        return self.models / "vqgan.yaml"

    @property
    def vqgan_ckpt(self) -> Path:
        return self.models / "vqgan.ckpt"

    @property
    def clip(self) -> Path:
        return self.models / "clip"

    @property
    def random_clip(self) -> Path:
        return self.models / "randclip"

    @property
    def judge(self) -> Path:
        return self.models / "judge"

    @property
    def reference(self) -> Path:
        return self.root / "reference"

    @property
    def setup(self) -> Path:
        return self.root / "setup.json"

    @property
    def timing(self) -> Path:
        return self.root / "timing.jsonl"

    # ---- runs ----
    def run_dir(self, arm: str, seed: int) -> Path:
        return self.root / "runs" / arm / f"seed_{seed}"

    def checkpoint(self, arm: str, seed: int, step: int) -> Path:
        return self.run_dir(arm, seed) / CHECKPOINTS_DIR / tag_for(step)

    def eval_dir(self, arm: str, seed: int, step: int) -> Path:
        return self.run_dir(arm, seed) / "eval" / f"step_{step}"

    # ---- report ----
    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def samples(self) -> Path:
        return self.root / "samples.png"
