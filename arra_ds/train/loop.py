"""The training loop: data -> DeepSpeed engine -> metrics, checkpoints, resume and preemption.

One "step" is one optimizer update = ``grad_accum_steps`` micro-batches per rank. Checkpoint tags
are ``step_<n>`` where n updates are done; ``train.resume=auto`` continues from ``checkpoints/latest``
(see ``arra_ds/train/checkpoint.py`` for the atomic layout). A resumed run restores the engine, the
streaming loader position, every rank's RNG states and the counters, so from the checkpoint on its
``metrics.jsonl`` equals the uninterrupted run's and it sees every sample exactly once per epoch. On
another number of ranks it resumes too (through DeepSpeed's universal checkpoint form), keeping the
checkpoint's global batch and canonical node count (the global sample order); only per-rank RNG
streams cannot carry over, so it matches the uninterrupted run up to fp32 summation order and dropout.

SIGTERM/SIGUSR1 (``arra_ds/train/preemption.py``) end the run at the next step boundary with a
checkpoint; ``run_training`` then returns a summary with ``preempted: true`` and the launcher exits
with ``REQUEUE_EXIT_CODE``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from arra_ds import distributed
from arra_ds.checkpoints import CHECKPOINTS_DIR, RUN_CONFIG_FILE, resolve_resume
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
from arra_ds.train.run_config import RunConfig
from arra_ds.train.sample_log import SampleLog


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN/inf: the run stops before the update (exit code 3); the message says what to try."""

    exit_code = 3


# Per micro-step statistics, summed over ranks with one all-reduce. The preemption flag rides along,
# so every rank learns about a signal received by any rank at the same step, at no extra cost.
STAT_NAMES = (
    "loss", "loss_ar", "loss_gva", "loss_z", "cos",  # per-rank means; 0 for an all-skipped (filler) batch
    "nonfinite",  # ranks whose loss is not finite
    "tokens",  # attended tokens
    "batches",  # ranks whose micro-batch held at least one sample
    "skipped_overlong", "truncated_overlong",  # samples
    "preempt",  # ranks that received SIGTERM/SIGUSR1
)
STAT = {name: i for i, name in enumerate(STAT_NAMES)}
LOSS_NAMES = STAT_NAMES[: STAT["nonfinite"]]


def _batches(loader):
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


def run_training(cfg: RunConfig, ds_config_path: str | Path) -> dict:
    """Train per ``cfg`` (a validated RunConfig) with the DeepSpeed JSON at ``ds_config_path``."""
    init_distributed()
    # Installed before anything slow: a signal during start-up must not kill the job unsaved.
    with PreemptionWatcher() as watcher:
        return _train(cfg, ds_config_path, watcher)


