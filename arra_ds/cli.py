"""What every launcher in ``launch/`` does around its work: bad input -> one line and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

import torch.distributed as tdist

BAD_INPUT_EXIT_CODE = 2


def run_launcher(work: Callable[[], object], bad_input: tuple[type[BaseException], ...]) -> int:
    """Run ``work``; an error in ``bad_input`` (a user's config, file or data) prints ``error: <why>``
    and returns 2 instead of a traceback. The process group is torn down either way, so a failing
    rank does not leave the others waiting in NCCL/gloo until their timeout."""
    try:
        work()
    except bad_input as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return BAD_INPUT_EXIT_CODE
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
    return 0
