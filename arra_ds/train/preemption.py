"""Preemption: a signal asks for a checkpoint at the next step boundary and a requeue exit code.

Slurm sends ``SIGUSR1`` ahead of the time limit (``#SBATCH --signal=USR1@120``) and ``SIGTERM`` when
it preempts or cancels a job (followed by SIGKILL after ``KillWait``). The handler only records
the signal; the training loop folds the flag into the statistics it all-reduces every micro-step,
so all ranks see the same "preempt now" at the same step, save one checkpoint together and exit
with ``REQUEUE_EXIT_CODE``. ``launch/slurm/train.sbatch`` requeues the job on that code, and the
requeued job continues from the checkpoint with ``train.resume=auto``.

Slurm signals every process of a job step, helpers included. multiprocessing's resource tracker
(the child that unlinks a crashed process's shared memory; streaming's blocks register with it) dies
on SIGUSR1, its default action, and the next shared-memory call starts a fresh one that prints a
``KeyError`` traceback for every block released at exit. The watcher starts the tracker with the
preemption signals blocked; a child keeps its parent's signal mask across exec.
"""

from __future__ import annotations

import signal
from multiprocessing import resource_tracker
from types import FrameType

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry". The deepspeed
# launcher exits with its first failing rank's code, so this reaches srun and the sbatch script.
REQUEUE_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    """Context manager that records SIGTERM/SIGUSR1 instead of dying; restores the old handlers on exit."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            print(f"received {self.received.name}: saving a checkpoint at the next step boundary, then exiting", flush=True)

    def __enter__(self) -> "PreemptionWatcher":
        start_shielded_resource_tracker(self.signals)
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def start_shielded_resource_tracker(signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
    """Start multiprocessing's resource tracker (if it is not running) with ``signals`` blocked in it."""
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
