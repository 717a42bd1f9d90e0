"""Trainer checkpoints on disk: the run-directory layout, manifests, verification, and reading a
trained backbone back (for export, generation and evaluation). Writing is ``arra_ds/train/checkpoint.py``.

Layout of a run directory:

    config.yaml                the resolved run config (export / generate / eval read its ``model`` section only)
    arra_data.json             what generation and evaluation need to know about the training data
                               (``RunData``: image grid, VQGAN files, encoder, held-out prompts); an export
                               carries a copy
    checkpoints/
      latest                   the tag of the newest complete checkpoint (replaced atomically)
      step_00000100/           a complete checkpoint:
        *_model_states.pt, *_optim_states.pt   DeepSpeed engine state (under ZeRO-3 one pair per rank)
        rng_rank_00000.pt ...  each rank's RNG states (loaded with torch.load(weights_only=True))
        trainer_state.json     step, samples seen, streaming loader state, skip counters, world size
        manifest.json          every file with its size, the commit order and time; written last
        universal/             DeepSpeed's universal form of this checkpoint (per parameter: fp32 weights and
                               Adam's moments), written on the first resume with another number of ranks and
                               kept as a cache (own manifest.json; ``universal.partial/`` while converting)
      step_00000200.partial/   a save in progress, or one interrupted by a crash: never loaded

On load the manifest (file sizes) and the zip CRCs of the torch files are checked first, so a
truncated, deleted or corrupt file is reported by name instead of failing deep inside ``torch.load``
(or, worse, loading wrong weights without any error). Under ZeRO-3 each rank saved a shard of the
flat fp32 master weights; ``deepspeed.utils.zero_to_fp32`` reassembles them offline (no process group,
no engine).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from arra_ds.config import from_dict, read_config_file
from arra_ds.errors import ConfigError, InputNotFoundError, UserError
from arra_ds.io import read_json
from arra_ds.model.config import ModelConfig
from arra_ds.model.trainable import TRAIN_ALL, merge_lora
from arra_ds.tokens.layout import ImageGrid
from arra_ds.tokens.vocab import ChameleonVocab
from arra_ds.weights import load_strict

CHECKPOINTS_DIR = "checkpoints"
RUN_CONFIG_FILE = "config.yaml"
RUN_DATA_FILE = "arra_data.json"
LATEST = "latest"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
PARTIAL_SUFFIX = ".partial"
UNIVERSAL_DIR = "universal"  # inside a tag directory: its DeepSpeed universal form (elastic resume)
REPLACED_SUFFIX = ".replaced"
FORMAT_VERSION = 1
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
# ARRAModel's parameter prefixes: the backbone (Hugging Face names below it) and the training-only projector.
BACKBONE_PREFIX = "backbone."
PROJECTOR_PREFIX = "align_head."


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and what to do."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng_rank_{rank:05d}.pt"


# ---- reading manifests -----------------------------------------------------------------------------


def read_latest(root: Path) -> str | None:
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def read_manifest(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        partial = " (an interrupted save?)" if str(ckpt_dir).endswith(PARTIAL_SUFFIX) else ""
        raise CheckpointError(
            f"{ckpt_dir} is not a complete arra_ds checkpoint{partial}: {MANIFEST} is missing. "
            f"Complete checkpoints next to it: {[p.name for p in committed(Path(ckpt_dir).parent)] or 'none'}"
        )
    manifest = read_json(path, CheckpointError, hint=f"the checkpoint {ckpt_dir} cannot be trusted")
    missing = [key for key in ("files", "step", "world_size") if key not in manifest]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; the checkpoint {ckpt_dir} cannot be trusted")
    return manifest


def verify(ckpt_dir: Path) -> dict:
    """Check that every file the manifest lists exists with its recorded size; return the manifest."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    for rel, size in manifest["files"].items():
        path = ckpt_dir / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing (listed in {ckpt_dir / MANIFEST})")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"checkpoint file {path} is {actual} bytes, but {size} bytes were written (truncated or overwritten); "
                f"resume from another checkpoint with train.resume=<dir>. Complete checkpoints: "
                f"{[p.name for p in committed(ckpt_dir.parent) if p != ckpt_dir] or 'none'}"
            )
    return manifest


