"""Settings of the ARRA-vs-baseline study (``launch/study.py``) and its profiles.

A study file (``configs/studies/demo_arra.yaml``) holds the ``StudyConfig`` fields and a
``profiles`` mapping; ``profile=<name>`` (in the file or on the command line) merges that profile's
settings over the file's, then the other ``key=value`` overrides apply:

    cfg = load_study_config("configs/studies/demo_arra.yaml", ["profile=smoke", "output_dir=/tmp/s"])

Sections: ``scenes`` (the data), ``clip`` (the target encoder trained in the study), ``judge`` (the
attribute model: prompt fidelity and FID features), ``run`` (the training run every arm starts
from: a ``RunConfig``), ``arms`` (name, label and run-config overrides of each arm), ``eval``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from arra_ds.config import apply_overrides, from_dict, parse_override, read_config_file, to_dict
from arra_ds.demo.scenes import MAX_CAPTION_WORDS
from arra_ds.errors import ConfigError
from arra_ds.tokens.layout import CODE_PATCH_PX, ImageGrid
from arra_ds.tokens.vocab import DEBUG_MAX_GRID, REP_TOKEN
from arra_ds.train.run_config import REPO_ROOT, RunConfig

DEFAULT_STUDY = REPO_ROOT / "configs" / "studies" / "demo_arra.yaml"
PROFILES_KEY = "profiles"


@dataclass
class SceneDataConfig:
    """The scenes of the study: a train split and a held-out prompt set with no caption in common."""

    code_size: int = 12  # image side in VQ codes; pictures are 16 * code_size px square
    num_image_codes: int = 64  # the VQ codebook (k-means over patch colours), = the model's image vocabulary
    train_scenes: int = 6000  # fresh draws; none has a held-out caption
    heldout_prompts: int = 128  # distinct captions kept out of training (FID reference, ceilings)
    seed: int = 1000  # the draws (the training seeds are the study's `seeds`)
    items_per_part: int = 1000  # pre-tokenization resume unit (one MDS part)
    pretokenize_procs: int = 2  # local pre-tokenization processes
    random_encoder: bool = False  # also write feat_randclip: a random-init CLIP, the encoder ablation's control

    @property
    def image_size(self) -> int:
        return CODE_PATCH_PX * self.code_size

    @property
    def grid(self) -> ImageGrid:
        return ImageGrid(self.code_size, self.code_size)

    def max_sequence_length(self, rep_token: bool = False) -> int:
        """<s> caption <eot> [<REP>] image <eot>: the longest study sample, in tokens."""
        return 1 + MAX_CAPTION_WORDS + 1 + int(rep_token) + self.grid.part_length + 1

    def validate(self) -> None:
        if self.code_size < 2 or self.code_size % 2 or self.code_size > 2 * DEBUG_MAX_GRID:
            raise ConfigError(f"scenes.code_size={self.code_size} must be even and in [2, {2 * DEBUG_MAX_GRID}]")
        if self.num_image_codes < 2:
            raise ConfigError(f"scenes.num_image_codes={self.num_image_codes} must be >= 2")
        if min(self.train_scenes, self.items_per_part, self.pretokenize_procs) < 1:
            raise ConfigError("scenes.train_scenes, items_per_part and pretokenize_procs must be >= 1")
        if self.heldout_prompts < 2:
            raise ConfigError(f"scenes.heldout_prompts={self.heldout_prompts} must be >= 2 (FID needs two reference images)")


@dataclass
class ClipTrainConfig:
    """The target encoder: a tiny open_clip CLIP trained contrastively on the train split's
    (picture, caption) pairs, then frozen; its image embedding is the column feat_<name>."""

    name: str = "sceneclip"  # the feature column feat_<name> and the default align.encoder
    image_size: int = 48  # pixels the image tower sees (pictures are resized to it): 6 x 6 patches
    patch_size: int = 8
    width: int = 64
    layers: int = 2
    embed_dim: int = 64  # D: width of the global feature the projector aligns to
    text_width: int = 64
    text_layers: int = 2
    context_length: int = 32  # BPE tokens of a caption (open_clip's own tokenizer)
    steps: int = 400
    batch_size: int = 128
    lr: float = 1.0e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    blocky_fraction: float = 0.5  # pictures shown as 16-px patch means (what decoded VQ codes look like)

    def validate(self) -> None:
        if not self.name.replace("_", "").isalnum():
            raise ConfigError(f"clip.name={self.name!r} must be a plain name (it names feat_<name>)")
        if min(self.image_size, self.patch_size, self.width, self.layers, self.embed_dim, self.text_width,
               self.text_layers, self.context_length, self.steps, self.batch_size) < 1:
            raise ConfigError("clip sizes, steps and batch_size must be >= 1")
        if self.image_size % self.patch_size:
            raise ConfigError(f"clip.image_size={self.image_size} must be a multiple of clip.patch_size={self.patch_size}")
        if not 0.0 <= self.blocky_fraction <= 1.0:
            raise ConfigError(f"clip.blocky_fraction={self.blocky_fraction} must be in [0, 1]")


@dataclass
class JudgeTrainConfig:
    """The attribute model (``arra_ds.demo.attributes``), trained on VQ-reconstructed train scenes."""

    channels: int = 32
    feature_dim: int = 64  # FID feature width (its penultimate layer)
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2.0e-3
    noise_fraction: float = 0.03  # up to this fraction of a training grid's codes is made random (speckles)

    def validate(self) -> None:
        if min(self.channels, self.feature_dim, self.steps, self.batch_size) < 1 or self.lr <= 0:
            raise ConfigError("judge sizes, steps, batch_size and lr must be positive")
        if not 0.0 <= self.noise_fraction < 1.0:
            raise ConfigError(f"judge.noise_fraction={self.noise_fraction} must be in [0, 1)")


@dataclass
class ArmConfig:
    """One arm: run-config overrides on top of ``run`` (e.g. align.weight=0 for next-token only)."""

    name: str = ""  # a plain name (its runs live in runs/<name>/seed_<s>)
    label: str = ""  # how the report calls it
    overrides: list[str] = field(default_factory=list)


@dataclass
class StudyEvalConfig:
    """Which checkpoints are evaluated, on how many held-out prompts, and how images are sampled."""

    every: int = 0  # evaluate every n training steps (and the last step); 0 = the last step only
    num_prompts: int = 64  # the first n held-out prompts
    samples_per_prompt: int = 2  # >= 2 for the diversity MS-SSIM
    batch_size: int = 32  # generation batch (keep it when resuming)
    guidance_scale: float = 1.0  # 1 = no CFG: the runs never see an empty prompt, so no unconditional branch is trained
    image_top_k: int = 16
    temperature: float = 1.0
    seed: int = 0  # sampling seed, the same for every arm and training seed
    ms_ssim_win_size: int = 11  # pictures must be at least (win - 1) * 16 + 1 px
    # MS-SSIM between each sample and its prompt's real picture (the paper's form) besides the diversity
    # form; on CPU it costs as much as generating the samples
    paired_ms_ssim: bool = False
    reference_per_prompt: int = 4  # fresh real pictures per evaluated prompt: the FID reference
    samples_shown: int = 8  # held-out prompts in samples.png

    def validate(self) -> None:
        if self.every < 0 or min(self.num_prompts, self.samples_per_prompt, self.batch_size, self.samples_shown,
                                 self.reference_per_prompt) < 1:
            raise ConfigError(
                "eval.every must be >= 0; eval.num_prompts, samples_per_prompt, batch_size, samples_shown and "
                "reference_per_prompt >= 1"
            )


@dataclass
class StudyConfig:
    output_dir: str = "runs/study"
    profile: str = "cpu"  # which entry of the file's `profiles` was merged in
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training seeds (init and data order), per arm
    arms: list[ArmConfig] = field(default_factory=list)
    run_arms: list[str] = field(default_factory=list)  # arms to run; [] = all
    baseline: str = "ar_only"  # the arm every other arm is compared with
    treatment: str = "arra"  # the arm shown against the baseline in samples.png
    run: RunConfig = field(default_factory=RunConfig)  # what every arm trains; the study sets output_dir, seed, data
    scenes: SceneDataConfig = field(default_factory=SceneDataConfig)
    clip: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    judge: JudgeTrainConfig = field(default_factory=JudgeTrainConfig)
    eval: StudyEvalConfig = field(default_factory=StudyEvalConfig)
    parallel: int = 2  # training / evaluation processes at a time
    threads_per_process: int = 1  # OMP / torch threads of each of them (CPU)
    gpus: list[int] = field(default_factory=list)  # GPU ids the processes take in turn; [] = CPU (or all visible GPUs)
    launcher: Literal["deepspeed", "python"] = "deepspeed"  # how a training run starts (python: one process, no launcher)
    ds_config: str = "ds_configs/zero3.json"  # relative to the repository root unless absolute
    progress_bar: bool = True

    def arm_needs_rep_data(self, arm: ArmConfig) -> bool:
        """The arm aligns at <REP> (align.target=rep with the default rep_token): its data must hold that token,
        pre-tokenised with rep_token=true (the other arms keep Lumina-mGPT's layout)."""
        align = from_dict(RunConfig, apply_overrides(to_dict(self.run), arm.overrides)).align
        return align.target == "rep" and align.rep_token == REP_TOKEN

    def train_splits(self) -> list[str]:
        """The pre-tokenised train splits the selected arms train on."""
        return ["train", *(["train_rep"] if any(map(self.arm_needs_rep_data, self.selected_arms())) else [])]

    def selected_arms(self) -> list[ArmConfig]:
        if not self.run_arms:
            return list(self.arms)
        by_name = {arm.name: arm for arm in self.arms}
        return [by_name[name] for name in self.run_arms]

    def ds_config_path(self) -> Path:
        path = Path(self.ds_config)
        return path if path.is_absolute() else REPO_ROOT / path

    def validate(self) -> None:
        names = [arm.name for arm in self.arms]
        if not self.arms:
            raise ConfigError("the study has no arms: list them under `arms:` (name, label, overrides)")
        bad = [n for n in names if not n or not n.replace("_", "").isalnum()]
        if bad or len(set(names)) != len(names):
            raise ConfigError(f"arm names {names} must be distinct plain names (letters, digits, _)")
        unknown = [n for n in [*self.run_arms, self.baseline, self.treatment] if n not in names]
        if unknown:
            raise ConfigError(f"arms {unknown} are not defined; the study defines {names}")
        selected = [arm.name for arm in self.selected_arms()]
        if self.baseline not in selected or self.treatment not in selected:
            raise ConfigError(f"run_arms={self.run_arms} must include the baseline ({self.baseline}) and the treatment ({self.treatment})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds} must be a non-empty list of distinct integers")
        if self.parallel < 1 or self.threads_per_process < 1:
            raise ConfigError("parallel and threads_per_process must be >= 1")
        if not self.ds_config_path().is_file():
            raise ConfigError(f"ds_config={self.ds_config}: {self.ds_config_path()} does not exist")
        for arm in self.arms:
            for text in arm.overrides:
                key, _ = parse_override(text)
                if key[0] in ("output_dir", "seed", "data"):
                    raise ConfigError(f"arm {arm.name}: override {text!r} sets what the study decides per run (output dir, seed, data)")
        for section in (self.scenes, self.clip, self.judge, self.eval):
            section.validate()
        if self.eval.num_prompts > self.scenes.heldout_prompts:
            raise ConfigError(f"eval.num_prompts={self.eval.num_prompts} exceeds scenes.heldout_prompts={self.scenes.heldout_prompts}")
        if self.eval.every and self.run.train.max_steps % self.eval.every:
            raise ConfigError(
                f"eval.every={self.eval.every} must divide run.train.max_steps={self.run.train.max_steps} "
                "(checkpoints are saved every eval.every steps)"
            )
        min_px = (self.eval.ms_ssim_win_size - 1) * 2 ** 4 + 1
        if self.scenes.image_size < min_px:
            raise ConfigError(
                f"pictures of {self.scenes.image_size} px are too small for MS-SSIM with eval.ms_ssim_win_size="
                f"{self.eval.ms_ssim_win_size} (needs {min_px} px); lower eval.ms_ssim_win_size"
            )

    def eval_steps(self) -> list[int]:
        last = self.run.train.max_steps
        if not self.eval.every:
            return [last]
        return list(range(self.eval.every, last + 1, self.eval.every))


def _merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``: mappings merge key by key, everything else (lists too) is replaced."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_study_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> StudyConfig:
    """The study file (default: ``configs/studies/demo_arra.yaml``) with its profile merged in, then the
    overrides; checked."""
    overrides = list(overrides)
    data = read_config_file(path or DEFAULT_STUDY)
    profiles = data.pop(PROFILES_KEY, {}) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"`{PROFILES_KEY}` in {path or DEFAULT_STUDY} must map profile names to settings")
    profile = str(data.get("profile", StudyConfig.profile))
    for text in overrides:
        key, value = parse_override(text)
        if key == ["profile"]:
            profile = str(value)
    if profiles and profile not in profiles:
        raise ConfigError(f"profile={profile} is not defined; the study file has profiles {sorted(profiles)}")
    data = _merge(data, profiles.get(profile) or {})
    data["profile"] = profile
    cfg = from_dict(StudyConfig, apply_overrides(data, overrides))
    cfg.validate()
    return cfg
