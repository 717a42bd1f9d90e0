"""The trainer's run config: the section configs composed, cross-checked, loaded and saved.

Each section is owned by the module that uses it:

    model  ModelConfig      arra_ds/model/config.py (the backbone's own checks: its module, model/registry.py)
    align  AlignConfig      arra_ds/model/arra.py
    data   DataConfig       arra_ds/data/loader.py
    demo   DemoDataConfig   arra_ds/demo/config.py   (used when data.path=demo)
    optim  OptimConfig      arra_ds/train/optim.py
    train  TrainConfig      here: the trainer's own section (steps, batch, precision, logging, checkpoints)
    eval   TrainEvalConfig  arra_ds/eval/train_eval.py  (used when train.eval_every > 0)

    cfg = load_run_config("configs/debug.yaml", ["train.max_steps=20", "align.layer=2"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from arra_ds.config import load_dataclass_config
from arra_ds.data.loader import DataConfig
from arra_ds.demo.config import DemoDataConfig
from arra_ds.errors import ConfigError
from arra_ds.eval.train_eval import TrainEvalConfig
from arra_ds.model.arra import AlignConfig
from arra_ds.model.config import ModelConfig
from arra_ds.train.optim import OptimConfig, steps_per_epoch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "debug.yaml"


@dataclass
class TrainConfig:
    max_steps: int = 200  # optimizer steps; 0 = from train.epochs
    # > 0: max_steps = round(epochs x steps per epoch), steps per epoch = the data's samples // global batch
    epochs: float = 0.0  # (resolved when the data is open: the same steps on any number of GPUs); needs max_steps=0
    micro_batch_size: int = 8  # per rank
    global_batch_size: int = 0  # samples per optimizer step over all ranks; 0 = micro * ranks of the first start
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints; 0 = only at the end (and on preemption)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted after each save; 0 keeps all
    eval_every: int = 0  # steps between in-training evaluations (sample grid + FID, see eval.*); 0 = off
    resume: str = ""  # "" (fresh), "auto" (latest checkpoint in output_dir if any) or a checkpoint dir
    log_samples: bool = False  # write the uids of every micro-batch to <output_dir>/samples/ (audits)
    tensorboard: bool = True
    progress_bar: bool = True

    def resolved_max_steps(self, num_samples: int) -> int:
        """Optimizer steps of the run: ``max_steps``, or ``epochs`` passes over ``num_samples`` at the global batch
        (``steps_per_epoch``: whole batches, as the reference's epochs count them). Needs a resolved global batch."""
        if not self.epochs:
            return self.max_steps
        return max(1, round(self.epochs * steps_per_epoch(num_samples, self.global_batch_size)))

    def grad_accum_steps(self, world_size: int) -> int:
        per_pass = self.micro_batch_size * world_size
        if not self.global_batch_size:
            return 1
        if self.global_batch_size % per_pass:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of train.micro_batch_size "
                f"({self.micro_batch_size}) x ranks ({world_size}) = {per_pass}"
            )
        return self.global_batch_size // per_pass

    def validate(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"train.epochs={self.epochs} must be >= 0 (0 = train.max_steps decides)")
        if self.epochs and self.max_steps:
            raise ConfigError(
                f"train.epochs={self.epochs} and train.max_steps={self.max_steps} both set the length of the run: "
                "set train.max_steps=0 to train for train.epochs, or train.epochs=0 to train for train.max_steps"
            )
        if not self.epochs and self.max_steps < 1:
            raise ConfigError("train.max_steps must be >= 1 (or 0 with train.epochs > 0)")
        if self.micro_batch_size < 1 or self.log_every < 1:
            raise ConfigError("train.micro_batch_size and train.log_every must be >= 1")
        if min(self.save_every, self.global_batch_size, self.keep_last, self.eval_every) < 0:
            raise ConfigError("train.save_every, train.global_batch_size, train.keep_last and train.eval_every must be >= 0")
        if self.global_batch_size and self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)  # used when data.path=demo
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)  # used when train.eval_every > 0
    output_dir: str = "runs/debug"
    seed: int = 0

    def validate(self) -> None:
        for section in (self.model, self.align, self.data, self.optim, self.train):
            section.validate()
        if self.model.class_conditional and self.align.enabled and self.align.target == "rep":
            raise ConfigError(
                "align.target=rep aligns the image-start token, which a class-to-image sequence ([class] codes) has "
                "not; use align.target=hybnext (every position: each one predicts an image code)"
            )
        if self.train.eval_every:
            self.eval.validate()
        if self.data.is_demo:  # the demo data must fit the model's vocabulary and the align encoder
            self.demo.validate()
            self.demo.check_run(self.model, self.align, self.data.max_seq_len)
        shape = self.model.shape()
        num_layers = shape.num_layers
        if self.align.enabled and not 1 <= self.align.layer <= num_layers:
            raise ConfigError(
                f"align.layer={self.align.layer} is out of range: the backbone has {num_layers} decoder layers, "
                f"so use 1..{num_layers} (layer L is Hugging Face hidden_states[L], the output of decoder layer L)"
            )
        if self.data.max_seq_len > shape.max_positions > 0:
            raise ConfigError(
                f"data.max_seq_len={self.data.max_seq_len} exceeds the backbone's max_position_embeddings="
                f"{shape.max_positions}; lower data.max_seq_len"
            )


def load_run_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """YAML file (default: the embedded ``configs/debug.yaml``) + ``key=value`` overrides -> a checked RunConfig."""
    cfg = load_dataclass_config(RunConfig, path or DEFAULT_CONFIG, overrides)
    cfg.validate()
    return cfg