def committed(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (tag dirs with a manifest), oldest commit first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and TAG_PATTERN.match(path.name) and (path / MANIFEST).is_file():
            try:
                sequence = int(read_json(path / MANIFEST, CheckpointError)["sequence"])
            except (CheckpointError, KeyError, TypeError, ValueError):
                continue
            found.append((sequence, path.name, path))
    return [p for _, _, p in sorted(found)]


def resolve_resume(resume: str, root: Path) -> Path | None:
    """``train.resume`` -> the checkpoint directory to load, or None for a fresh start."""
    if not resume:
        return None
    if resume == "auto":
        tag = read_latest(root)
        if tag is None:
            return None
        path = Path(root) / tag
        if not path.is_dir():
            raise CheckpointError(
                f"{Path(root) / LATEST} names {tag!r}, but {path} does not exist. Complete checkpoints: "
                f"{[p.name for p in committed(root)] or 'none'}; pick one with train.resume=<dir>"
            )
        return path
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume={resume}: no such checkpoint directory")
    return path


def check_contents(ckpt_dir: Path, manifest: dict, rank: int = 0, world: int = 1) -> None:
    """CRC-check this rank's share (every ``world``-th) of the checkpoint's torch files.

    ``torch.save`` writes zip archives with a CRC32 per member, but ``torch.load`` does not check
    them, so a flipped byte inside a tensor would load silently as a wrong weight. Checking reads the
    files once; spread over the ranks, each reads 1/world of the checkpoint.
    """
    torch_files = sorted(rel for rel in manifest["files"] if rel.endswith(".pt"))
    for rel in torch_files[rank::world]:
        path = Path(ckpt_dir) / rel
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"checkpoint file {path} is unreadable ({e})") from e
        if bad is not None:
            raise CheckpointError(
                f"checkpoint file {path} is corrupt: its member {bad} fails the CRC check; resume from another "
                f"checkpoint with train.resume=<dir>. Complete checkpoints: "
                f"{[p.name for p in committed(Path(ckpt_dir).parent) if p != Path(ckpt_dir)] or 'none'}"
            )


# ---- resolving a checkpoint path -------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointRef:
    root: Path  # the directory holding tag directories and ``latest``
    tag: str

    @property
    def path(self) -> Path:
        return self.root / self.tag

    @property
    def run_dir(self) -> Path:
        return self.root.parent if self.root.name == CHECKPOINTS_DIR else self.root

    @property
    def step(self) -> int:
        return int(read_manifest(self.path)["step"])

    @property
    def run_config_path(self) -> Path:
        return self.run_dir / RUN_CONFIG_FILE


def is_trainer_checkpoint(path: str | Path) -> bool:
    """Is ``path`` a run directory, checkpoints directory or tag directory written by the trainer?"""
    path = Path(path)
    has_latest = any(read_latest(root) is not None for root in (path / CHECKPOINTS_DIR, path))
    return has_latest or (path / MANIFEST).is_file()


