"""What text-to-image pre-tokenization reads: the input formats, and how ``input_format=auto`` picks one.

    conversation  the ARRA / Lumina-mGPT conversation JSON: a list of items {"conversations": [{"from": "human",
                  "value": prompt}, {"from": "gpt", "value": "<|image|>"}], "image": [path]}
    table         a caption table, one row per image: .jsonl (one JSON object per line), .csv, .tsv, .parquet
                  (needs pyarrow: pip install -e ".[parquet]") or a JSON list of objects; ``table.image_column``
                  holds the image path, ``table.text_column`` the prompt
    pairs         a folder, searched recursively, of images (.jpg, .png, .webp, ...) each with its caption
                  beside it: ``photos/cat.jpg`` + ``photos/cat.txt``
    webdataset    WebDataset tar shards: members ``<key>.jpg|jpeg|png|webp`` + ``<key>.txt``; input is a shard,
                  a folder of shards, a glob (``shards/*.tar``) or a brace list (``shards/train-{000000..000099}.tar``).
                  Read with the standard library's ``tarfile``: uncompressed tars (WebDataset's default)

``input_format=auto`` decides from the input: a ``.json`` file is a conversation JSON, a ``.jsonl`` /
``.csv`` / ``.tsv`` / ``.parquet`` file a table, a ``.tar`` file, a glob or a brace pattern shards, a
folder of ``.tar`` files shards, a folder of images pairs. A choice that does not fit the input is an
error that says what was found and what to set.

Relative image paths of a conversation JSON or a table resolve against ``image_root``, else the
input file's folder. Conversation items stay JSON objects (checked in the DataLoader workers, as
before); the other formats become ``CaptionItem``s. What listing finds wrong with an item (a caption
file without its image, a tar member without its pair, a table row without an image path, a shard
that cannot be read) travels in ``CaptionItem.problem`` and is skipped and counted like every other
bad item.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from arra_ds.data.images import IMAGE_EXTENSIONS
from arra_ds.data.pretokenize.config import PretokenizeConfig, PretokenizeError, TableConfig
from arra_ds.errors import ConfigError

CONVERSATION_SUFFIX = ".json"
TABLE_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet")
SHARD_SUFFIX = ".tar"
CAPTION_SUFFIX = ".txt"
WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a key with several images uses the first of these
WEBDATASET_TEXT_EXTENSION = "txt"
PARQUET_INSTALL_HINT = 'pip install -e ".[parquet]" (pyarrow)'
KEYS_SHOWN_IN_ERRORS = 12
_GLOB_CHARACTERS = re.compile(r"[*?\[{]")
_BRACE_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
# WebDataset's key / extension split: the key is the member path up to the first dot of its file name.
_WEBDATASET_MEMBER = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]+)$")


@dataclass(frozen=True, slots=True)
class MemberRef:
    """The bytes of one tar member: read by seeking in the shard (no tar parsing in the workers)."""

    shard: str
    name: str
    offset: int
    size: int

    def describe(self) -> str:
        return f"{self.shard}:{self.name}"


@dataclass(frozen=True, slots=True)
class CaptionItem:
    """One (caption, image) pair of a table, a pairs folder or a shard. ``image`` / ``text_file``: a path
    (relative paths resolve against the task's image root) or a tar member; ``text``: the caption itself
    (tables); ``problem``: (reason, detail) when listing already found the item bad."""

    uid: str
    image: str | MemberRef | None = None
    text: Any = None
    text_file: str | MemberRef | None = None
    problem: tuple[str, str] | None = None


def read_member(ref: MemberRef) -> bytes:
    with open(ref.shard, "rb") as handle:
        handle.seek(ref.offset)
        data = handle.read(ref.size)
    if len(data) != ref.size:
        raise OSError(f"{ref.shard} ends inside member {ref.name} ({len(data)} of {ref.size} bytes)")
    return data


# ------------------------------------------------------------------------------------------------
# Which format: input_format=auto and the checks of an explicit choice
# ------------------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``a-{000..002}.tar`` -> a-000.tar a-001.tar a-002.tar; ``{x,y}`` -> x y."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        return [pattern]  # unbalanced: a literal brace
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    numbers = _BRACE_RANGE.match(body)
    if numbers:
        first, last = numbers.groups()
        padded = any(len(n.lstrip("-")) > 1 and n.lstrip("-").startswith("0") for n in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        options = [f"{i:0{width}d}" for i in range(int(first), int(last) + step, step)]
    else:
        options, depth, current = [], 0, ""
        for char in body:  # split at the commas outside nested braces
            if char == "," and depth == 0:
                options.append(current)
                current = ""
                continue
            depth += {"{": 1, "}": -1}.get(char, 0)
            current += char
        options.append(current)
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def _is_pattern(text: str) -> bool:
    return bool(_GLOB_CHARACTERS.search(text)) and not Path(text).exists()


def find_shards(input_path: str) -> list[Path]:
    """The shards of ``input``: one .tar file, the .tar files of a folder (recursive), or a glob / brace pattern."""
    path = Path(input_path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() == SHARD_SUFFIX)
    if not _is_pattern(input_path):
        return [path] if path.is_file() else []
    shards: list[Path] = []
    for part in expand_braces(input_path):
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else ([part] if Path(part).is_file() else [])
        shards += [Path(m) for m in matches if Path(m).is_file()]
    return list(dict.fromkeys(shards))  # in pattern order, each once


def count_folder(folder: Path) -> dict[str, int]:
    """What a folder holds (recursive): images, .txt captions, .tar shards, other files."""
    counts = {"images": 0, "captions": 0, "shards": 0, "other": 0}
    for _, _, files in os.walk(folder):
        for name in files:
            suffix = Path(name).suffix.lower()
            kind = ("images" if suffix in IMAGE_EXTENSIONS else "captions" if suffix == CAPTION_SUFFIX
                    else "shards" if suffix == SHARD_SUFFIX else "other")  # fmt: skip
            counts[kind] += 1
    return counts


def _describe_folder(folder: Path, counts: dict[str, int]) -> str:
    return (f"{folder} is a folder with {counts['images']} images, {counts['captions']} {CAPTION_SUFFIX} files, "
            f"{counts['shards']} {SHARD_SUFFIX} shards and {counts['other']} other files")  # fmt: skip


def _describe_file(path: Path) -> str:
    kind = ("a conversation JSON" if path.suffix.lower() == CONVERSATION_SUFFIX
            else "a caption table" if path.suffix.lower() in TABLE_SUFFIXES
            else "a WebDataset shard" if path.suffix.lower() == SHARD_SUFFIX else "a file")  # fmt: skip
    return f"{path} is {kind} ({path.suffix or 'no suffix'})"


def _suggest(path: Path) -> str:
    """The input_format that fits a file's suffix, as advice."""
    suffix = path.suffix.lower()
    if suffix == CONVERSATION_SUFFIX:
        return "input_format=conversation (or table for a JSON list of objects)"
    if suffix in TABLE_SUFFIXES:
        return "input_format=table"
    if suffix == SHARD_SUFFIX:
        return "input_format=webdataset"
    return "input_format=auto"


def _auto_format(cfg: PretokenizeConfig) -> str:
    if _is_pattern(cfg.input):
        return "webdataset"
    path = Path(cfg.input)
    if not path.exists():
        raise ConfigError(f"input={cfg.input!r} does not exist")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == CONVERSATION_SUFFIX:
            return "conversation"
        if suffix in TABLE_SUFFIXES:
            return "table"
        if suffix == SHARD_SUFFIX:
            return "webdataset"
        raise ConfigError(
            f"input={cfg.input}: input_format=auto knows {CONVERSATION_SUFFIX} (conversation JSON), "
            f"{'/'.join(TABLE_SUFFIXES)} (caption table) and {SHARD_SUFFIX} (WebDataset shard) files, not "
            f"{suffix or 'a file without suffix'}; set input_format=conversation or input_format=table"
        )
    counts = count_folder(path)
    if counts["shards"] and not counts["images"]:
        return "webdataset"
    if counts["images"] and not counts["shards"]:
        return "pairs"
    if counts["images"]:
        raise ConfigError(
            f"input: {_describe_folder(path, counts)}, so input_format=auto cannot tell pairs from shards; set "
            f"input_format=pairs (images + {CAPTION_SUFFIX} captions) or input_format=webdataset (the {SHARD_SUFFIX} shards)"
        )
    raise ConfigError(
        f"input: {_describe_folder(path, counts)}: nothing to read. Point input at a folder of images with "
        f"{CAPTION_SUFFIX} captions, a folder of {SHARD_SUFFIX} shards, a caption table or a conversation JSON"
    )


def resolve_input_format(cfg: PretokenizeConfig) -> str:
    """``cfg.input_format`` with auto resolved; a choice that does not fit the input raises ConfigError
    naming what the input is and what to set."""
    fmt = cfg.input_format if cfg.input_format != "auto" else _auto_format(cfg)
    path = Path(cfg.input)
    if fmt in ("conversation", "table"):
        if path.is_dir():
            raise ConfigError(
                f"input_format={fmt} reads a file, but input: {_describe_folder(path, count_folder(path))}; set "
                "input_format=pairs (images + .txt captions), input_format=webdataset (.tar shards) or input_format=auto"
            )
        if not path.is_file():
            raise ConfigError(f"input={cfg.input!r} does not exist")
        suffix = path.suffix.lower()
        if fmt == "conversation" and suffix in TABLE_SUFFIXES + (SHARD_SUFFIX,):
            raise ConfigError(
                f"input_format=conversation reads a JSON list of conversation items, but input: {_describe_file(path)}; "
                f"set {_suggest(path)} (or input_format=auto)"
            )
        if fmt == "table" and suffix not in TABLE_SUFFIXES + (CONVERSATION_SUFFIX,):
            raise ConfigError(
                f"input_format=table reads {'/'.join(TABLE_SUFFIXES)} files or a JSON list of objects, but input: "
                f"{_describe_file(path)}; set {_suggest(path)} (or input_format=auto)"
            )
    elif fmt == "pairs":
        if not path.is_dir():
            what = _describe_file(path) if path.is_file() else f"{cfg.input} does not exist"
            raise ConfigError(
                f"input_format=pairs reads a folder of images with {CAPTION_SUFFIX} captions beside them, but input: "
                f"{what}; set {_suggest(path) if path.is_file() else 'input to that folder'}"
            )
    elif not find_shards(cfg.input):
        what = _describe_folder(path, count_folder(path)) if path.is_dir() else (
            _describe_file(path) if path.is_file() else f"{cfg.input} matches no file")
        raise ConfigError(
            f"input_format=webdataset reads {SHARD_SUFFIX} shards (a file, a folder of them, a glob or a brace list "
            f"such as shards/train-{{000000..000009}}.tar), but input: {what}"
        )
    if cfg.image_root and fmt in ("pairs", "webdataset"):
        raise ConfigError(f"image_root is for conversation and table inputs (relative image paths); input_format={fmt} has none")
    return fmt


# ------------------------------------------------------------------------------------------------
# Listing the items
# ------------------------------------------------------------------------------------------------


def read_conversations(path: str | Path) -> list:
    """The items of a conversation JSON (each checked later, in the workers)."""
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretokenizeError(f"cannot read the conversation JSON {path}: {e}") from e
    if not isinstance(items, list):
        raise PretokenizeError(f"{path} must hold a JSON list of items, got {type(items).__name__}")
    objects = [it for it in items if isinstance(it, dict)]
    if objects and not any("conversations" in it for it in objects):
        keys = sorted({k for it in objects[:KEYS_SHOWN_IN_ERRORS] for k in it})
        raise PretokenizeError(
            f"{path}: no item has 'conversations' (the first items have the keys {keys}); if it is a caption table "
            "(one object per image), set input_format=table table.image_column=<key> table.text_column=<key>"
        )
    return items


def _table_rows(path: Path, columns: tuple[str, str]) -> Iterator[tuple[str, dict | None, str]]:
    """(where, row, problem) for every row of a table file: where = 'line N' / 'row N'; row None if unreadable."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(path, columns)
        return
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8-sig", newline="") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                missing = [c for c in columns if c not in (reader.fieldnames or [])]
                if missing:
                    raise PretokenizeError(_missing_columns(path, missing, reader.fieldnames or []))
                for row in reader:
                    yield f"line {reader.line_num}", row, ""
            return
        if suffix == CONVERSATION_SUFFIX:
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise PretokenizeError(f"{path} must hold a JSON list of objects (one per image), got {type(rows).__name__}")
            for number, row in enumerate(rows):
                yield f"item {number}", row if isinstance(row, dict) else None, f"item {number} is not an object"
            return
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"line {number}", None, f"line {number} is not JSON: {e}"
                    continue
                yield f"line {number}", row if isinstance(row, dict) else None, f"line {number} is not a JSON object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise PretokenizeError(f"cannot read the table {path}: {e}") from e


def _missing_columns(path: Path, missing: list[str], present: list[str]) -> str:
    return (f"{path} has no column {missing} (its columns: {present[:KEYS_SHOWN_IN_ERRORS]}); set "
            "table.image_column=<image path column> table.text_column=<caption column>")  # fmt: skip


def _parquet_rows(path: Path, columns: tuple[str, str]) -> Iterator[tuple[str, dict | None, str]]:
    try:
        # pyarrow is an extra (parquet tables only): imported where a parquet file is read
        import pyarrow.parquet as parquet
        import pyarrow.types as arrow_types
    except ImportError as e:
        raise PretokenizeError(f"input={path} is a parquet table: {PARQUET_INSTALL_HINT}, or save it as .jsonl / .csv") from e
    try:
        schema = parquet.read_schema(path)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise PretokenizeError(_missing_columns(path, missing, schema.names))
        image_type = schema.field(columns[0]).type
        if not (arrow_types.is_string(image_type) or arrow_types.is_large_string(image_type)):
            raise PretokenizeError(
                f"{path}: column {columns[0]!r} holds {image_type} values, not image paths; this reader takes paths "
                "(write the images to files and put their paths in the table)"
            )
        table = parquet.read_table(path, columns=list(columns))
    except OSError as e:  # pyarrow's ArrowInvalid / ArrowIOError are OSErrors
        raise PretokenizeError(f"cannot read the parquet table {path}: {e}") from e
    values = [table.column(c).to_pylist() for c in columns]
    for number, (image, text) in enumerate(zip(*values)):
        yield f"row {number}", {columns[0]: image, columns[1]: text}, ""


def read_table(path: str | Path, table: TableConfig) -> list[CaptionItem]:
    path = Path(path)
    columns = (table.image_column, table.text_column)
    items, seen_image_column = [], False
    for where, row, problem in _table_rows(path, columns):
        if row is None:
            items.append(CaptionItem(uid=f"{path.name} {where}", problem=("bad_format", problem)))
            continue
        image, text = row.get(columns[0]), row.get(columns[1])
        seen_image_column |= columns[0] in row
        uid = image if isinstance(image, str) and image else f"{path.name} {where}"
        if image is None or image == "":
            items.append(CaptionItem(uid=uid, problem=("missing_image", f"{where} has no {columns[0]!r}")))
        elif not isinstance(image, str):
            items.append(CaptionItem(uid=uid, problem=("bad_format", f"{where}: {columns[0]!r} is {type(image).__name__}, not a path")))
        else:
            items.append(CaptionItem(uid=uid, image=image, text=text))
    if items and not seen_image_column:  # JSON rows: the columns are per row
        keys = sorted({k for _, row, _ in _table_rows(path, columns) if row for k in row})
        raise PretokenizeError(_missing_columns(path, [columns[0]], keys))
    return items


def list_pairs(folder: str | Path) -> list[CaptionItem]:
    """Every image of ``folder`` (recursive, sorted by path) with the .txt of the same name beside it;
    a caption file without an image is an item too (a bad one)."""
    folder = Path(folder)
    images: dict[str, list[str]] = {}
    captions: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        stem = relative[: -len(path.suffix)] if path.suffix else relative
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images.setdefault(stem, []).append(relative)
        elif path.suffix.lower() == CAPTION_SUFFIX:
            captions[stem] = relative
    items = []
    for stem in sorted(set(images) | set(captions)):
        caption = captions.get(stem)
        if stem not in images:
            items.append(CaptionItem(uid=caption, text_file=caption, problem=(
                "missing_image", f"{caption} has no image of the same name ({', '.join(IMAGE_EXTENSIONS)})")))
            continue
        for image in images[stem]:
            if caption is None:
                items.append(CaptionItem(uid=image, image=image, problem=("missing_caption", f"{image} has no {stem}{CAPTION_SUFFIX} beside it")))
            else:
                items.append(CaptionItem(uid=image, image=image, text_file=caption))
    return items


def _shard_items(shard: Path) -> list[CaptionItem]:
    """The (image, caption) pairs of one shard, grouped by WebDataset key, in member order."""
    keys: dict[str, dict[str, tarfile.TarInfo]] = {}
    problem = ""
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                match = _WEBDATASET_MEMBER.match(member.name)
                if member.isfile() and match:
                    keys.setdefault(match.group(1), {}).setdefault(match.group(2).lower(), member)
    except (tarfile.TarError, OSError) as e:
        hint = "; compressed shards are not read: decompress them to .tar" if shard.suffix.lower() != SHARD_SUFFIX else ""
        problem = f"{shard}: {type(e).__name__}: {e}{hint}"
    items = []
    for key, members in keys.items():
        image_ext = next((e for e in WEBDATASET_IMAGE_EXTENSIONS if e in members), None)
        text = members.get(WEBDATASET_TEXT_EXTENSION)
        if image_ext is None and text is None:
            continue  # a key with other members only (.json, .cls, ...): not an image-caption sample
        uid = f"{shard.name}/{key}"
        image = None if image_ext is None else MemberRef(str(shard), members[image_ext].name, members[image_ext].offset_data, members[image_ext].size)
        caption = None if text is None else MemberRef(str(shard), text.name, text.offset_data, text.size)
        if image is None:
            items.append(CaptionItem(uid=uid, text_file=caption, problem=(
                "missing_image", f"{shard}: {text.name} has no {key}.{{{','.join(WEBDATASET_IMAGE_EXTENSIONS)}}} member")))
        elif caption is None:
            items.append(CaptionItem(uid=uid, image=image, problem=(
                "missing_caption", f"{shard}: {image.name} has no {key}.{WEBDATASET_TEXT_EXTENSION} member")))
        else:
            items.append(CaptionItem(uid=uid, image=image, text_file=caption))
    if problem:
        items.append(CaptionItem(uid=shard.name, problem=("unreadable_shard", problem)))
    return items


def list_webdataset(shards: list[Path]) -> list[CaptionItem]:
    return [item for shard in shards for item in _shard_items(shard)]


# ------------------------------------------------------------------------------------------------
# The items of an input, and what identifies it for resuming
# ------------------------------------------------------------------------------------------------


def image_root(cfg: PretokenizeConfig, fmt: str) -> Path:
    """Where relative image (and caption) paths of the items resolve."""
    if fmt == "pairs":
        return Path(cfg.input)
    return Path(cfg.image_root) if cfg.image_root else Path(cfg.input).resolve().parent


def read_input(cfg: PretokenizeConfig, fmt: str) -> list:
    """Every item of the input, in a fixed order."""
    if fmt == "conversation":
        return read_conversations(cfg.input)
    if fmt == "table":
        return read_table(cfg.input, cfg.table)
    if fmt == "pairs":
        return list_pairs(cfg.input)
    return list_webdataset(find_shards(cfg.input))


def input_identity(cfg: PretokenizeConfig, fmt: str, items: list) -> dict:
    """What identifies the input in ``pretokenize_meta.json``: a changed input is not resumed."""
    if fmt in ("conversation", "table"):
        stat = Path(cfg.input).stat()
        identity = {"input": str(Path(cfg.input).resolve()), "input_size": stat.st_size, "input_mtime_ns": stat.st_mtime_ns}
        # conversation: the keys of runs started before the other formats existed, so that they keep resuming
        return identity if fmt == "conversation" else {**identity, "input_format": fmt, "table": [cfg.table.image_column, cfg.table.text_column]}
    digest = hashlib.sha256()
    if fmt == "pairs":
        root = Path(cfg.input)
        for item in items:  # names, and the captions' sizes and times: an edited caption is a changed input
            stat = (root / item.text_file).stat() if isinstance(item.text_file, str) else None
            digest.update(f"{item.image} {item.text_file} {stat and (stat.st_size, stat.st_mtime_ns)}\n".encode())
        return {"input": str(root.resolve()), "input_format": fmt, "listing_sha256": digest.hexdigest(), "num_items": len(items)}
    shards = find_shards(cfg.input)
    for shard in shards:
        stat = shard.stat()
        digest.update(f"{shard.resolve()} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return {"input": cfg.input, "input_format": fmt, "shards_sha256": digest.hexdigest(), "num_shards": len(shards)}
