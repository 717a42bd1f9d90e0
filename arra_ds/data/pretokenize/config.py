"""Settings of a pre-tokenization run and the names of the files it writes (see ``run.py``).

``PretokenizeRunConfig`` holds what every run has; ``PretokenizeConfig`` (text-to-image: a conversation
JSON, a caption table, image + caption pairs or WebDataset shards, see ``sources.py``) and
``ImageFolderConfig`` (``imagefolder.py``, class-to-image) add what their input needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from arra_ds.data.features import EncoderSpec, parse_encoder_arg
from arra_ds.data.images import ImagePreprocessConfig
from arra_ds.errors import ConfigError, UserError

PART_DONE_FILE = "part.json"
META_FILE = "pretokenize_meta.json"
WILDCARDS = "*?[{"  # an input with these is a glob / brace list of WebDataset shards (sources.py expands it)
REPORT_FILE = "report.json"


class PretokenizeError(UserError, RuntimeError):
    """A run that cannot start or finish (bad settings, a changed input); not raised for bad items."""


@dataclass
class PretokenizeRunConfig:
    """Settings of every pre-tokenization run: where it reads and writes, the feature encoders, and how
    the work is split, batched and written (``run.py``). Each input kind adds its own fields."""

    input: str = ""  # what to pre-tokenise (each input kind says what it reads)
    out_dir: str = ""
    # feature encoders: "preset[:aggregation][=local path]" (e.g. "biomedclip=/models/BiomedCLIP", see
    # arra_ds.data.features.PRESETS) or a full EncoderSpec mapping
    encoders: list[EncoderSpec | str] = field(default_factory=list)
    # also write each encoder's patch features, column patch_<name> [P, D] fp16 (align.feature=patch): the
    # picture the VQ codes cover, resized to the encoder's input; P * D values per sample (DINOv2-B at 224 px:
    # 256 x 768, 384 KB)
    patch_features: bool = False  # also write patch_<encoder> [P, D] per encoder (align.feature=patch)
    min_image_size: int = 64  # images whose shorter side is below this are skipped
    batch_size: int = 16  # images per VQ tokenizer / encoder forward pass
    num_workers: int = 4  # DataLoader workers per process (image decoding and preprocessing)
    num_procs: int = 1  # local processes, each with its own parts (one per GPU, or CPU processes)
    rank: int = 0  # this process's index when an external launcher starts the processes
    world_size: int = 1
    items_per_part: int = 2048  # resume unit; each part is one MDS directory
    shard_size_limit: int = 1 << 26  # bytes per MDS shard
    device: str = "auto"  # auto: cuda:<rank % gpus> when CUDA is available, else cpu
    dtype: Literal["fp32", "bf16"] = "fp32"  # VQ tokenizer and encoder weights (bf16 only on CUDA)
    progress: bool = True

    def validate_run(self) -> None:
        """The checks of the shared fields (each input kind's ``validate`` calls it)."""
        if not self.out_dir:
            raise ConfigError("out_dir is empty: set the output directory for the MDS shards")
        self.encoders = [parse_encoder_arg(spec) if isinstance(spec, str) else spec for spec in self.encoders]
        for spec in self.encoders:
            spec.validate()
        names = [s.name for s in self.encoders]
        if len(set(names)) != len(names):
            raise ConfigError(f"encoders {names}: each feature column feat_<name> may appear once")
        if min(self.batch_size, self.items_per_part, self.num_procs, self.world_size, self.shard_size_limit) < 1:
            raise ConfigError("batch_size, items_per_part, num_procs, world_size and shard_size_limit must be >= 1")
        if self.num_workers < 0 or self.min_image_size < 0:
            raise ConfigError("num_workers and min_image_size must be >= 0")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank={self.rank} must be in [0, world_size={self.world_size})")
        if self.num_procs > 1 and self.world_size > 1:
            raise ConfigError("use num_procs (local spawn) or rank/world_size (external launcher), not both")

    def run_content_key(self) -> dict:
        """The shared settings that change the written samples (part of each input kind's ``content_key``)."""
        return {
            "encoders": [asdict(s) for s in self.encoders],
            "min_image_size": self.min_image_size,
            "items_per_part": self.items_per_part,
            "dtype": self.dtype,
            # only when set: runs started before the key existed keep resuming
            **({"patch_features": True} if self.patch_features else {}),
        }


InputFormat = Literal["auto", "conversation", "table", "pairs", "webdataset"]


@dataclass
class TableConfig:
    """The columns of a caption table (``input_format=table``: .jsonl, .csv, .tsv, .parquet or a JSON list)."""

    image_column: str = "image"  # the image path; relative paths resolve against image_root, else the table's folder
    text_column: str = "caption"  # the prompt text

    def validate(self) -> None:
        if not self.image_column or not self.text_column:
            raise ConfigError("table.image_column and table.text_column must name the table's columns")
        if self.image_column == self.text_column:
            raise ConfigError(f"table.image_column and table.text_column are both {self.image_column!r}; name two columns")


@dataclass
class PretokenizeConfig(PretokenizeRunConfig):
    """Text-to-image pre-tokenization: ``input`` is a conversation JSON, a caption table, a folder of
    image + caption pairs or WebDataset shards (``input_format``, see ``sources.py``)."""

    # auto: .json -> conversation; .jsonl/.csv/.tsv/.parquet -> table; .tar, glob, brace list, folder of .tar -> webdataset;
    # a folder of images + .txt -> pairs (sources.py)
    input_format: InputFormat = "auto"  # conversation, table, pairs, webdataset, or auto: picked from the input
    table: TableConfig = field(default_factory=TableConfig)  # input_format=table: which columns hold the image and the text
    tokenizer: str = ""  # Chameleon text_tokenizer.json (a `tokenizers` JSON)
    vqgan_yaml: str = ""  # original Chameleon tokenizer: vqgan.yaml + vqgan.ckpt ...
    vqgan_ckpt: str = ""
    vqgan_hf: str = ""  # ... or a Hugging Face Chameleon checkpoint dir (model.vqmodel.*)
    image: ImagePreprocessConfig = field(default_factory=ImagePreprocessConfig)
    # true: the assistant turn opens with <REP> (<reserved08795>), the data of the reference's `rep`
    # alignment ablation (train with align.target=rep); false: Lumina-mGPT's layout
    rep_token: bool = False
    image_root: str = ""  # conversation / table: relative image paths are relative to this ("" = the input file's folder)
    max_seq_len: int = 0  # > 0: samples with more tokens are skipped
    channels_last: bool = False  # NHWC VQGAN convs: ~2x faster; codes may differ at exact distance ties

    def validate(self) -> None:
        """Every setting of a real run (the input itself is checked by ``sources.resolve_input_format``)."""
        self.validate_input()
        original = bool(self.vqgan_yaml or self.vqgan_ckpt)
        if original == bool(self.vqgan_hf):
            raise ConfigError("set either vqgan_yaml + vqgan_ckpt (original Chameleon tokenizer) or vqgan_hf (HF checkpoint dir)")
        if original and not (self.vqgan_yaml and self.vqgan_ckpt):
            raise ConfigError("vqgan_yaml and vqgan_ckpt go together (Chameleon's tokenizer/vqgan.yaml + vqgan.ckpt)")

    def validate_input(self) -> None:
        """What a dry run (``dryrun.py``) needs too: the input, text tokenizer and crop settings; no VQGAN."""
        if not self.input:
            raise ConfigError("input is empty: set the conversation JSON, caption table, image folder or shards to read")
        if not any(c in self.input for c in WILDCARDS) and not Path(self.input).exists():  # a shard pattern: sources.py
            raise ConfigError(f"input={self.input!r} does not exist")
        self.validate_run()
        if not self.tokenizer or not Path(self.tokenizer).is_file():
            raise ConfigError(f"tokenizer={self.tokenizer!r}: pass the local text_tokenizer.json of the checkpoint")
        self.table.validate()
        self.image.validate()
        if self.max_seq_len < 0:
            raise ConfigError("max_seq_len must be >= 0")

    def content_key(self, input_identity: dict) -> dict:
        """Settings that change the written samples; a resumed run must use the same ones.
        ``input_identity``: which input, as ``sources.input_identity`` describes it (path, size, listing)."""
        return {
            **input_identity,
            "tokenizer": str(Path(self.tokenizer).resolve()),
            "vqgan": [str(Path(p).resolve()) if p else "" for p in (self.vqgan_yaml, self.vqgan_ckpt, self.vqgan_hf)],
            "image": asdict(self.image),
            "image_root": self.image_root,
            "max_seq_len": self.max_seq_len,
            "channels_last": self.channels_last,
            # only when set: runs started before the key existed keep resuming
            **({"rep_token": True} if self.rep_token else {}),
            **self.run_content_key(),
        }
