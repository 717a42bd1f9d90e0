"""launch/slurm/train.sbatch on a real two-node Slurm cluster (slurmctld + slurmd node1/node2 on this host).

The job runs 2 nodes x 1 CPU rank with the debug config; once it has logged step 3 the test sends
Slurm's warning signal (scancel --signal=USR1, what --signal=USR1@120 does before the time limit).
The ranks save a checkpoint and exit with the requeue code and the sbatch script requeues the job.
node2 is drained before the signal and the pending requeued job is shrunk to one node, as on a cluster
short of nodes (scontrol update NumNodes=1): the second start resumes the 2-rank checkpoint on 1 rank (elastic
resume, the same sbatch script) and finishes. The cluster comes from scripts/slurm_cluster.sh (started
here and stopped afterwards unless it was already running).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, subprocess_env

from arra_ds import checkpoints
from arra_ds.train.sample_log import read_sample_logs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("sbatch") is None, reason="Slurm is not installed (no sbatch on PATH); "
                       "apt-get install -y slurm-wlm, see docs/slurm.md"),
]

CLUSTER_SCRIPT = REPO_ROOT / "scripts" / "slurm_cluster.sh"
STATE_DIR = Path(os.environ.get("ARRA_DS_SLURM_DIR", "/var/tmp/arra_ds_slurm"))
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Steps left after the signal (sent once step 3 is logged, polled every second) must outlast the poll and scancel:
# with 8 a quiet machine finished the run before the signal arrived (no requeue).
MAX_STEPS = 24
REQUEUE_SETTLE_S = 3  # seconds between the requeue and the release of the shrunk job
STEPS_PER_EPOCH = 6  # 48 demo samples, 2 ranks x 4


def _slurm_env(**extra):
    return subprocess_env(SLURM_CONF=str(STATE_DIR / "etc" / "slurm.conf"), **extra)


def _cluster_is_up() -> bool:
    if not (STATE_DIR / "etc" / "slurm.conf").is_file():
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], env=_slurm_env(), capture_output=True, text=True, timeout=30)
    return proc.returncode == 0 and set(proc.stdout.split()) == {"idle"}


@pytest.fixture(scope="module")
def cluster():
    started = not _cluster_is_up()
    if started:
        proc = subprocess.run([str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f"could not start the Slurm test cluster:\n{proc.stdout}\n{proc.stderr}"
    yield
    if started:
        subprocess.run([str(CLUSTER_SCRIPT), "stop"], capture_output=True, text=True, timeout=120)


def _job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=_slurm_env(), capture_output=True,
                         text=True, timeout=30).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _nodes_idle() -> bool:
    """No node runs a job (drained nodes count as idle)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=_slurm_env(), capture_output=True, text=True,
                         timeout=30).stdout
    states = dict(line.split() for line in out.splitlines() if line.strip())
    return bool(states) and all(state in ("idle", "drain") for state in states.values())


