"""A dry run of text-to-image pre-tokenization (``launch/pretokenize.py ... validate=true``): every item is
read and checked, nothing is written.

    report = validate_pretokenize(cfg)   # the same PretokenizeConfig as the real run
    print(format_dry_run(report))

The items go through the real run's listing and DataLoader workers (``items.ItemDataset``), so the same
items are skipped for the same reasons, but with the text tokenizer only: each image is opened and
measured, not cropped, and neither the VQGAN nor the feature encoders are loaded (their weights need not
be on the machine). Tokens per sample are exact: the real tokenizer's prompt and the code grid the crop
gives (one code per 16 px, ``tokens.layout``), so ``max_seq_len`` skips are counted too. The disk
estimate is the MDS encoding of each sample as it would be written, with zero features of the encoders'
widths (read from their config files; an encoder whose config is not here is left out and named),
packed into parts and shards as the writer packs them (index.json and report.json not counted).

Not checked without the weights: that the VQGAN's codebook fits the tokenizer's image tokens and that
the encoders load; a real run checks both before writing anything.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from arra_ds.data.features import feature_width
from arra_ds.data.pretokenize.config import PretokenizeConfig
from arra_ds.data.pretokenize.conversation import ConversationTask, load_text_models, text_to_image_sample
from arra_ds.data.pretokenize.items import record_loader
from arra_ds.data.pretokenize.writer import encoded_sample_bytes, estimated_part_bytes
from arra_ds.data.schema import columns_for, feature_column
from arra_ds.tokens.layout import ImageGrid, image_to_tokens

SIZE_BIN_EDGES = (128, 256, 512, 1024, 2048)  # histogram of the images' shorter side, px
EXAMPLES_PER_REASON = 3
GRIDS_SHOWN = 6
NOT_CHECKED = "the VQGAN's codebook against the tokenizer's image tokens, and that the encoders load (no weights are read)"


def size_bin(shorter_side: int) -> str:
    lower = 0
    for edge in SIZE_BIN_EDGES:
        if shorter_side < edge:
            return f"<{edge}" if lower == 0 else f"{lower}-{edge - 1}"
        lower = edge
    return f">={SIZE_BIN_EDGES[-1]}"


def _spread(values: list[int]) -> dict:
    if not values:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": int(min(values)), "mean": round(float(np.mean(values)), 1), "max": int(max(values))}


def validate_pretokenize(cfg: PretokenizeConfig) -> dict:
    """Read and check every item of ``cfg.input`` as a real run would; returns the report (nothing is written)."""
    task = ConversationTask(cfg)
    task.validate_input()
    items = task.items()
    vocab, conversation_tokenizer = load_text_models(cfg)
    widths = {spec.name: feature_width(spec) for spec in cfg.encoders}
    features = {name: np.zeros(width, dtype=np.float16) for name, width in widths.items() if width}
    columns = columns_for(list(features))  # the written columns, less features of unknown width
    loader = record_loader(task.measure_dataset(list(enumerate(items)), conversation_tokenizer), cfg)
    skipped: dict[str, list[dict]] = defaultdict(list)
    sizes, grids = Counter(), Counter()
    tokens_per_sample, prompt_tokens = [], []
    sample_bytes: dict[int, list[int]] = defaultdict(list)  # part -> its samples' bytes, in order
    with tqdm(total=len(items), desc="validate", unit="img", disable=not cfg.progress) as bar:
        for records in loader:
            for record in records:
                bar.update(1)
                if "image_size" in record:
                    sizes[size_bin(min(record["image_size"]))] += 1
                if "reason" in record:
                    skipped[record["reason"]].append({"uid": record["uid"], "detail": record["detail"]})
                    continue
                width, height = record["crop_size"]
                grid = ImageGrid.for_pixels(height, width)
                codes = torch.zeros(grid.code_height, grid.code_width, dtype=torch.long)  # the count, not the codes
                tokens, _ = record["text"].with_images([image_to_tokens(codes, vocab)])
                if cfg.max_seq_len and len(tokens) > cfg.max_seq_len:
                    skipped["too_long"].append(
                        {"uid": record["uid"], "detail": f"{len(tokens)} tokens > max_seq_len={cfg.max_seq_len}"}
                    )
                    continue
                grids[f"{grid.code_height}x{grid.code_width}"] += 1
                tokens_per_sample.append(len(tokens))
                prompt_tokens.append(record["text"].prompt_len)
                sample = text_to_image_sample(tokens, record["text"], record["caption"], record["uid"], features)
                sample_bytes[record["index"] // cfg.items_per_part].append(encoded_sample_bytes(columns, sample))
    labels = [size_bin(0)] + [size_bin(edge) for edge in SIZE_BIN_EDGES]
    return {
        "input": cfg.input,
        "input_format": cfg.input_format,
        "out_dir": cfg.out_dir,
        "items": len(items),
        "would_write": len(tokens_per_sample),
        "would_skip": sum(len(v) for v in skipped.values()),
        "skipped_by_reason": {reason: len(skipped[reason]) for reason in sorted(skipped)},
        "skip_examples": {reason: skipped[reason][:EXAMPLES_PER_REASON] for reason in sorted(skipped)},
        "image_sizes": {label: sizes.get(label, 0) for label in labels},  # shorter side of every image that opened
        "grids": dict(grids.most_common()),
        "tokens_per_sample": _spread(tokens_per_sample),
        "prompt_tokens_per_sample": _spread(prompt_tokens),
        "estimated_bytes": sum(estimated_part_bytes(b, columns, cfg.shard_size_limit) for b in sample_bytes.values()),
        "columns_estimated": list(columns),
        "feature_widths": widths,
        "not_checked": NOT_CHECKED,
    }


def _bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def format_dry_run(report: dict) -> str:
    """The launcher's printout of ``validate_pretokenize``'s report."""
    reasons = ", ".join(f"{k}: {v}" for k, v in report["skipped_by_reason"].items()) or "none"
    lines = [
        f"dry run, nothing written: {report['input']} ({report['input_format']}, {report['items']} items)",
        f"  would write {report['would_write']} samples to {report['out_dir']}, skip {report['would_skip']} ({reasons})",
    ]
    for reason, examples in report["skip_examples"].items():
        lines += [f"    {reason}: {e['detail']}" for e in examples]
    lines.append("  image sizes (shorter side, px): " + ", ".join(f"{k}: {v}" for k, v in report["image_sizes"].items()))
    shown = list(report["grids"].items())[:GRIDS_SHOWN]
    more = f", {len(report['grids']) - GRIDS_SHOWN} more" if len(report["grids"]) > GRIDS_SHOWN else ""
    lines.append("  code grids (h x w): " + (", ".join(f"{k}: {v}" for k, v in shown) or "none") + more)
    tokens, prompt = report["tokens_per_sample"], report["prompt_tokens_per_sample"]
    lines.append(
        f"  tokens per sample: min {tokens['min']}, mean {tokens['mean']}, max {tokens['max']} "
        f"(prompt: min {prompt['min']}, mean {prompt['mean']}, max {prompt['max']})"
    )
    per_sample = report["estimated_bytes"] / max(1, report["would_write"])
    lines.append(
        f"  shards: about {_bytes(report['estimated_bytes'])} ({per_sample:.0f} bytes per sample: "
        f"{', '.join(report['columns_estimated'])})"
    )
    unknown = [name for name, width in report["feature_widths"].items() if not width]
    if unknown:
        lines.append(f"  not in the estimate: {', '.join(feature_column(n) for n in unknown)} (the encoder's config is not here)")
    lines.append(f"  not checked in a dry run: {report['not_checked']}")
    return "\n".join(lines)
