"""The training loop: data -> DeepSpeed engine -> metrics, checkpoints and resume.

One "step" is one optimizer update = ``grad_accum_steps`` micro-batches per rank. Checkpoint tags
are ``step_<n>`` where n updates are done; ``train.resume=auto`` continues from ``checkpoints/latest``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from arra_ds import dist


@dataclass
class TrainConfig:
    max_steps: int = 200
    micro_batch_size: int = 8  # per rank
    global_batch_size: int = 0  # samples per optimizer step over all ranks; 0 = micro * world
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    eval_every: int = 0  # steps between in-training evaluations (sample grid + FID, see eval.*); 0 = off
    resume: str = ""  # "" (fresh), "auto" (latest checkpoint in output_dir if any) or a checkpoint dir
    tensorboard: bool = True
    progress_bar: bool = True

    def grad_accum_steps(self, world_size: int) -> int:
        from arra_ds.config import ConfigError

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
        from arra_ds.config import ConfigError

        if self.max_steps < 1 or self.micro_batch_size < 1 or self.log_every < 1:
            raise ConfigError("train.max_steps, train.micro_batch_size and train.log_every must be >= 1")
        if self.save_every < 0 or self.global_batch_size < 0 or self.eval_every < 0:
            raise ConfigError("train.save_every, train.eval_every and train.global_batch_size must be >= 0")
        if self.global_batch_size and self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )


class NonFiniteLossError(RuntimeError):
    pass


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _batches(loader):
    """Endless stream over epochs; StreamingDataset reshuffles with a new epoch seed on each pass."""
    while True:
        for batch in loader:
            yield batch


def _resume_target(cfg, ckpt_root: Path) -> tuple[Path, str] | None:
    from arra_ds.train.engine import latest_tag

    if not cfg.train.resume:
        return None
    if cfg.train.resume == "auto":
        tag = latest_tag(ckpt_root)
        return (ckpt_root, tag) if tag else None
    path = Path(cfg.train.resume)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume={cfg.train.resume}: no such checkpoint directory")
    return path.parent, path.name


def _model_flops_per_token(model, seq_len: int) -> float:
    from arra_ds.train.flops import training_flops_per_token

    config = model.backbone.config
    embed = model.backbone.model.embed_tokens.weight
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    non_embedding = total - getattr(embed, "ds_numel", embed.numel())
    return training_flops_per_token(non_embedding, config.num_hidden_layers, config.hidden_size, seq_len)


def run_training(cfg, ds_config_path: str | Path) -> dict:
    """Train per ``cfg`` (a validated RunConfig) with the DeepSpeed JSON at ``ds_config_path``."""
    from arra_ds.config import save_config
    from arra_ds.data.loader import build_dataloader, build_dataset, feature_dim_of, prepare_data_dir, resolve_feature_dim
    from arra_ds.train.engine import Engine, fill_ds_config, init_distributed, load_ds_config
    from arra_ds.train.flops import peak_flops
    from arra_ds.train.metrics import MetricsLogger
    from arra_ds.train.optim import lr_at

    init_distributed()
    dist.seed_everything(cfg.seed)
    world = dist.world_size()
    is_rank0 = dist.is_rank0()
    run_dir = Path(cfg.output_dir)
    ckpt_root = run_dir / "checkpoints"
    micro = cfg.train.micro_batch_size
    accum = cfg.train.grad_accum_steps(world)

    # ---- data (D comes from it) -----------------------------------------------------------------
    remote, local = prepare_data_dir(cfg.data, cfg.seed)
    feature_column = cfg.align.feature_column if cfg.align.enabled else None
    dataset = build_dataset(cfg.data, micro, cfg.seed, feature_column, remote, local)
    if cfg.align.enabled:
        cfg.align.feature_dim = resolve_feature_dim(cfg.align, feature_dim_of(dataset, feature_column))

    hidden_size = cfg.model.debug.hidden_size if cfg.model.source == "debug" else None
    if hidden_size is None:
        hidden_size = int(json.loads((Path(cfg.model.path) / "config.json").read_text())["hidden_size"])
    ds_config = fill_ds_config(load_ds_config(ds_config_path), cfg, world, hidden_size)
    if is_rank0:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))

    engine = Engine(cfg, ds_config)  # built from the common seed: identical initialisation everywhere
    model = engine.model
    dist.seed_everything(dist.rank_seed(cfg.seed))  # then each rank draws its own dropout masks
    loader = build_dataloader(dataset, cfg.data, micro, model.vocab.pad_id)

    # ---- resume -------------------------------------------------------------------------------
    start_step, samples_seen = 0, 0
    target = _resume_target(cfg, ckpt_root)
    if target is not None:
        client_state = engine.load(*target)
        start_step = int(client_state["step"])
        samples_seen = int(client_state["samples_seen"])
        loader.load_state_dict(client_state["loader"])
        _set_rng_state(client_state["rng"])
        dist.print0(f"resumed from {target[0] / target[1]} at step {start_step} ({samples_seen} samples seen)")

    logger = MetricsLogger(run_dir, is_rank0, cfg.train.tensorboard, resume_step=start_step if target else None)
    evaluator = None
    if cfg.train.eval_every:
        from arra_ds.eval.train_eval import TrainEvaluator

        evaluator = TrainEvaluator(cfg.eval, dataset, model.vocab, run_dir, engine.device, source=cfg.data.path)
    peak = peak_flops()
    flops_per_token = _model_flops_per_token(model, cfg.data.max_seq_len) if peak else None
    global_batch = micro * accum * world
    engine.train()
    batches = _batches(loader)
    progress = tqdm(
        total=cfg.train.max_steps, initial=start_step, disable=not (is_rank0 and cfg.train.progress_bar),
        desc="train", dynamic_ncols=True,
    )
    history: list[dict] = []
    last_saved = None
    run_start = time.perf_counter()
    try:
        for step in range(start_step, cfg.train.max_steps):
            lr = lr_at(step, cfg.train.max_steps, cfg.optim)
            engine.set_lr(lr)
            step_start = time.perf_counter()
            # summed over micro-batches and ranks: loss, ar, gva, z, cos, non-finite count, tokens
            totals = torch.zeros(7, dtype=torch.float64)
            for micro_step in range(accum):
                batch = next(batches)
                out = engine.forward(batch)
                # reduced on the model's device: NCCL cannot reduce CPU tensors
                values = torch.stack([out.loss.detach(), out.loss_ar, out.loss_gva, out.loss_z, out.cos]).double()
                nonfinite = (~torch.isfinite(values)).any().double().reshape(1)
                tokens = torch.tensor([float(batch["attention_mask"].sum())], dtype=torch.float64, device=values.device)
                stats = dist.all_reduce_sum(torch.cat([values, nonfinite, tokens])).cpu()
                if stats[5] > 0:
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step + 1} (micro-batch {micro_step}) on "
                        f"{int(stats[5])} rank(s): this rank has loss={out.loss.item():.4g} ar={out.loss_ar.item():.4g} "
                        f"gva={out.loss_gva.item():.4g} z={out.loss_z.item():.4g}. The run stops before the update; "
                        f"the last good checkpoint is {last_saved or 'none in this run'}. Lower optim.lr or check the data."
                    )
                totals += stats
                engine.backward(out.loss)
                engine.step()
            step_time = time.perf_counter() - step_start
            samples_seen += global_batch
            n = accum * world
            record = {
                "loss": totals[0].item() / n,
                "loss_ar": totals[1].item() / n,
                "loss_gva": totals[2].item() / n,
                "loss_z": totals[3].item() / n,
                "cos": totals[4].item() / n,
                "lr": lr,
                "grad_norm": engine.grad_norm(),
                "tokens_per_s": totals[6].item() / step_time,
                "samples_seen": samples_seen,
            }
            if peak:
                record["mfu"] = flops_per_token * record["tokens_per_s"] / (peak * world)
            done = step + 1
            history.append(record)
            if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
                logger.log(done, record)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.3f}", cos=f"{record['cos']:.3f}")

            if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == cfg.train.max_steps:
                tag = f"step_{done:08d}"
                client_state = {
                    "step": done,
                    "samples_seen": samples_seen,
                    "loader": loader.state_dict(),
                    "rng": _rng_state(),
                }
                engine.save(ckpt_root, tag, client_state)
                last_saved = ckpt_root / tag
            if evaluator is not None and done % cfg.train.eval_every == 0:
                evaluator.log(engine, done, logger)
    finally:
        progress.close()
        logger.close()

    elapsed = time.perf_counter() - run_start
    summary = {
        "steps": cfg.train.max_steps,
        "resumed_from_step": start_step,
        "wall_s": elapsed,
        "final_loss": history[-1]["loss"] if history else math.nan,
        "final_cos": history[-1]["cos"] if history else math.nan,
        "mean_tokens_per_s": float(np.mean([h["tokens_per_s"] for h in history])) if history else 0.0,
        "samples_seen": samples_seen,
        "checkpoint": str(last_saved) if last_saved else None,
        "run_dir": str(run_dir),
    }
    if is_rank0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(
            f"done: {summary['steps']} steps in {elapsed:.1f}s, final loss {summary['final_loss']:.4f} "
            f"(cos {summary['final_cos']:.3f}), {summary['mean_tokens_per_s']:.0f} tokens/s; "
            f"checkpoint {summary['checkpoint']}; metrics {run_dir / 'metrics.jsonl'}",
            flush=True,
        )
    return summary