def _set_node_state(node: str, state: str) -> None:
    subprocess.run(["scontrol", "update", f"NodeName={node}", f"State={state}", "Reason=arra_ds_test"],
                   env=_slurm_env(), check=True, timeout=30)


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def test_two_node_job_is_preempted_requeued_and_resumes(cluster):
    (STATE_DIR / "jobs").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=STATE_DIR / "jobs"))
    run_dir = work / "run"
    env = _slurm_env(GPUS_PER_NODE=1, PYTHON=sys.executable, ARRA_DS_ROOT=REPO_ROOT, ARRA_DS_CACHE=work / "cache")
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", f"--output={work}/slurm-%j.out", "launch/slurm/train.sbatch",
         f"output_dir={run_dir}", "demo.num_samples=48", "train.micro_batch_size=4", f"train.max_steps={MAX_STEPS}",
         "train.save_every=4", "train.keep_last=0", "train.log_every=1", "train.log_samples=true",
         "train.progress_bar=false", "optim.warmup_steps=2"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]

    signalled = released = drained = False
    requeued_at = None
    deadline = time.monotonic() + 1500
    try:
        while time.monotonic() < deadline:
            job = _job(job_id)
            if job.get("JobState") in FINAL_STATES:
                break
            if not signalled and job.get("JobState") == "RUNNING" and 3 in _logged_steps(run_dir):
                # no job may start on node2 any more (it finishes the running step first)
                _set_node_state("node2", "DRAIN")
                drained = True
                # the ranks' step (0), as --signal=USR1@120 does at the time limit (without "B:" Slurm
                # signals the job's steps, not the batch shell)
                subprocess.run(["scancel", "--signal=USR1", f"{job_id}.0"], env=_slurm_env(), check=True, timeout=30)
                signalled = True
            if signalled and not released and job.get("JobState") == "PENDING" and int(job.get("Restarts", 0)) > 0:
                # once both nodes have finished the first run: the job comes back on node1 alone, and
                # now (Slurm would hold a requeued job back for a while). Not within the requeue's own
                # seconds: slurmd revokes the job's credential at the requeue (second resolution) and
                # refuses a start whose credential is not newer ("Job credential revoked", job FAILED).
                requeued_at = requeued_at or time.monotonic()
                if time.monotonic() - requeued_at >= REQUEUE_SETTLE_S and _nodes_idle():
                    for change in (["NumNodes=1", "NumTasks=1", "NumCPUs=1"], ["StartTime=now"]):
                        subprocess.run(["scontrol", "update", f"JobId={job_id}", *change], env=_slurm_env(), check=True,
                                       timeout=30)
                    released = True
            time.sleep(1)
    finally:
        if drained:
            _set_node_state("node2", "RESUME")
    log = next(work.glob("slurm-*.out")).read_text()
    job = _job(job_id)
    assert job.get("JobState") == "COMPLETED", f"{job}\n{log[-6000:]}"

    # two starts, the first on both nodes, preempted and requeued by the sbatch script, the second on one
    assert job["Restarts"] == "1" and job["ExitCode"] == "0:0"
    assert "start 0: 2 nodes (node1 node2) x 1 ranks" in log and "start 1: 1 nodes (node1) x 1 ranks" in log
    assert "received SIGUSR1" in log and f"job {job_id} preempted: checkpoint written, requeueing" in log
    # the signal reaches every process of the step; none of ours dies of it or prints a traceback, and
    # the two nodes' leaders (one /tmp, private /dev/shm) never wait for each other's prefix lock
    assert "Traceback" not in log and "resource_tracker" not in log and "going on without it" not in log, log[-6000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS and not summary["preempted"]
    assert 3 <= summary["resumed_from_step"] < MAX_STEPS
    resumed_from = run_dir / "checkpoints" / checkpoints.tag_for(summary["resumed_from_step"])
    assert f"resumed from {resumed_from}" in log and "on 1 rank(s), written by 2" in log
    assert checkpoints.verify(resumed_from / checkpoints.UNIVERSAL_DIR)["world_size"] == 2  # converted once

    # the run reads like an uninterrupted one: every step logged once, every sample once per epoch
    assert _logged_steps(run_dir) == list(range(1, MAX_STEPS + 1))
    logs = read_sample_logs(run_dir)
    assert sorted(logs) == [0, 1]
    first_epoch = [uid for lines in logs.values() for line in lines if line["step"] <= STEPS_PER_EPOCH
                   for uid in line["uids"]]
    assert len(first_epoch) == len(set(first_epoch)) == 48  # all 48 demo samples, none twice
    assert checkpoints.read_latest(run_dir / "checkpoints") == checkpoints.tag_for(MAX_STEPS)
    assert checkpoints.verify(run_dir / "checkpoints" / checkpoints.tag_for(MAX_STEPS))["world_size"] == 1
    # the global batch of the first start (micro batch 4 x 2 ranks) is kept on 1 rank
    assert [json.loads(line)["samples_seen"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        8 * step for step in range(1, MAX_STEPS + 1)]
    shutil.rmtree(work, ignore_errors=True)
