"""The trainer, in steps (torchtitan's shape): ``Trainer(cfg, ds_config)`` sets everything up, ``train_step()`` is one
optimizer update and returns its metrics, ``save()`` / ``evaluate()`` are the hooks the loop calls, ``fit()`` drives
them and returns the summary; ``run_training`` is what ``launch/train.py`` calls.

Setup resolves the run config once, before anything is built: the global batch and the streaming canonical node
count (a resumed run keeps its checkpoint's, so the sample order is the same on any number of ranks) and the
feature width D (read from the data). The resolved config is saved in the run directory; nothing changes it
afterwards (``Trainer.cfg``).

One "step" is one optimizer update = ``grad_accum_steps`` micro-batches per rank. Checkpoint tags are
``step_<n>`` where n updates are done; ``train.resume=auto`` continues from ``checkpoints/latest`` (see
``arra_ds/train/checkpoint.py`` for the atomic layout). A resumed run restores the engine, the streaming loader
position, every rank's RNG states and the counters, so from the checkpoint on its ``metrics.jsonl`` equals the
uninterrupted run's and it sees every sample exactly once per epoch. On another number of ranks it resumes too
(through DeepSpeed's universal checkpoint form); only per-rank RNG streams cannot carry over, so it matches the
uninterrupted run up to fp32 summation order and dropout.

SIGTERM/SIGUSR1 (``arra_ds/train/preemption.py``) end the run at the next step boundary with a checkpoint;
``run_training`` then returns a summary with ``preempted: true`` and the launcher exits with ``REQUEUE_EXIT_CODE``.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from arra_ds import distributed
from arra_ds.checkpoints import CHECKPOINTS_DIR, RUN_CONFIG_FILE, read_run_data, resolve_resume
from arra_ds.config import save_config
from arra_ds.data.loader import (
    DataConfig,
    build_dataloader,
    build_dataset,
    feature_dim_of,
    remove_stale_shared_memory,
    resolve_canonical_nodes,
    resolve_feature_dim,
    streaming_location,
)
from arra_ds.demo.config import DemoDataConfig
from arra_ds.demo.dataset import demo_dir, write_demo_dataset
from arra_ds.errors import UserError
from arra_ds.eval.train_eval import build_train_evaluator
from arra_ds.io import atomic_write_json
from arra_ds.model.arra import ARRAModel
from arra_ds.train import checkpoint as ckpt
from arra_ds.train.data_record import describe_training_data, write_data_record
from arra_ds.train.engine import Engine, fill_ds_config, init_distributed, load_ds_config
from arra_ds.train.flops import peak_flops
from arra_ds.train.metrics import MetricsLogger
from arra_ds.train.optim import lr_at, steps_per_epoch
from arra_ds.train.preemption import PreemptionWatcher
from arra_ds.train.run_assets import write_run_assets
from arra_ds.train.run_config import RunConfig
from arra_ds.train.sample_log import SampleLog


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN/inf: the run stops before the update (exit code 3); the message says what to try."""

    exit_code = 3


# Per micro-step statistics, summed over ranks with one all-reduce. The preemption flag rides along,
# so every rank learns about a signal received by any rank at the same step, at no extra cost.
STAT_NAMES = (
    "loss", "loss_ar", "loss_gva", "loss_z", "cos", "cos_first",  # per-rank means; 0 for an all-skipped (filler) batch
    "nonfinite",  # ranks whose loss is not finite
    "tokens",  # attended tokens
    "batches",  # ranks whose micro-batch held at least one sample
    "skipped_overlong", "truncated_overlong",  # samples
    "preempt",  # ranks that received SIGTERM/SIGUSR1
)
STAT = {name: i for i, name in enumerate(STAT_NAMES)}
LOSS_NAMES = STAT_NAMES[: STAT["nonfinite"]]
ALIGNMENT_NAMES = ("loss_gva", "cos", "cos_first")  # None in the record once lambda is 0 for good (align.stop_step)


