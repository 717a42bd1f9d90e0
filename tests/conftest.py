"""Shared test setup: CPU by default, `gpu` tests skipped without CUDA, a private data cache."""

import os
import runpy
import socket
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Without CUDA, Triton kernels (kernels/, tests/test_kernels.py) run in Triton's CPU interpreter.
# Triton fixes compile-vs-interpret when triton.language is first imported, and torch imports it
# lazily (e.g. through arra_ds.model), so it must be set here, before any test module is loaded.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Demo data and other cached artefacts go to a per-session temp dir, never ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "arra_ds_cache"
    monkeypatch.setenv("ARRA_DS_CACHE", str(cache))
    yield


@pytest.fixture
def one_torch_thread():
    """Generation tests: one intra-op thread, so sampling sees the same reductions in every batch shape."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env(**extra) -> dict:
    """Environment for launcher subprocesses (deepspeed/torchrun): the repo on PYTHONPATH, CPU only."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launcher(name: str) -> str:
    """Path of a console script (deepspeed, torchrun) from the running interpreter's environment."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port() -> int:
    """A TCP port nobody listens on now (for --master_port of launcher subprocesses)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(script: str, args: list[str]) -> int:
    """Run a launch/ script's main() in this process (no interpreter start-up)."""
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        return runpy.run_path(str(REPO_ROOT / "launch" / script), run_name="not_main")["main"]()
    finally:
        sys.argv = argv
