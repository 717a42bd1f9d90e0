"""Pre-tokenization, the whole run: an input -> MDS shards with VQ codes and encoder features together.

    cfg = PretokenizeConfig(input="train.json", out_dir="mds/train", tokenizer=".../text_tokenizer.json",
                            vqgan_yaml=".../vqgan.yaml", vqgan_ckpt=".../vqgan.ckpt",
                            encoders=[parse_encoder_arg("biomedclip=/models/biomedclip")])
    summary = run_pretokenize(cfg)                      # any text-to-image input -> text-to-image samples
    summary = run_pretokenize_imagefolder(folder_cfg)   # ImageFolder tree -> class-to-image samples

What is read and how a batch becomes samples is the task's (``task.py``: ``conversation.py`` with the
inputs of ``sources.py``, ``imagefolder.py``); this module runs any task. Output: ``out_dir/part-NNNNN/`` MDS directories
(columns of ``arra_ds.data.schema``), one merged ``out_dir/index.json`` (streaming's ``merge_index``)
and ``out_dir/report.json`` listing every skipped item with its reason.

How the work is split:
- The items are cut into parts of ``items_per_part`` consecutive items. A part is the unit of
  resumption: it is written to ``part-NNNNN.tmp`` and renamed to ``part-NNNNN`` only when complete,
  so a rerun skips finished parts and redoes the one that was interrupted.
- Process ``rank`` of ``world_size`` takes parts rank, rank + world_size, ... (disjoint shard sets).
  ``num_procs`` spawns the processes locally (one per GPU, or several CPU processes); an external
  launcher can set ``rank`` / ``world_size`` instead and run once more without them to merge.
- In each process a DataLoader with ``num_workers`` workers opens, checks, crops and preprocesses
  the items (VQ tokenizer input and every encoder's input); the main process groups records by the
  task's bucket (e.g. crop size) and runs the VQ tokenizer and the encoders on batches of ``batch_size``.

A bad item is skipped, listed in the report with its reason and counted in the summary; it never
stops the job. Text-to-image reasons: missing_image, unreadable_image, image_too_small (shorter side
below ``min_image_size``), empty_text, too_long (over ``max_seq_len``), bad_text (not tokenisable);
conversations also placeholder_count (``<|image|>`` count not equal to the image list),
unsupported_conversation (not one prompt + one image) and bad_format; caption tables bad_format (a
row that is not an object, a non-text value); pairs and shards missing_caption (an image without its
.txt), missing_image (a .txt without its image), unreadable_caption (not UTF-8) and, for shards,
unreadable_shard (a tar that cannot be read, from where it breaks). Image folders: unreadable or too
small images. The output does not depend on ``num_workers`` or the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
from collections import Counter
from pathlib import Path

import torch
from streaming.base.util import merge_index
from tqdm.auto import tqdm

from arra_ds.data.pretokenize.config import META_FILE, PART_DONE_FILE, REPORT_FILE, PretokenizeConfig, PretokenizeError
from arra_ds.data.pretokenize.conversation import ConversationTask
from arra_ds.data.pretokenize.imagefolder import ImageFolderConfig, ImageFolderTask
from arra_ds.data.pretokenize.items import record_loader
from arra_ds.data.pretokenize.janus import JanusPretokenizeConfig, JanusTask, write_janus_vq
from arra_ds.data.pretokenize.task import PretokenizeTask
from arra_ds.data.pretokenize.writer import PartWriter, part_done, part_name
from arra_ds.io import atomic_write_json


def resolve_device(requested: str, rank: int) -> torch.device:
    """auto: one GPU per process (cuda:<rank % gpus>) when CUDA is available, else the CPU."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def run_rank(task: PretokenizeTask, rank: int, world_size: int, show_progress: bool) -> int:
    """Write this rank's unfinished parts; returns how many items it processed."""
    cfg = task.cfg
    out_dir = Path(cfg.out_dir)
    items = task.items()
    num_parts = max(1, math.ceil(len(items) / cfg.items_per_part))
    todo = [p for p in range(rank, num_parts, world_size) if not part_done(out_dir, p)]
    if not todo:
        return 0
    models = task.load_models(resolve_device(cfg.device, rank))
    selected = [
        (i, items[i]) for p in todo for i in range(p * cfg.items_per_part, min(len(items), (p + 1) * cfg.items_per_part))
    ]
    loader = record_loader(task.item_dataset(selected, models), cfg)
    bar = tqdm(total=len(selected), desc=f"pretokenize rank {rank}", unit="img", disable=not show_progress)
    writer: PartWriter | None = None
    with torch.no_grad():
        for records in loader:
            for record in records:
                part = record["index"] // cfg.items_per_part
                if writer is None or writer.part != part:
                    if writer is not None:
                        writer.finish()
                    writer = PartWriter(out_dir, part, task, models)
                writer.add(record)
                bar.update(1)
        if writer is not None:
            writer.finish()
    bar.close()
    # Parts with no items (an empty input) still need a done marker so merging sees every part.
    for part in todo:
        if not part_done(out_dir, part):
            PartWriter(out_dir, part, task, models).finish()
    return len(selected)