def _batches(loader) -> Iterator[dict]:
    """Endless stream over epochs; StreamingDataset reshuffles with a new epoch seed on each pass."""
    while True:
        for batch in loader:
            yield batch


def resolve_data_path(data: DataConfig, demo: DemoDataConfig, seed: int) -> str:
    """The MDS location to read; ``data.path=demo`` is built on first use (local rank 0 of each node
    writes it into the cache, the other ranks wait). Call on every rank."""
    remove_stale_shared_memory()
    if not data.is_demo:
        return data.path
    location = demo_dir(demo, seed)
    if distributed.local_rank() == 0:
        write_demo_dataset(location, demo, seed)
    distributed.barrier()
    return str(location)


class Trainer:
    """One training run on this rank. Build it inside ``PreemptionWatcher`` (``run_training`` does)."""

    def __init__(self, cfg: RunConfig, ds_config_path: str | Path, watcher: PreemptionWatcher | None = None):
        distributed.seed_everything(cfg.seed)
        self.watcher = watcher
        self.world = distributed.world_size()
        self.is_rank0 = distributed.is_rank0()
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_root = self.run_dir / CHECKPOINTS_DIR

        # ---- the checkpoint to resume: it fixes the global batch and the sample order --------------
        if self.is_rank0:
            interrupted = ckpt.clean_interrupted(self.ckpt_root)
            if interrupted:
                print(f"removed interrupted checkpoint saves {interrupted} from {self.ckpt_root}", flush=True)
        distributed.barrier()
        self.resume_dir = resolve_resume(cfg.train.resume, self.ckpt_root)
        resumed = ckpt.read_trainer_state(self.resume_dir) if self.resume_dir is not None else None
        cfg = replace(
            cfg,
            train=replace(cfg.train, global_batch_size=ckpt.resolve_global_batch(cfg.train, resumed, self.world)),
            data=replace(cfg.data, num_canonical_nodes=resolve_canonical_nodes(cfg.data, resumed.loader if resumed else None)),
        )

        # ---- data: D (the projector's width) comes from it ------------------------------------------
        micro = cfg.train.micro_batch_size
        remote, self.local_data = streaming_location(cfg.data, resolve_data_path(cfg.data, cfg.demo, cfg.seed))
        feature_column = cfg.align.feature_column if cfg.align.enabled else None
        self.dataset = build_dataset(cfg.data, micro, cfg.seed, feature_column, remote, self.local_data,
                                     cfg.model.class_conditional)
        if cfg.align.enabled:
            feature_dim = resolve_feature_dim(cfg.align, feature_dim_of(self.dataset, feature_column))
            cfg = replace(cfg, align=replace(cfg.align, feature_dim=feature_dim))
            self.dataset.converter.feature_dim = feature_dim  # every later sample must have this width
        max_steps = cfg.train.resolved_max_steps(self.dataset.size)  # train.epochs: from the data's size
        if max_steps != cfg.train.max_steps:
            distributed.print0(f"train.epochs={cfg.train.epochs}: {max_steps} steps ({self.dataset.size} samples / "
                               f"global batch {cfg.train.global_batch_size} per step)")
            cfg = replace(cfg, train=replace(cfg.train, max_steps=max_steps))
        self.cfg = cfg  # resolved: nothing below changes it
        self.accum = cfg.train.grad_accum_steps(self.world)
        self.global_batch = micro * self.accum * self.world

        ds_config = fill_ds_config(load_ds_config(ds_config_path), cfg.train, cfg.optim, self.world,
                                   cfg.model.shape().hidden_size)
        if self.is_rank0:
            save_config(cfg, self.run_dir / RUN_CONFIG_FILE)
            atomic_write_json(self.run_dir / "ds_config.json", ds_config)

        # Seed right before the model is built: the initialisation must not depend on whether this
        # process built the demo data set (which draws random numbers) or found it in the cache.
        distributed.seed_everything(cfg.seed)
        self.engine = Engine(cfg.model, cfg.align, cfg.optim, ds_config)  # identical initialisation on every rank
        self.model: ARRAModel = self.engine.model
        distributed.seed_everything(distributed.rank_seed(cfg.seed))  # then each rank draws its own dropout masks
        self.loader = build_dataloader(self.dataset, cfg.data, micro, self.model.pad_id, cfg.seed)
        # what generation and evaluation need to know about the data and the base checkpoint (run_assets.py)
        data_record = describe_training_data(cfg.data.path, cfg.data.is_demo, self.local_data, self.dataset,
                                             self.model.vocab, cfg.align.encoder)
        if self.is_rank0:
            write_data_record(self.run_dir, write_run_assets(self.run_dir, cfg.model, data_record))
        distributed.barrier()
        # every rank reads what inference will read: the copies in the run's assets (an image tokenizer config the
        # data's meta held inline is a file only there)
        data_record = read_run_data(self.run_dir) or data_record

        # ---- resume ---------------------------------------------------------------------------
        self.state = ckpt.TrainerState()
        if self.resume_dir is not None:
            self.state = ckpt.load_checkpoint(self.engine, self.resume_dir, cfg.seed)
            self.loader.load_state_dict(self.state.loader)
            elastic = f" on {self.world} rank(s), written by {self.state.world_size}" if self.state.world_size != self.world else ""
            distributed.print0(
                f"resumed from {self.resume_dir} at step {self.state.step} ({self.state.samples_seen} samples seen){elastic}"
            )
        elif cfg.train.resume == "auto":
            distributed.print0(f"train.resume=auto: no checkpoint in {self.ckpt_root}, starting fresh")
        # what the next save records
        self.state.world_size, self.state.global_batch_size = self.world, cfg.train.global_batch_size
        self.start_step = self.state.step
        self.last_saved = self.resume_dir
        ckpt.ensure_disk_space(self.ckpt_root, self.engine.num_parameters())

        resume_step = self.start_step if self.resume_dir is not None else None
        self.logger = MetricsLogger(self.run_dir, self.is_rank0, cfg.train.tensorboard, resume_step=resume_step)
        self.sample_log = SampleLog(self.run_dir, distributed.rank(), cfg.train.log_samples, resume_step, self.world)
        self.evaluator = None
        if cfg.train.eval_every:
            self.evaluator = build_train_evaluator(cfg.eval, cfg.model, self.dataset, self.model.vocab, self.run_dir,
                                                   self.engine.device, self.local_data, data_record)
        self.peak = peak_flops()
        self.flops_per_token = self.model.flops_per_token(cfg.data.max_seq_len) if self.peak else None
        self.epoch_steps = steps_per_epoch(self.dataset.size, self.global_batch)  # for optim.warmup_epochs
        if cfg.optim.warmup_epochs:
            distributed.print0(
                f"optim.warmup_epochs={cfg.optim.warmup_epochs}: {cfg.optim.resolved_warmup_steps(self.epoch_steps)} "
                f"warm-up steps ({self.dataset.size} samples / global batch {self.global_batch} = {self.epoch_steps} "
                "steps per epoch)"
            )
        self.batches = _batches(self.loader)
        self.history: list[dict] = []
        self.preempted = False
        self.engine.train()

    # ---- one optimizer update ----------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer update (``grad_accum_steps`` micro-batches on every rank) at the next step; returns its
        record (the metrics.jsonl line without the step). Raises NonFiniteLossError before a non-finite update."""
        cfg, engine, state = self.cfg, self.engine, self.state
        step = state.step
        lr = lr_at(step, cfg.train.max_steps, cfg.optim, self.epoch_steps)
        engine.set_lr(lr)
        # lambda of this step (align.schedule): a function of the step alone, so a resumed run, also on another
        # number of ranks, follows it exactly; every rank decides alike whether the projector still runs
        align_weight = self.model.set_align_step(step, cfg.train.max_steps)
        step_start = time.perf_counter()
        totals = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
        for micro_step in range(self.accum):
            batch = next(self.batches)
            meta = batch.pop("meta")
            self.sample_log.log(step + 1, micro_step, meta.uids, meta.skipped_uids)
            out = engine.forward(batch)
            has_samples = meta.num_samples > 0
            values = torch.stack([out.loss.detach(), out.loss_ar, out.loss_gva, out.loss_z, out.cos, out.cos_first]).double()
            nonfinite = float(not bool(torch.isfinite(values).all()))
            tokens = float(batch["attention_mask"].sum()) if has_samples else 0.0
            if not has_samples:  # a filler batch (every sample skipped): runs, but counts for nothing
                values = torch.zeros_like(values)
            requested = float(self.watcher.requested) if self.watcher is not None else 0.0
            local = [nonfinite, tokens, float(has_samples), float(len(meta.skipped_uids)), float(meta.num_truncated),
                     requested]
            # reduced on the model's device: NCCL cannot reduce CPU tensors
            local = torch.tensor(local, dtype=torch.float64, device=values.device)
            stats = distributed.all_reduce_sum(torch.cat([values, local])).cpu()
            if stats[STAT["nonfinite"]] > 0:
                raise NonFiniteLossError(
                    f"non-finite loss at step {step + 1} (micro-batch {micro_step}) on "
                    f"{int(stats[STAT['nonfinite']])} rank(s): this rank has loss={out.loss.item():.4g} "
                    f"ar={out.loss_ar.item():.4g} gva={out.loss_gva.item():.4g} z={out.loss_z.item():.4g}. "
                    f"The run stops before the update; the last good checkpoint is "
                    f"{self.last_saved or 'none in this run'}. Lower optim.lr or check the data."
                )
            totals += stats
            # DeepSpeed averages gradients over all ranks; a filler batch contributes zeros, so the
            # ranks with samples rescale to the mean over themselves.
            with_samples = stats[STAT["batches"]].item()
            if not has_samples:
                loss = out.loss * 0.0
            elif with_samples < self.world:
                loss = out.loss * (self.world / with_samples)
            else:
                loss = out.loss
            engine.backward(loss)
            engine.step()
        step_time = time.perf_counter() - step_start
        state.step = step + 1
        state.samples_seen += self.global_batch
        state.skipped_overlong += int(totals[STAT["skipped_overlong"]])
        state.truncated_overlong += int(totals[STAT["truncated_overlong"]])
        # a signal during the last step needs no requeue: the run is complete
        self.preempted = bool(totals[STAT["preempt"]] > 0) and state.step < cfg.train.max_steps

        num_batches = totals[STAT["batches"]].item()
        record = {name: (totals[STAT[name]].item() / num_batches if num_batches else None) for name in LOSS_NAMES}
        if self.model.align_head is not None and not self.model.align_active:
            record.update(dict.fromkeys(ALIGNMENT_NAMES))  # no alignment term any more: nothing to report
        record.update(
            align_weight=align_weight,
            lr=lr,
            grad_norm=engine.grad_norm(),
            tokens_per_s=totals[STAT["tokens"]].item() / step_time,
            samples_seen=state.samples_seen,
            skipped_overlong=state.skipped_overlong,
            truncated_overlong=state.truncated_overlong,
        )
        if self.peak:
            record["mfu"] = self.flops_per_token * record["tokens_per_s"] / (self.peak * self.world)
        self.history.append(record)
        return record

    # ---- hooks --------------------------------------------------------------------------------------
    def save(self) -> Path:
        """A checkpoint of the current step (every rank; atomic, see train/checkpoint.py)."""
        ckpt.ensure_disk_space(self.ckpt_root, self.engine.num_parameters())
        self.state.loader = self.loader.state_dict()
        self.last_saved = ckpt.save_checkpoint(self.engine, self.ckpt_root, self.state, self.cfg.train.keep_last)
        return self.last_saved

    def evaluate(self) -> None:
        """The in-training evaluation at the current step (every rank takes part), if it is on."""
        if self.evaluator is not None:
            self.evaluator.log(self.engine, self.state.step, self.logger)

    def _due(self, every: int) -> bool:
        done = self.state.step
        return (bool(every) and done % every == 0) or done == self.cfg.train.max_steps

    # ---- the loop --------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Steps up to train.max_steps (or a preemption), logging, saving and evaluating on schedule; the summary."""
        cfg = self.cfg
        progress = tqdm(
            total=cfg.train.max_steps, initial=self.start_step, disable=not (self.is_rank0 and cfg.train.progress_bar),
            desc="train", dynamic_ncols=True,
        )
        run_start = time.perf_counter()
        try:
            while self.state.step < cfg.train.max_steps:
                record = self.train_step()
                done = self.state.step
                if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
                    self.logger.log(done, record)
                progress.update(1)
                if record["loss"] is not None:
                    shown = {"loss": f"{record['loss']:.3f}"}
                    if record["cos"] is not None:
                        shown["cos"] = f"{record['cos']:.3f}"
                    progress.set_postfix(shown)
                if self._due(cfg.train.save_every) or self.preempted:
                    self.save()
                if self.preempted:
                    received = self.watcher.received if self.watcher is not None else None
                    signal_name = received.name if received else "a signal on another rank"
                    distributed.print0(
                        f"preempted by {signal_name}: checkpoint {self.last_saved} written at step {done}; exiting for requeue"
                    )
                    break
                if self.evaluator is not None and self._due(cfg.train.eval_every):
                    self.evaluate()
        finally:
            progress.close()
            self.logger.close()
        return self.summary(time.perf_counter() - run_start)

    def summary(self, elapsed: float) -> dict:
        """The run's summary (summary.json and the last console line, rank 0)."""
        cfg, state, history = self.cfg, self.state, self.history
        losses = [h["loss"] for h in history if h["loss"] is not None]
        summary = {
            "steps": state.step,
            "max_steps": cfg.train.max_steps,
            "resumed_from_step": self.start_step,
            "preempted": self.preempted,
            "wall_s": elapsed,
            "final_loss": losses[-1] if losses else math.nan,
            "final_cos": next((h["cos"] for h in reversed(history) if h["cos"] is not None), math.nan),
            "mean_tokens_per_s": float(np.mean([h["tokens_per_s"] for h in history])) if history else 0.0,
            "samples_seen": state.samples_seen,
            "skipped_overlong": state.skipped_overlong,
            "truncated_overlong": state.truncated_overlong,
            "checkpoint": str(self.last_saved) if self.last_saved else None,
            "run_dir": str(self.run_dir),
        }
        if self.is_rank0:
            atomic_write_json(self.run_dir / "summary.json", summary)
            skipped = (
                f"; over-long samples: {state.skipped_overlong} skipped, {state.truncated_overlong} truncated"
                if state.skipped_overlong or state.truncated_overlong else ""
            )
            print(
                f"{'preempted' if self.preempted else 'done'}: {state.step}/{cfg.train.max_steps} steps in {elapsed:.1f}s, "
                f"final loss {summary['final_loss']:.4f} (cos {summary['final_cos']:.3f}), "
                f"{summary['mean_tokens_per_s']:.0f} tokens/s{skipped}; checkpoint {summary['checkpoint']}; "
                f"metrics {self.run_dir / 'metrics.jsonl'}",
                flush=True,
            )
        return summary


def run_training(cfg: RunConfig, ds_config_path: str | Path) -> dict:
    """Train per ``cfg`` (a validated RunConfig) with the DeepSpeed JSON at ``ds_config_path``; the summary."""
    init_distributed()
    # Installed before anything slow: a signal during start-up must not kill the job unsaved.
    with PreemptionWatcher() as watcher:
        return Trainer(cfg, ds_config_path, watcher).fit()
