"""Structural check of local MDS shards before training: missing, empty, truncated or corrupt files.

``StreamingDataset`` trusts ``index.json`` and reads shards lazily, so a bad shard surfaces hours
into a run as an obscure decode error (or as wrong data). This check reads only each shard's header
(sample count and offset table, a few bytes per sample) and compares it with the index:

    shard file   uint32 num_samples | uint32 offsets[num_samples + 1] | config JSON | samples
                 offsets[0] = start of sample 0 (after the header), offsets[-1] = file size

A bad shard is an error, not a skip: dropping it would silently change the data set and the sample
order of every later epoch. The message names the file and says how to repair the data set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from arra_ds.data.schema import SchemaError

_UINT32 = np.dtype("<u4")


class ShardError(SchemaError):
    """A shard listed in index.json is missing, empty, truncated or has a corrupt header."""


def _fix_hint(local_dir: Path) -> str:
    return (
        f"Re-run pre-tokenization for this shard (or copy it again), or remove it from {local_dir / 'index.json'} "
        "(streaming's merge_index over the remaining shards)"
    )


def _check_header(path: Path, expected_samples: int, local_dir: Path) -> None:
    size = path.stat().st_size
    header_bytes = _UINT32.itemsize * (expected_samples + 2)
    if size < header_bytes:
        raise ShardError(
            f"shard {path} is {size} bytes, too small for the header of its {expected_samples} samples "
            f"(empty or truncated). {_fix_hint(local_dir)}"
        )
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(header_bytes), dtype=_UINT32)
    num_samples, offsets = int(header[0]), header[1:].astype(np.int64)
    if num_samples != expected_samples:
        raise ShardError(
            f"shard {path} says it holds {num_samples} samples, index.json says {expected_samples}: the file is "
            f"corrupt or belongs to another data set. {_fix_hint(local_dir)}"
        )
    if offsets[0] < header_bytes or np.any(np.diff(offsets) < 0) or offsets[-1] != size:
        raise ShardError(
            f"shard {path} has a corrupt offset table (first sample at byte {offsets[0]}, end at byte {offsets[-1]}, "
            f"file size {size}). {_fix_hint(local_dir)}"
        )


def check_shards(local_dir: str | Path) -> int:
    """Raise ``ShardError`` for the first bad shard of a local MDS data set; return the sample count."""
    local_dir = Path(local_dir)
    index_path = local_dir / "index.json"
    shards = json.loads(index_path.read_text()).get("shards", [])
    total = 0
    for i, shard in enumerate(shards):
        if shard.get("format") != "mds":
            raise ShardError(f"{index_path}: shard {i} has format {shard.get('format')!r}; arra_ds reads MDS shards only")
        expected_samples = int(shard["samples"])
        raw, zipped = shard["raw_data"], shard.get("zip_data")
        raw_path = local_dir / raw["basename"]
        if raw_path.is_file():
            if raw_path.stat().st_size != int(raw["bytes"]):
                raise ShardError(
                    f"shard {raw_path} is {raw_path.stat().st_size} bytes, index.json says {raw['bytes']} "
                    f"(empty, truncated or overwritten). {_fix_hint(local_dir)}"
                )
            _check_header(raw_path, expected_samples, local_dir)
        elif zipped and (local_dir / zipped["basename"]).is_file():
            zip_path = local_dir / zipped["basename"]
            if zip_path.stat().st_size != int(zipped["bytes"]):
                raise ShardError(
                    f"compressed shard {zip_path} is {zip_path.stat().st_size} bytes, index.json says "
                    f"{zipped['bytes']} (truncated or overwritten). {_fix_hint(local_dir)}"
                )
        else:
            raise ShardError(f"shard {raw_path} listed in {index_path} does not exist. {_fix_hint(local_dir)}")
        total += expected_samples
    if total == 0:
        raise ShardError(f"MDS data set {local_dir} holds no samples (every shard in index.json is empty)")
    return total
