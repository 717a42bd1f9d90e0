"""Slurm signals every process of a step: the resource tracker the trainer starts survives SIGUSR1."""

import signal
import subprocess
import sys

from conftest import subprocess_env

# A fresh interpreter: this test process may already run a tracker started without the shield.
_CHILD = """
import os, signal, time
from multiprocessing import resource_tracker, shared_memory
from arra_ds.train.preemption import PreemptionWatcher

with PreemptionWatcher() as watcher:
    resource_tracker.ensure_running()  # a no-op once the watcher has started it
    tracker = resource_tracker._resource_tracker._pid
    os.kill(tracker, signal.SIGUSR1)  # what scancel --signal=USR1 sends the whole step
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.5)
    block = shared_memory.SharedMemory(create=True, size=16)  # registers with the tracker
    block.close()
    block.unlink()
    print("tracker", tracker, "alive", os.waitpid(tracker, os.WNOHANG) == (0, 0), "watcher", watcher.received.name)
"""


def test_resource_tracker_survives_the_preemption_signal():
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "alive True" in proc.stdout and f"watcher {signal.SIGUSR1.name}" in proc.stdout, proc.stdout
    # an unshielded tracker dies and its replacement warns ("process died unexpectedly") and prints KeyErrors
    assert "resource_tracker" not in proc.stderr and "KeyError" not in proc.stderr, proc.stderr