def resolve_checkpoint(path: str | Path) -> CheckpointRef:
    """A run directory, its ``checkpoints`` directory (both: the latest tag) or one tag directory.

    The checkpoint's manifest is verified (every file present with its recorded size).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"no such run directory or checkpoint: {path}")
    for root in (path / CHECKPOINTS_DIR, path):
        tag = read_latest(root)
        if tag is not None:
            ref = CheckpointRef(root, tag)
            break
    else:
        if not (path / MANIFEST).is_file():
            raise CheckpointNotFoundError(
                f"{path} is not a trainer checkpoint: expected a run directory (with checkpoints/latest), a "
                f"checkpoints directory (with latest) or a tag directory (step_<n>/ with {MANIFEST})"
            )
        ref = CheckpointRef(path.parent, path.name)
    verify(ref.path)
    return ref


def consolidated_state_dict(ref: CheckpointRef, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full model state dict of a ZeRO-2/3 checkpoint (names as in ``ARRAModel``).

    Tensors are materialised one at a time (lazy mode) and cast to ``dtype`` when given, so peak host
    memory is one fp32 tensor plus the result, not a full fp32 copy of the model. The files' sizes and
    zip CRCs are checked first: a corrupt file is named instead of loading wrong weights.
    """
    # deepspeed is imported only here (it takes seconds and pulls in its accelerator probing), not for
    # reading manifests or run configs
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_contents(ref.path, verify(ref.path))
    try:
        # zero_to_fp32 prints its progress (files, tensor counts, progress bars) as the command-line tool
        # it also is; here it is one quiet step of export / generation / evaluation (errors still raise)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag, lazy_mode=True)
        state = {}
        for name in list(lazy):
            tensor = lazy.pop(name).contiguous()
            state[name] = tensor.to(dtype) if dtype is not None else tensor
    except Exception as e:  # zero_to_fp32's own errors do not always name the checkpoint
        raise CheckpointError(f"cannot read the weights of checkpoint {ref.path}: {type(e).__name__}: {e}") from e
    return state


# ---- a trained backbone ----------------------------------------------------------------------------


def read_run_model_config(run_dir: str | Path) -> ModelConfig:
    """The ``model`` section of a run's config.yaml, and nothing else: export, generation and evaluation must
    work where the training data (``data.path``) is not mounted. Where the run copied the base checkpoint's
    small files into ``assets/model`` (config, tokenizer), the section reads those: the base may have moved."""
    config_path = Path(run_dir) / RUN_CONFIG_FILE
    if not config_path.is_file():
        raise InputNotFoundError(f"{config_path} not found: the trainer writes the resolved run config there")
    data = read_config_file(config_path)
    if not isinstance(data.get("model"), dict):
        raise ConfigError(f"{config_path} has no 'model' section; is it a run config written by arra_ds?")
    model_cfg = from_dict(ModelConfig, data["model"], prefix="model")
    copied = Path(run_dir) / ASSETS_DIR / ASSETS_MODEL_DIR
    if copied.is_dir():
        model_cfg = model_cfg.backbone.for_inference(model_cfg, copied)
    model_cfg.validate()
    return model_cfg


@dataclass
class TrainedBackbone:
    """The backbone weights of a trainer checkpoint (projector dropped) and what they belong to."""

    ref: CheckpointRef
    model_cfg: ModelConfig  # the run's model section
    state_dict: dict[str, torch.Tensor]  # Hugging Face names (``model.layers.0...``, ``lm_head.weight``)
    dropped: list[str]  # the training-only projector's parameter names