def _train(cfg: RunConfig, ds_config_path: str | Path, watcher: PreemptionWatcher) -> dict:
    distributed.seed_everything(cfg.seed)
    world = distributed.world_size()
    is_rank0 = distributed.is_rank0()
    run_dir = Path(cfg.output_dir)
    ckpt_root = run_dir / CHECKPOINTS_DIR
    micro = cfg.train.micro_batch_size

    # ---- the checkpoint to resume: it fixes the global batch and the sample order ------------------
    if is_rank0:
        interrupted = ckpt.clean_interrupted(ckpt_root)
        if interrupted:
            print(f"removed interrupted checkpoint saves {interrupted} from {ckpt_root}", flush=True)
    distributed.barrier()
    resume_dir = resolve_resume(cfg.train.resume, ckpt_root)
    resumed = ckpt.read_trainer_state(resume_dir) if resume_dir is not None else None
    ckpt.keep_global_batch(cfg.train, resumed, world)  # the run config records what this start uses
    cfg.data.num_canonical_nodes = resolve_canonical_nodes(cfg.data, resumed.loader if resumed else None)
    accum = cfg.train.grad_accum_steps(world)

    # ---- data (D comes from it) -----------------------------------------------------------------
    remote, local = streaming_location(cfg.data, resolve_data_path(cfg.data, cfg.demo, cfg.seed))
    feature_column = cfg.align.feature_column if cfg.align.enabled else None
    dataset = build_dataset(cfg.data, micro, cfg.seed, feature_column, remote, local, cfg.model.class_conditional)
    if cfg.align.enabled:
        cfg.align.feature_dim = resolve_feature_dim(cfg.align, feature_dim_of(dataset, feature_column))
        dataset.converter.feature_dim = cfg.align.feature_dim  # every later sample must have this width

    ds_config = fill_ds_config(load_ds_config(ds_config_path), cfg.train, cfg.optim, world, cfg.model.hidden_size())
    if is_rank0:
        save_config(cfg, run_dir / RUN_CONFIG_FILE)
        atomic_write_json(run_dir / "ds_config.json", ds_config)

    # Seed right before the model is built: the initialisation must not depend on whether this
    # process built the demo data set (which draws random numbers) or found it in the cache.
    distributed.seed_everything(cfg.seed)
    engine = Engine(cfg.model, cfg.align, cfg.optim, ds_config)  # identical initialisation on every rank
    model: ARRAModel = engine.model
    distributed.seed_everything(distributed.rank_seed(cfg.seed))  # then each rank draws its own dropout masks
    loader = build_dataloader(dataset, cfg.data, micro, model.pad_id, cfg.seed)
    # what generation and evaluation need to know about the data (image grid, VQGAN, held-out prompts)
    data_record = describe_training_data(cfg.data.path, cfg.data.is_demo, local, dataset, model.vocab, cfg.align.encoder)
    if is_rank0:
        write_data_record(run_dir, data_record)

    # ---- resume -------------------------------------------------------------------------------
    state = ckpt.TrainerState()
    if resume_dir is not None:
        state = ckpt.load_checkpoint(engine, resume_dir, cfg.seed)
        loader.load_state_dict(state.loader)
        elastic = f" on {world} rank(s), written by {state.world_size}" if state.world_size != world else ""
        distributed.print0(f"resumed from {resume_dir} at step {state.step} ({state.samples_seen} samples seen){elastic}")
    elif cfg.train.resume == "auto":
        distributed.print0(f"train.resume=auto: no checkpoint in {ckpt_root}, starting fresh")
    state.world_size, state.global_batch_size = world, cfg.train.global_batch_size  # what the next save records
    start_step = state.step
    ckpt.ensure_disk_space(ckpt_root, engine.num_parameters())

    resume_step = start_step if resume_dir is not None else None
    logger = MetricsLogger(run_dir, is_rank0, cfg.train.tensorboard, resume_step=resume_step)
    sample_log = SampleLog(run_dir, distributed.rank(), cfg.train.log_samples, resume_step, world)
    evaluator = None
    if cfg.train.eval_every:
        evaluator = build_train_evaluator(cfg.eval, dataset, model.vocab, run_dir, engine.device, local, data_record)
    peak = peak_flops()
    flops_per_token = model.flops_per_token(cfg.data.max_seq_len) if peak else None
    global_batch = micro * accum * world
    epoch_steps = steps_per_epoch(dataset.size, global_batch)  # for optim.warmup_epochs
    if cfg.optim.warmup_epochs:
        distributed.print0(
            f"optim.warmup_epochs={cfg.optim.warmup_epochs}: {cfg.optim.resolved_warmup_steps(epoch_steps)} warm-up steps "
            f"({dataset.size} samples / global batch {global_batch} = {epoch_steps} steps per epoch)"
        )
    engine.train()
    batches = _batches(loader)
    progress = tqdm(
        total=cfg.train.max_steps, initial=start_step, disable=not (is_rank0 and cfg.train.progress_bar),
        desc="train", dynamic_ncols=True,
    )
    history: list[dict] = []
    last_saved = resume_dir
    preempted = False
    run_start = time.perf_counter()
    try:
        for step in range(start_step, cfg.train.max_steps):
            lr = lr_at(step, cfg.train.max_steps, cfg.optim, epoch_steps)
            engine.set_lr(lr)
            step_start = time.perf_counter()
            totals = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
            for micro_step in range(accum):
                batch = next(batches)
                meta = batch.pop("meta")
                sample_log.log(step + 1, micro_step, meta.uids, meta.skipped_uids)
                out = engine.forward(batch)
                has_samples = meta.num_samples > 0
                values = torch.stack([out.loss.detach(), out.loss_ar, out.loss_gva, out.loss_z, out.cos]).double()
                nonfinite = float(not bool(torch.isfinite(values).all()))
                tokens = float(batch["attention_mask"].sum()) if has_samples else 0.0
                if not has_samples:  # a filler batch (every sample skipped): runs, but counts for nothing
                    values = torch.zeros_like(values)
                local = [nonfinite, tokens, float(has_samples), float(len(meta.skipped_uids)),
                         float(meta.num_truncated), float(watcher.requested)]
                # reduced on the model's device: NCCL cannot reduce CPU tensors
                local = torch.tensor(local, dtype=torch.float64, device=values.device)
                stats = distributed.all_reduce_sum(torch.cat([values, local])).cpu()
                if stats[STAT["nonfinite"]] > 0:
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step + 1} (micro-batch {micro_step}) on "
                        f"{int(stats[STAT['nonfinite']])} rank(s): this rank has loss={out.loss.item():.4g} "
                        f"ar={out.loss_ar.item():.4g} gva={out.loss_gva.item():.4g} z={out.loss_z.item():.4g}. "
                        f"The run stops before the update; the last good checkpoint is "
                        f"{last_saved or 'none in this run'}. Lower optim.lr or check the data."
                    )
                totals += stats
                # DeepSpeed averages gradients over all ranks; a filler batch contributes zeros, so the
                # ranks with samples rescale to the mean over themselves.
                with_samples = stats[STAT["batches"]].item()
                if not has_samples:
                    loss = out.loss * 0.0
                elif with_samples < world:
                    loss = out.loss * (world / with_samples)
                else:
                    loss = out.loss
                engine.backward(loss)
                engine.step()
            step_time = time.perf_counter() - step_start
            state.step = step + 1
            state.samples_seen += global_batch
            state.skipped_overlong += int(totals[STAT["skipped_overlong"]])
            state.truncated_overlong += int(totals[STAT["truncated_overlong"]])
            # a signal during the last step needs no requeue: the run is complete
            preempted = bool(totals[STAT["preempt"]] > 0) and state.step < cfg.train.max_steps

            num_batches = totals[STAT["batches"]].item()
            record = {name: (totals[STAT[name]].item() / num_batches if num_batches else None) for name in LOSS_NAMES}
            record.update(
                lr=lr,
                grad_norm=engine.grad_norm(),
                tokens_per_s=totals[STAT["tokens"]].item() / step_time,
                samples_seen=state.samples_seen,
                skipped_overlong=state.skipped_overlong,
                truncated_overlong=state.truncated_overlong,
            )
            if peak:
                record["mfu"] = flops_per_token * record["tokens_per_s"] / (peak * world)
            done = state.step
            history.append(record)
            if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
                logger.log(done, record)
            progress.update(1)
            if record["loss"] is not None:
                progress.set_postfix(loss=f"{record['loss']:.3f}", cos=f"{record['cos']:.3f}")

            if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == cfg.train.max_steps or preempted:
                ckpt.ensure_disk_space(ckpt_root, engine.num_parameters())
                state.loader = loader.state_dict()
                last_saved = ckpt.save_checkpoint(engine, ckpt_root, state, cfg.train.keep_last)
            if preempted:
                signal_name = watcher.received.name if watcher.received else "a signal on another rank"
                distributed.print0(f"preempted by {signal_name}: checkpoint {last_saved} written at step {done}; exiting for requeue")
                break
            if evaluator is not None and (done % cfg.train.eval_every == 0 or done == cfg.train.max_steps):
                evaluator.log(engine, done, logger)
    finally:
        progress.close()
        logger.close()

    elapsed = time.perf_counter() - run_start
    losses = [h["loss"] for h in history if h["loss"] is not None]
    summary = {
        "steps": state.step,
        "max_steps": cfg.train.max_steps,
        "resumed_from_step": start_step,
        "preempted": preempted,
        "wall_s": elapsed,
        "final_loss": losses[-1] if losses else math.nan,
        "final_cos": next((h["cos"] for h in reversed(history) if h["cos"] is not None), math.nan),
        "mean_tokens_per_s": float(np.mean([h["tokens_per_s"] for h in history])) if history else 0.0,
        "samples_seen": state.samples_seen,
        "skipped_overlong": state.skipped_overlong,
        "truncated_overlong": state.truncated_overlong,
        "checkpoint": str(last_saved) if last_saved else None,
        "run_dir": str(run_dir),
    }
    if is_rank0:
        atomic_write_json(run_dir / "summary.json", summary)
        skipped = (
            f"; over-long samples: {state.skipped_overlong} skipped, {state.truncated_overlong} truncated"
            if state.skipped_overlong or state.truncated_overlong else ""
        )
        print(
            f"{'preempted' if preempted else 'done'}: {state.step}/{cfg.train.max_steps} steps in {elapsed:.1f}s, "
            f"final loss {summary['final_loss']:.4f} (cos {summary['final_cos']:.3f}), "
            f"{summary['mean_tokens_per_s']:.0f} tokens/s{skipped}; checkpoint {summary['checkpoint']}; "
            f"metrics {run_dir / 'metrics.jsonl'}",
            flush=True,
        )
    return summary
