"""Reads bench/gpu/wheels.txt for wheelhouse.sh (here) and install_offline.sh (on the GPU machine).

Standard library only: it runs under whatever Python builds the wheelhouse and under the device's own
Python 3.12 before anything is installed there.

    python bench/gpu/wheel_manifest.py reqs [--mode pin|fill] [--skip NAME]
    python bench/gpu/wheel_manifest.py prune DIR       # delete files that no manifest line names
    python bench/gpu/wheel_manifest.py check DIR       # every line has a wheel or sdist in DIR
    python bench/gpu/wheel_manifest.py sizes DIR MIB   # size table; exit 1 at MIB or more
    python bench/gpu/wheel_manifest.py plan DIR        # what this interpreter needs: absent fills, then pins
    python bench/gpu/wheel_manifest.py verify          # import everything (have lines too), pins at their versions
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import re
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

MANIFEST = Path(__file__).with_name("wheels.txt")
# The modules whose versions `verify` prints, device's and carried alike.
SUMMARY = (
    "torch",
    "triton",
    "transformers",
    "deepspeed",
    "streaming",
    "open_clip",
    "tokenizers",
    "huggingface_hub",
    "liger_kernel",
    "pytorch_msssim",
    "torchvision",
    "timm",
    "numpy",
)


@dataclass(frozen=True)
class Entry:
    mode: str  # "pin", "fill" or "have"
    name: str
    version: str
    module: str

    @property
    def req(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def key(self) -> tuple[str, str]:
        return canonical(self.name), self.version


def canonical(name: str) -> str:
    """PEP 503 name: what a wheel's file name and the installed metadata agree on."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_manifest(path: Path = MANIFEST, carried: bool = True) -> list[Entry]:
    """The pin and fill lines (what .gpu_wheels/ holds); with carried=False the have lines as well."""
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) == 3 and parts[0] == "have" and "==" not in parts[1]:
            entries.append(Entry("have", parts[1], "", parts[2]))
            continue
        if len(parts) != 3 or parts[0] not in ("pin", "fill") or "==" not in parts[1]:
            sys.exit(f"{path}:{n}: expected 'pin|fill NAME==VERSION MODULE' or 'have NAME MODULE', got {line!r}")
        name, version = parts[1].split("==", 1)
        entries.append(Entry(parts[0], name, version, parts[2]))
    return [e for e in entries if e.mode != "have"] if carried else entries


def file_key(filename: str) -> tuple[str, str] | None:
    """(canonical name, version) of a wheel or sdist file name, None for anything else."""
    if filename.endswith(".whl"):
        parts = filename[: -len(".whl")].split("-")
        return (canonical(parts[0]), parts[1]) if len(parts) >= 5 else None
    for ext in (".tar.gz", ".zip"):
        if filename.endswith(ext):
            stem = filename[: -len(ext)]
            if "-" in stem:
                name, version = stem.rsplit("-", 1)
                return canonical(name), version
    return None


def files_by_key(wheel_dir: Path) -> dict[tuple[str, str], list[Path]]:
    found: dict[tuple[str, str], list[Path]] = {}
    for f in sorted(wheel_dir.iterdir()):
        key = file_key(f.name)
        if key is not None:
            found.setdefault(key, []).append(f)
    return found


def cmd_reqs(args) -> int:
    for e in read_manifest():
        if (args.mode is None or e.mode == args.mode) and canonical(e.name) not in {canonical(s) for s in args.skip}:
            print(e.req)
    return 0


def cmd_prune(args) -> int:
    wanted = {e.key for e in read_manifest()}
    for f in sorted(Path(args.dir).iterdir()):
        if f.is_file() and file_key(f.name) not in wanted:
            print(f"removing {f.name} (no line of {MANIFEST.name} names it)")
            f.unlink()
    return 0


def missing_files(wheel_dir: Path) -> list[str]:
    found = files_by_key(wheel_dir)
    return [e.req for e in read_manifest() if e.key not in found]


def cmd_check(args) -> int:
    missing = missing_files(Path(args.dir))
    if missing:
        print(f"{args.dir}/ lacks a file for: {' '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def cmd_sizes(args) -> int:
    files = [f for f in sorted(Path(args.dir).iterdir(), key=lambda p: -p.stat().st_size) if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    for f in files:
        print(f"{f.stat().st_size / 2**20:8.2f} MiB  {f.name}")
    print(f"{total / 2**20:8.2f} MiB  total in {len(files)} files (limit {args.mib} MiB)")
    if total >= args.mib * 2**20:
        print(f"the wheelhouse is over {args.mib} MiB: drop a line from {MANIFEST}", file=sys.stderr)
        return 1
    return 0


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def cmd_plan(args) -> int:
    """Fills first (the pins' dependencies), then pins."""
    missing = missing_files(Path(args.dir))
    if missing:
        print(
            f"{args.dir}/ lacks a file for: {' '.join(missing)} (rerun bench/gpu/wheelhouse.sh and carry it)",
            file=sys.stderr,
        )
        return 1
    entries = read_manifest()
    for e in entries:
        if e.mode == "fill" and installed_version(e.name) is None:
            print(e.req)
    for e in entries:
        if e.mode == "pin":
            print(e.req)
    return 0


def tool_report() -> list[str]:
    """What JIT compilation on the device will need; printed, not enforced."""
    lines = []
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    lines.append(f"C compiler (Triton builds its launcher with it): {cc or 'NONE'}")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    lines.append(f"Python.h (same): {'yes' if header.is_file() else 'NONE'} ({header})")
    # Where torch.utils.cpp_extension looks for the toolkit (importing it here would log a warning).
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc") or next(
        (str(Path(h, "bin", "nvcc")) for h in homes if h and Path(h, "bin", "nvcc").is_file()), None
    )
    lines.append(f"nvcc (DeepSpeed JIT-builds FusedAdam/CPUAdam with it): {nvcc or 'NONE'}")
    lines.append(f"ninja: {shutil.which('ninja') or 'NONE'}")
    return lines


def cmd_verify(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    problems = []
    versions = {}
    for name in ("torch", "triton"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001 - report every failure, not the first
            problems.append(f"import {name}: {type(e).__name__}: {e}")
    for e in read_manifest(carried=False):
        try:
            importlib.import_module(e.module)
        except Exception as exc:  # noqa: BLE001
            why = "the device should have it; the wheelhouse does not carry it" if e.mode == "have" else e.name
            problems.append(f"import {e.module} ({why}): {type(exc).__name__}: {exc}")
            continue
        have = installed_version(e.name)
        versions[e.module] = have or "?"
        if e.mode == "pin" and have != e.version:
            problems.append(f"{e.name} is {have}, the manifest pins {e.version}")
    for name in SUMMARY:
        print(f"{name:16s} {versions.get(name, 'NOT IMPORTABLE')}")
    for line in tool_report():
        print(line)
    if problems:
        print("install_offline: FAILED:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reqs")
    r.add_argument("--mode", choices=("pin", "fill"))
    r.add_argument("--skip", action="append", default=[])
    r.set_defaults(func=cmd_reqs)
    for name, func in (("prune", cmd_prune), ("check", cmd_check), ("plan", cmd_plan)):
        s = sub.add_parser(name)
        s.add_argument("dir")
        s.set_defaults(func=func)
    s = sub.add_parser("sizes")
    s.add_argument("dir")
    s.add_argument("mib", type=float)
    s.set_defaults(func=cmd_sizes)
    sub.add_parser("verify").set_defaults(func=cmd_verify)
    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
