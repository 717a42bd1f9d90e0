"""The fused kernels under DeepSpeed ZeRO-3 (2 ranks, gloo): same metrics as the torch path.

Both kernels read weights that ZeRO-3 partitions (lm_head.weight, the projector's fc1/fc2); they
must run inside the owning module's forward so that the weights are gathered there. On CPU the
kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1, which the launcher
subprocesses inherit).
"""

import json
import subprocess

import pytest
from conftest import REPO_ROOT, free_port, launcher, subprocess_env

pytestmark = pytest.mark.slow

STEPS = 3
METRICS = ("loss", "loss_ar", "loss_gva", "loss_z", "cos", "grad_norm")



def _run(run_dir, fused_kernels: str) -> list[dict]:
    cmd = [
        launcher("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
        "launch/train.py", "--ds_config", "ds_configs/zero3.json", f"output_dir={run_dir}",
        "train.progress_bar=false", "train.log_every=1", "demo.num_samples=16", "train.micro_batch_size=2",
        f"train.max_steps={STEPS}", "train.save_every=100", "optim.warmup_steps=1", f"model.fused_kernels={fused_kernels}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_zero3_fused_kernels_match_torch_path(tmp_path):
    fused = _run(tmp_path / "fused", "on")
    reference = _run(tmp_path / "torch", "off")
    assert len(fused) == len(reference) == STEPS
    for step_fused, step_ref in zip(fused, reference):
        for key in METRICS:
            assert step_fused[key] == pytest.approx(step_ref[key], rel=1e-5, abs=1e-6), (step_fused["step"], key)