def split_backbone_state(state: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ARRAModel state dict -> (Hugging Face backbone state dict, dropped projector keys)."""
    backbone, dropped = {}, []
    for name, tensor in state.items():
        if name.startswith(BACKBONE_PREFIX):
            backbone[name[len(BACKBONE_PREFIX) :]] = tensor
        elif name.startswith(PROJECTOR_PREFIX):
            dropped.append(name)
        else:
            raise CheckpointError(
                f"unexpected parameter {name!r} in checkpoint {source}: an ARRAModel has only {BACKBONE_PREFIX}* and "
                f"{PROJECTOR_PREFIX}* parameters; is it an arra_ds run?"
            )
    return backbone, dropped


def read_trained_backbone(path: str | Path, dtype: torch.dtype | None = None, merge: bool = True) -> TrainedBackbone:
    """Backbone weights of a run directory, its ``checkpoints`` directory or one ``step_<n>`` directory. A run that
    trained LoRA adapters (``model.trainable``) has them folded into plain weights with the base names (``merge``;
    ``merge=False`` keeps the adapters, for writing them alone)."""
    ref = resolve_checkpoint(path)
    model_cfg = read_run_model_config(ref.run_dir)
    backbone, dropped = split_backbone_state(consolidated_state_dict(ref, dtype), str(ref.path))
    if merge and model_cfg.trainable != TRAIN_ALL:
        backbone = merge_lora(backbone, model_cfg.lora)
    return TrainedBackbone(ref, model_cfg, backbone, dropped)


def load_trained_backbone(
    path: str | Path, dtype: torch.dtype, device: torch.device | str
) -> tuple[nn.Module, ChameleonVocab | None, TrainedBackbone]:
    """(backbone in eval mode on ``device``, its text vocabulary or None, what was read) from a trainer checkpoint.

    The module is the backbone's skeleton (built on the meta device from the run's model section) and takes the
    checkpoint's tensors as they are (``assign=True``): the weights exist once in memory, never twice.
    """
    trained = read_trained_backbone(path, dtype)
    backbone = trained.model_cfg.backbone
    module = backbone.skeleton(trained.model_cfg, dtype)
    load_strict(module, trained.state_dict, source=f"checkpoint {trained.ref.path}", error=CheckpointError,
                what=f"the model.source={trained.model_cfg.source} backbone its config.yaml describes", assign=True)
    module.to(device).eval().requires_grad_(False)
    return module, backbone.vocab(trained.model_cfg), trained


# ---- what the run was trained on ---------------------------------------------------------------------


# Paths of RunData that may be relative to the directory of the record (files copied into the run's assets/).
RUN_DATA_PATH_FIELDS = ("vqgan_config", "vqgan_checkpoint", "tokenizer", "heldout_prompts")


@dataclass
class RunData:
    """What generation and evaluation need to know about the data a run was trained on.

    The trainer writes it to ``<run dir>/arra_data.json`` (``arra_ds/train/data_record.py``); an
    export copies it. Empty fields are unknown (e.g. data pre-tokenised elsewhere, without its
    ``pretokenize_meta.json``); explicit keys of generation and evaluation always win over it. Paths of
    files copied into the run (``assets/``) are relative to the record's directory; ``read_run_data``
    resolves them, so a run directory can be moved as a whole.
    """

    source: str = ""  # the training data (data.path; for the demo, its directory in the cache)
    code_height: int = 0  # the trained image grid in VQ codes (of the first training sample); 0 = unknown
    code_width: int = 0
    # the image tokenizer the data was pre-tokenised with: its config (Chameleon vqgan.yaml, LlamaGen VQ yaml)
    # and weights (vqgan.ckpt, vq_ds16_c2i.pt); its decoder turns generated codes into pictures
    vqgan_config: str = ""
    vqgan_checkpoint: str = ""
    tokenizer: str = ""  # the text tokenizer of pre-tokenization
    encoder: dict[str, str] = field(default_factory=dict)  # the alignment target's EncoderSpec (name, kind, path, ...)
    heldout_prompts: str = ""  # prompts not trained on (MDS dir, .json or .txt): the default eval prompts
    extractors: list[str] = field(default_factory=list)  # FID feature extractors that work offline on this data
    clip_model: str = ""  # the CLIP-Score model for this data (clip_model= of launch/eval.py)
    # caveats a report repeats when it uses that default: key (extractors, clip_model, prompts) -> note
    notes: dict[str, str] = field(default_factory=dict)
    # the assistant turn of every sample opens with <REP> (pre-tokenised with rep_token=true, for align.target=rep):
    # sampling puts it in the prefix, where the model saw it in training
    rep_token: bool = False

    @property
    def grid(self) -> ImageGrid | None:
        """The code grid the model was trained on, if known."""
        return ImageGrid(self.code_height, self.code_width) if self.code_height and self.code_width else None

    def resolved(self, base_dir: Path) -> "RunData":
        """Relative paths (copies in the run's assets) made absolute against ``base_dir``."""
        paths = {name: str(base_dir / value) for name in RUN_DATA_PATH_FIELDS
                 if (value := getattr(self, name)) and not Path(value).is_absolute()}
        return replace(self, **paths)


def run_data_path(model: str | Path) -> Path | None:
    """Where the data record of ``model`` (a trainer checkpoint or an exported directory) is, if any."""
    path = Path(model)
    if (path / RUN_DATA_FILE).is_file():
        return path / RUN_DATA_FILE
    if is_trainer_checkpoint(path):
        candidate = resolve_checkpoint(path).run_dir / RUN_DATA_FILE
        if candidate.is_file():
            return candidate
    return None


def read_run_data(model: str | Path) -> RunData | None:
    """The data record of a trainer checkpoint (run dir, checkpoints dir or step dir) or of an export;
    None when the model has none (runs of older versions, models from elsewhere)."""
    path = run_data_path(model)
    if path is None:
        return None
    data = read_json(path, CheckpointError, hint="it is the trainer's data record: delete it and pass the data keys explicitly")
    return from_dict(RunData, data, prefix=RUN_DATA_FILE).resolved(path.parent)


# ---- what inference needs from outside the run: copied into assets/, or recorded -------------------------


ASSETS_DIR = "assets"  # <run dir>/assets (and <export>/assets): what inference needs besides the trained weights
ASSETS_MODEL_DIR = "model"  # the backbone's small files of the base checkpoint (config.json, tokenizer)
ASSETS_IMAGE_TOKENIZER_DIR = "image_tokenizer"  # the image tokenizer's config (and weights, when small)
ASSETS_MANIFEST = "assets.json"
BASE_WEIGHTS_FILE = "base_weights.safetensors"  # untrained tensors of the base that an export carries
HASH_CHUNK_BYTES = 1 << 24


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and bytes (the same tensors give the same hash in any file layout)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class ExternalFile:
    """What inference needs that was too large to copy into the run: where it was, how to know it again, and
    the key that points at it after it moved. ``kind``: a ``file`` (hash of its bytes) or ``base_weights`` (a
    checkpoint directory; hash of the tensors the backbone reads from it)."""

    path: str
    size: int
    sha256: str
    key: str
    kind: Literal["file", "base_weights"] = "file"
    what: str = ""


@dataclass
class RunAssets:
    """``<dir>/assets/assets.json``: the files copied into the run (relative name -> the original path) and the
    external ones (name -> ExternalFile)."""

    root: Path
    copied: dict[str, str] = field(default_factory=dict)
    external: dict[str, ExternalFile] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        return self.root / ASSETS_MODEL_DIR

    def external_file(self, name: str) -> ExternalFile | None:
        return self.external.get(name)


def read_run_assets(model: str | Path) -> RunAssets | None:
    """The assets of a trainer checkpoint or export (next to its data record), or None (older runs)."""
    record = run_data_path(model)
    if record is None or not (record.parent / ASSETS_DIR / ASSETS_MANIFEST).is_file():
        return None
    root = record.parent / ASSETS_DIR
    data = read_json(root / ASSETS_MANIFEST, CheckpointError, hint="it is the run's record of its assets (what inference needs from outside the run)")
    external = {name: from_dict(ExternalFile, entry, prefix=f"{ASSETS_MANIFEST} external.{name}")
                for name, entry in data.get("external", {}).items()}
    return RunAssets(root, dict(data.get("copied", {})), external)


def check_external_file(entry: ExternalFile, path: str | Path | None = None) -> Path:
    """``path`` (default: where the run saw it) if it is the file the run recorded; else a CheckpointError naming
    the file and the key to set."""
    path = Path(path or entry.path)
    if not path.is_file() or path.stat().st_size != entry.size or file_sha256(path) != entry.sha256:
        found = "is missing" if not path.is_file() else "is not the same file (size or sha256 differ)"
        raise CheckpointError(
            f"{entry.what or 'a file the run needs'} {path} {found}: the run recorded {entry.path} "
            f"({entry.size} bytes, sha256 {entry.sha256[:16]}...); pass {entry.key}=<its new path>"
        )
    return path
