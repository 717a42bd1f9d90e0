"""The MDS (MosaicML streaming) schema of a pre-tokenised ARRA data set.

Text-to-image samples (Chameleon, Lumina-mGPT): one sample = one (prompt, image) pair:

    tokens          ndarray:int32    whole sequence: prompt + image + end of turn
    prompt_len      int32            leading tokens excluded from the loss (labels -100)
    feat_<encoder>  ndarray:float16  one global image feature per encoder (e.g. feat_biomedclip)
    patch_<encoder> ndarray:float16  optional (pre-tokenization patch_features=true): the encoder's patch
                                     features [P, D], P = g * g in raster order over its square patch grid,
                                     through the same projection as feat_<encoder> (align.feature=patch)
    caption         str              the prompt text (eval, CLIP-Score)
    uid             str              stable id of the source image

Class-to-image samples (LlamaGen, ARRA-Base): one sample = one (class, image crop) pair, the same
columns plus the class label; the sequence is the image alone:

    tokens          ndarray:int32    the crop's VQ codes in raster order (LlamaGen VQ-16: 256 at 256 px)
    prompt_len      int32            0 (every code is predicted; the model adds the class token itself)
    class_id        int32            the class index (0 .. num_classes - 1)
    caption         str              the class name

A data set is class-to-image exactly when it has the ``class_id`` column. Writers (pre-tokenization,
demo data) and the loader both use these names, so a data set written by one version is read by the next.
"""

from __future__ import annotations

import json
from pathlib import Path

from arra_ds.errors import UserError

BASE_COLUMNS: dict[str, str] = {
    "tokens": "ndarray:int32",
    "prompt_len": "int32",
    "caption": "str",
    "uid": "str",
}
CLASS_COLUMN = "class_id"
CLASS_ENCODING = "int32"
FEATURE_PREFIX = "feat_"
PATCH_PREFIX = "patch_"
FEATURE_ENCODING = "ndarray:float16"  # feat_<encoder> [D] and patch_<encoder> [P, D]
UNSAFE_ENCODINGS = ("pkl",)  # MDS encodings that unpickle on read


class SchemaError(UserError, ValueError):
    """A data set whose layout is not what arra_ds writes; the message names the directory and the fix."""


def feature_column(encoder: str) -> str:
    return f"{FEATURE_PREFIX}{encoder}"


def patch_column(encoder: str) -> str:
    return f"{PATCH_PREFIX}{encoder}"


def is_patch_column(column: str) -> bool:
    return column.startswith(PATCH_PREFIX)


def columns_for(encoders: list[str], class_conditional: bool = False, patch_features: bool = False) -> dict[str, str]:
    """The ``columns`` argument of ``MDSWriter`` for a data set carrying these encoders' features
    (with ``class_conditional``: class-to-image samples, which add ``class_id``; with ``patch_features``:
    each encoder's patch features too)."""
    columns = dict(BASE_COLUMNS)
    if class_conditional:
        columns[CLASS_COLUMN] = CLASS_ENCODING
    for name in encoders:
        columns[feature_column(name)] = FEATURE_ENCODING
        if patch_features:
            columns[patch_column(name)] = FEATURE_ENCODING
    return columns


def read_index_columns(local_dir: str | Path) -> dict[str, str]:
    """Column name -> encoding from an MDS ``index.json`` (all shards must agree)."""
    index_path = Path(local_dir) / "index.json"
    if not index_path.is_file():
        raise SchemaError(f"{index_path} not found: is {local_dir} an MDS data set (written by MDSWriter)?")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise SchemaError(f"{index_path} is not valid JSON ({e}); the data set is corrupt, re-run pre-tokenization") from e
    shards = index.get("shards", [])
    if not shards:
        raise SchemaError(f"{index_path} lists no shards: the data set is empty")
    columns: dict[str, str] | None = None
    for i, shard in enumerate(shards):
        shard_columns = dict(zip(shard["column_names"], shard["column_encodings"]))
        if columns is None:
            columns = shard_columns
        elif shard_columns != columns:
            raise SchemaError(f"{index_path}: shard {i} has columns {shard_columns}, shard 0 has {columns}")
    return columns or {}


def check_columns(local_dir: str | Path, feature: str | None, class_conditional: bool = False) -> dict[str, str]:
    """Raise a SchemaError naming what is missing (or a data set of the other kind than
    ``class_conditional`` asks for); return the columns."""
    columns = read_index_columns(local_dir)
    if class_conditional and CLASS_COLUMN not in columns:
        raise SchemaError(
            f"MDS data set {local_dir} has no '{CLASS_COLUMN}' column: it holds text-to-image samples, but a "
            "class-conditional backbone (model.source=llamagen) trains on class-to-image samples; write them with "
            "launch/pretokenize_imagefolder.py"
        )
    if not class_conditional and CLASS_COLUMN in columns:
        raise SchemaError(
            f"MDS data set {local_dir} holds class-to-image samples (a '{CLASS_COLUMN}' column, LlamaGen VQ codes); "
            "a text-conditional backbone cannot train on them: use model.source=llamagen, or text-to-image data"
        )
    if class_conditional and columns[CLASS_COLUMN] != CLASS_ENCODING:
        raise SchemaError(
            f"MDS data set {local_dir}: column '{CLASS_COLUMN}' is {columns[CLASS_COLUMN]}, expected {CLASS_ENCODING}"
        )
    unsafe = sorted(name for name, encoding in columns.items() if encoding in UNSAFE_ENCODINGS)
    if unsafe:
        # The MDS reader decodes every column of a sample, so a pickle column would run arbitrary code.
        raise SchemaError(
            f"MDS data set {local_dir} has pickle-encoded columns {unsafe}; arra_ds never unpickles data. "
            "Re-write them as ndarray/str/int columns (see arra_ds/data/schema.py)"
        )
    for name, encoding in BASE_COLUMNS.items():
        if name not in columns:
            raise SchemaError(f"MDS data set {local_dir} lacks the column '{name}' ({encoding}); columns: {sorted(columns)}")
        if columns[name] != encoding:
            raise SchemaError(f"MDS data set {local_dir}: column '{name}' is {columns[name]}, expected {encoding}")
    if feature is not None:
        prefix = PATCH_PREFIX if is_patch_column(feature) else FEATURE_PREFIX
        available = sorted(c[len(prefix) :] for c in columns if c.startswith(prefix))
        if feature not in columns:
            how = "pre-tokenise with that encoder"
            if prefix == PATCH_PREFIX:
                how = "pre-tokenise with patch_features=true (align.feature=patch reads patch_<encoder>)"
            raise SchemaError(
                f"MDS data set {local_dir} has no feature column '{feature}'. "
                f"{'Patch features' if prefix == PATCH_PREFIX else 'Features'} in it: {available}. "
                f"Set align.encoder to one of them, or {how}."
            )
        if columns[feature] != FEATURE_ENCODING:
            raise SchemaError(f"MDS data set {local_dir}: '{feature}' is {columns[feature]}, expected {FEATURE_ENCODING}")
    return columns
