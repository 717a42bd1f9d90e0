"""Messages from third-party internals that we cannot change: listed, explained and silenced in one place.

A run's console shows no warning that arra_ds causes. Causes in our code are fixed where they arise
(``ARRAOutput`` is a NamedTuple that DeepSpeed's ZeRO-3 hooks can walk; the export holds every weight
that stock ``transformers`` expects). What remains are messages printed from inside libraries, about
their own internals, that are harmless for arra_ds. Each is listed in ``KNOWN_MESSAGES`` with its exact
text, who prints it and why it is harmless, and ``install()`` silences it by that exact text:

- ``python_warning``: a ``warnings.warn`` call; silenced with a ``warnings`` filter on the exact message;
- ``deepspeed_log``: a record of DeepSpeed's ``DeepSpeed`` logger; silenced with a logging filter;
- ``launcher_process``: printed by the ``deepspeed`` / ``torchrun`` launcher processes before our code
  runs in the ranks; nothing in our process can silence them, so they are only documented here.

Every launcher calls ``install()`` before it imports torch-heavy modules (DeepSpeed logs while it is
imported). ``tests/test_first_hour.py`` fails when the default run prints a line with "Warning" or
"warn" that is not one of these messages.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Literal

DEEPSPEED_LOGGER = "DeepSpeed"  # the logger deepspeed.utils.logging creates


@dataclass(frozen=True)
class KnownMessage:
    text: str  # the exact message (without the logger's prefix or the warning's file:line)
    kind: Literal["python_warning", "deepspeed_log", "launcher_process"]
    source: str  # which library code prints it
    why_harmless: str
    category: type[Warning] = Warning  # python_warning: the warning's class


KNOWN_MESSAGES: tuple[KnownMessage, ...] = (
    KnownMessage(
        "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single` "
        "instead.",
        "python_warning",
        "deepspeed/comm/torch.py (ZeRO-3 parameter all-gather) on torch >= 2.14",
        "the old name still works and gives the same result in this torch; DeepSpeed has to move to the new "
        "name, our code calls neither",
        FutureWarning,
    ),
    KnownMessage(
        "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `torch.distributed.reduce_scatter_single` "
        "instead.",
        "python_warning",
        "deepspeed/comm/torch.py (ZeRO-3 gradient reduce-scatter) on torch >= 2.14; printed at every step",
        "as above: a rename in torch that DeepSpeed has not followed yet",
        FutureWarning,
    ),
    KnownMessage(
        "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
        "deepspeed_log",
        "deepspeed/accelerator/real_accelerator.py, on a machine without CUDA (also printed by the launcher processes)",
        "on a CPU-only machine the CPU is the device we mean to use (gloo, fp32); on a GPU machine DeepSpeed "
        "finds CUDA and does not print it",
    ),
    KnownMessage(
        "Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, to avoid your system "
        "being overloaded, please further tune the variable for optimal performance in your application as needed.",
        "launcher_process",
        "torch/distributed/run.py (the `torchrun` command) with several processes and no OMP_NUM_THREADS",
        "one intra-op thread per rank is what a multi-rank CPU run wants; set OMP_NUM_THREADS to choose otherwise",
    ),
    KnownMessage(
        "Unable to find hostfile, will proceed with training with local resources only.",
        "launcher_process",
        "deepspeed/launcher/runner.py (the `deepspeed` command) when no hostfile is given",
        "a single-machine run needs no hostfile; multi-node runs go through Slurm (launch/slurm/train.sbatch)",
    ),
)


class _DropExactMessages(logging.Filter):
    def __init__(self, texts: set[str]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.texts


_installed = False


def install() -> None:
    """Silence the ``KNOWN_MESSAGES`` this process can silence (idempotent)."""
    global _installed
    if _installed:
        return
    for message in KNOWN_MESSAGES:
        if message.kind == "python_warning":
            warnings.filterwarnings("ignore", message=re.escape(message.text) + r"\Z", category=message.category)
    deepspeed_texts = {m.text for m in KNOWN_MESSAGES if m.kind == "deepspeed_log"}
    logging.getLogger(DEEPSPEED_LOGGER).addFilter(_DropExactMessages(deepspeed_texts))
    _installed = True


def is_known(line: str) -> bool:
    """Does a console line carry one of the ``KNOWN_MESSAGES`` (with any logger prefix)?"""
    return any(line.rstrip().endswith(message.text) for message in KNOWN_MESSAGES)