def _spawned_rank(task: PretokenizeTask, rank: int, world_size: int, threads: int) -> None:
    torch.set_num_threads(threads)
    run_rank(task, rank, world_size, show_progress=task.cfg.progress and rank == 0)


def _check_meta(task: PretokenizeTask) -> None:
    """Record the content settings on the first run; refuse to resume with different ones."""
    out_dir = Path(task.cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = json.loads(json.dumps(task.content_key()))  # as it reads back from the file (tuples become lists)
    meta_path = out_dir / META_FILE
    if meta_path.is_file():
        previous = json.loads(meta_path.read_text())
        changed = sorted(k for k in set(key) | set(previous) if key.get(k) != previous.get(k))
        if changed:
            raise PretokenizeError(
                f"{out_dir} was written with different settings ({', '.join(changed)} changed); resuming would mix "
                "them. Use a new out_dir, or delete this one to start over."
            )
        return
    atomic_write_json(meta_path, key)  # ranks started together may all get here


def merge_parts(task: PretokenizeTask, num_items: int, num_parts: int) -> dict:
    """One index.json over all parts (streaming's merge_index) and the report; returns the summary."""
    cfg = task.cfg
    out_dir = Path(cfg.out_dir)
    parts = [json.loads((out_dir / part_name(p) / PART_DONE_FILE).read_text()) for p in range(num_parts)]
    written = sum(p["written"] for p in parts)
    skipped = [s for p in parts for s in p["skipped"]]
    summary = {
        "input": cfg.input,
        "out_dir": cfg.out_dir,
        "items": num_items,
        "written": written,
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "parts": num_parts,
        "columns": task.columns(),
        **task.report_extras(),
        "bad_items": skipped,
    }
    report = out_dir / REPORT_FILE
    atomic_write_json(report, summary)
    if written == 0:
        raise PretokenizeError(f"no sample was written: all {num_items} items were skipped; see {report}")
    index = out_dir / "index.json"
    index.unlink(missing_ok=True)
    logging.disable(logging.WARNING)  # merge_index warns about its temp dir and the existing out dir
    try:
        merge_index([str(out_dir / part_name(p) / "index.json") for p in range(num_parts) if parts[p]["written"]], str(out_dir))
    finally:
        logging.disable(logging.NOTSET)
    return summary


def format_summary(summary: dict | None, rank: int = 0) -> str:
    """The launcher's last line: the summary of a finished task, or (None) that this rank's parts are done."""
    if summary is None:
        return f"rank {rank}: its parts are done; run once more without rank/world_size to merge"
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["skipped_by_reason"].items()) or "none"
    return (
        f"pre-tokenised {summary['items']} items into {summary['out_dir']}: {summary['written']} samples written, "
        f"{summary['skipped']} skipped ({reasons}); report: {Path(summary['out_dir']) / REPORT_FILE}"
    )


def run_task(task: PretokenizeTask) -> dict | None:
    """Run (or resume) a pre-tokenization task. Returns the summary once every part is done, else None.

    With ``world_size > 1`` (external launcher) each call writes its own parts only; run once more
    with ``world_size=1`` (nothing left to do but merging) to get index.json and the report.
    """
    task.validate()
    cfg = task.cfg
    _check_meta(task)
    num_items = len(task.items())
    num_parts = max(1, math.ceil(num_items / cfg.items_per_part))
    out_dir = Path(cfg.out_dir)
    if cfg.num_procs > 1:
        # fork starts children without re-importing torch & co.; it is safe because this parent has
        # not touched CUDA or run a torch op. Each child loads its own models (and its own GPU).
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized() else "spawn"
        context = multiprocessing.get_context(method)
        threads = max(1, (os.cpu_count() or 1) // cfg.num_procs)
        procs = [context.Process(target=_spawned_rank, args=(task, r, cfg.num_procs, threads)) for r in range(cfg.num_procs)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        failed = [r for r, proc in enumerate(procs) if proc.exitcode != 0]
        if failed:
            raise PretokenizeError(f"pre-tokenization processes {failed} failed (see their errors above); rerun to resume")
    else:
        run_rank(task, cfg.rank, cfg.world_size, show_progress=cfg.progress and cfg.rank == 0)
    missing = [p for p in range(num_parts) if not part_done(out_dir, p)]
    if missing:
        if cfg.world_size > 1:
            return None  # other ranks are still writing theirs
        raise PretokenizeError(f"parts {missing[:10]} of {out_dir} are not done; rerun to resume")
    return merge_parts(task, num_items, num_parts)


def run_pretokenize(cfg: PretokenizeConfig) -> dict | None:
    """Conversation JSON -> text-to-image samples (see ``run_task``)."""
    return run_task(ConversationTask(cfg))


def run_pretokenize_imagefolder(cfg: ImageFolderConfig) -> dict | None:
    """ImageFolder tree -> class-to-image samples (see ``run_task``)."""
    return run_task(ImageFolderTask(cfg))


def run_pretokenize_janus(cfg: JanusPretokenizeConfig) -> dict | None:
    """Conversation JSON -> text-to-image samples in Janus-Pro's layout, its VQ tokenizer written next to them."""
    task = JanusTask(cfg)
    task.validate()
    write_janus_vq(cfg)
    return run_task(task)
