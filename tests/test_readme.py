"""The README's first hour, run as written: the run parts of the two set-up commands and every command of
"Your first hour", in a fresh copy of the checkout, on the demo data; then every command of "Your own
data" (the demo's scenes written as a user's data, pre-tokenised from each input format) in that checkout.

ARRA_DS_MAX_STEPS shortens training (launch/train.py); nothing else differs from what a user types. A
README edit that breaks a command fails here. Also checked on what the commands leave behind: the
run's pictures and data record, generation at the trained size with no size argument, the
evaluation report, the export loading in stock ``transformers`` with the logits of our model, and a
console without warnings other than the documented third-party ones (``arra_ds/warnings.py``).

Two commands are not run as a user runs them: ``tensorboard`` (a server) is started, checked to
serve and stopped; ``python -m pytest`` (the suite this test is part of) is run with ``--collect-only``.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from arra_ds import warnings as known_warnings
from arra_ds.checkpoints import RUN_DATA_FILE, load_trained_backbone

pytestmark = pytest.mark.slow

SETUP_SECTION = "## Two commands"
FIRST_HOUR_SECTION = "## Your first hour"
OWN_DATA_SECTION = "## Your own data"
OWN_DATA_SCENES = 64  # launch/demo_data.py's num_samples default
# "Your own data": the data set each pre-tokenization command writes, and the input format it reads
OWN_DATA_SETS = {"my_data/mds_table": "table", "my_data/mds_pairs": "pairs", "my_data/mds_shards": "webdataset",
                 "my_data/mds_conversations": "conversation"}  # fmt: skip
SHORT_RUN_STEPS = 4  # ARRA_DS_MAX_STEPS: the in-training grid still runs (at the last step)
COMMAND_TIMEOUT_S = 1200
TENSORBOARD_START_S = 120
WARNING_LINE = re.compile("warn|deprecat", re.IGNORECASE)  # "Warning", "warn", "warnings", "is deprecated" ...


def section(text: str, title: str) -> str:
    start = text.index(title + "\n")
    end = text.find("\n## ", start + len(title))
    return text[start : end if end >= 0 else len(text)]


def code_commands(markdown: str) -> list[str]:
    """Indented code blocks (4+ spaces, after a blank line; list prose is indented 3), one command per
    line, ``\\`` continuations joined."""
    commands, previous_blank, in_code = [], True, False
    for line in markdown.splitlines():
        indented = len(line) - len(line.lstrip(" ")) >= 4 and line.strip()
        in_code = bool(indented and (previous_blank or in_code))
        if in_code:
            if commands and commands[-1].endswith("\\"):
                commands[-1] = commands[-1][:-1].rstrip() + " " + line.strip()
            else:
                commands.append(line.strip())
        previous_blank = not line.strip()
    return commands


def readme_walk() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    setup = [command.split("&&")[-1].strip() for command in code_commands(section(text, SETUP_SECTION))]
    assert len(setup) == 2, f"the README must keep exactly two set-up commands, found {setup}"
    first_hour = code_commands(section(text, FIRST_HOUR_SECTION))
    assert len(first_hour) >= 5, first_hour
    return [setup[0], *first_hour, setup[1]]


def own_data_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return code_commands(section(text, OWN_DATA_SECTION))


def fresh_checkout(dest: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files (what a clone plus the work in progress
    holds), symlinks kept (arra_ds/kernels)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = REPO_ROOT / rel
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    return dest


def walk_env(cache: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)  # the copy's launchers put the copy first; nothing of this checkout leaks in
    env.update(ARRA_DS_MAX_STEPS=str(SHORT_RUN_STEPS), ARRA_DS_CACHE=str(cache), CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def serve_tensorboard(command: str, cwd: Path, env: dict) -> str:
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + TENSORBOARD_START_S
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"TensorBoard \S+ at http://", line) or time.monotonic() > deadline:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    output = "".join(lines)
    assert re.search(r"TensorBoard \S+ at http://", output), f"{command} did not start serving:\n{output[-3000:]}"
    return output


def run_as_written(command: str, checkout: Path, env: dict) -> str:
    """One README command in the checkout, as a user's shell runs it; its console output."""
    run = f"{command} --collect-only -q" if command == "python -m pytest" else command
    proc = subprocess.run(["bash", "-c", run], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"README command failed ({proc.returncode}): {command}\n{output[-5000:]}"
    return output


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    checkout = fresh_checkout(root / "checkout")
    env = walk_env(root / "cache")
    outputs = {}
    for command in readme_walk():
        if command.startswith("tensorboard "):
            outputs[command] = serve_tensorboard(command, checkout, env)
            continue
        outputs[command] = run_as_written(command, checkout, env)
    return checkout, outputs


@pytest.fixture(scope="module")
def own_data(walk):
    """"Your own data" after the walk, in its checkout and cache (the demo's models are built by then)."""
    checkout, _ = walk
    env = walk_env(checkout.parent / "cache")
    return checkout, {command: run_as_written(command, checkout, env) for command in own_data_commands()}


def command_starting(outputs: dict, prefix: str) -> list[str]:
    return [c for c in outputs if c.startswith(prefix)]


def test_the_walk_is_train_watch_generate_evaluate_export_load():
    walk = readme_walk()
    kinds = ["deepspeed launch/train.py", "tensorboard", "python launch/generate.py", "torchrun", "python launch/export_hf.py",
             "python -c", "python launch/generate.py", "python -m pytest"]
    assert len(walk) == len(kinds) and all(c.startswith(k) for c, k in zip(walk, kinds)), walk


def test_own_data_writes_the_scenes_then_checks_them_then_reads_every_input_format():
    commands = own_data_commands()
    assert commands[0].startswith("python launch/demo_data.py") and "validate=true" in commands[1], commands
    assert [c.split("out_dir=")[1].split()[0] for c in commands[2:]] == list(OWN_DATA_SETS), commands


def test_own_data_in_every_format_becomes_the_same_samples(own_data):
    from streaming import StreamingDataset

    checkout, outputs = own_data
    dry_run = outputs[own_data_commands()[1]]
    assert f"would write {OWN_DATA_SCENES} samples" in dry_run and "skip 0" in dry_run and "tokens per sample" in dry_run
    assert not (checkout / "my_data" / "mds").exists()  # the dry run wrote nothing
    captions = None
    for out_dir, input_format in OWN_DATA_SETS.items():
        report = json.loads((checkout / out_dir / "report.json").read_text())
        assert (report["input_format"], report["written"], report["skipped"]) == (input_format, OWN_DATA_SCENES, 0)
        dataset = StreamingDataset(local=str(checkout / out_dir), shuffle=False, batch_size=1)
        found = sorted(dataset[i]["caption"] for i in range(len(dataset)))
        captions = captions or found
        assert found == captions and len(set(found)) > 1, out_dir
    unexplained = [(command.split()[:2], line) for command, output in outputs.items()
                   for line in output.replace("\r", "\n").splitlines()
                   if WARNING_LINE.search(line) and not known_warnings.is_known(line)]  # fmt: skip
    assert not unexplained, unexplained


def test_the_run_has_its_pictures_and_data_record(walk):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    checkout, _ = walk
    run = checkout / "runs" / "debug"
    record = json.loads((run / RUN_DATA_FILE).read_text())
    assert (record["code_height"], record["code_width"]) == (8, 8) and record["heldout_prompts"]
    assert Image.open(run / "samples.png").size[0] > 4 * 128  # a grid of 16 images of 128 px
    prompts = (run / "samples.txt").read_text().splitlines()  # the grid's prompts, tile by tile (also under each tile)
    assert len(prompts) == 16 and all(line.split("\t")[1].strip() for line in prompts)
    assert (run / "assets" / "assets.json").is_file()  # what inference needs from outside the run
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("eval/samples")] == [SHORT_RUN_STEPS]


def test_generation_needs_no_size_and_draws_the_trained_size(walk):
    checkout, _ = walk
    for images in (checkout / "runs" / "generate" / "images", checkout / "out" / "from_export" / "images"):
        files = sorted(images.glob("*.png"))
        assert files and all(Image.open(f).size == (128, 128) for f in files), images


def test_eval_of_the_demo_run_reports_every_metric(walk):
    checkout, _ = walk
    report = json.loads((checkout / "runs" / "debug" / "evaluation" / f"step_{SHORT_RUN_STEPS:08d}" / "report.json").read_text())
    assert report["world_size"] == 2 and report["num_prompts"] == 64 and report["prompts"]["kind"] == "mds"
    metrics = report["metrics"]
    for name in ("fid_thumbnail", "ms_ssim_paired", "clip_score"):
        assert metrics[name] is not None and np.isfinite(metrics[name]), (name, metrics)
    assert report["clip"]["truncated_prompts"] == 0


def test_the_console_shows_no_warning_but_the_documented_ones(walk):
    _, outputs = walk
    ours = [c for c in outputs if not c.startswith(("tensorboard", "python -m pytest"))]
    unexplained = [
        (command.split()[0:2], line)
        for command in ours
        for line in outputs[command].replace("\r", "\n").splitlines()
        if WARNING_LINE.search(line) and not known_warnings.is_known(line)
    ]
    assert not unexplained, unexplained
    load = command_starting(outputs, "python -c")[0]
    assert "not initialized" not in outputs[load] and outputs[load].strip().isdigit()


def test_the_export_gives_the_logits_of_our_model(walk):
    """Stock transformers on the bf16 export vs our loader on the checkpoint, weights rounded to bf16 alike."""
    from transformers import ChameleonForConditionalGeneration

    checkout, _ = walk
    stock = ChameleonForConditionalGeneration.from_pretrained(checkout / "out" / "debug_hf").eval()
    ours, vocab, _ = load_trained_backbone(checkout / "runs" / "debug", torch.float32, "cpu")
    with torch.no_grad():
        for param in ours.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    generator = torch.Generator().manual_seed(0)
    words = [vocab.id(w) for w in "a large red circle at the top left on a black background".split()]
    codes = vocab.image_token_ids[torch.randint(len(vocab.image_token_ids), (12,), generator=generator)].tolist()
    sequences = torch.tensor([[vocab.bos_id, *words, vocab.end_of_turn_id, vocab.image_start_id, *codes[: len(words) - 1]]])
    with torch.no_grad():
        our_logits = ours.lm_head(ours.model(input_ids=sequences).last_hidden_state)
        stock_hidden = stock.model(input_ids=sequences).last_hidden_state
        stock_logits = stock.lm_head(stock_hidden)
        masked = stock(input_ids=sequences).logits  # stock forward: image-token columns masked
    torch.testing.assert_close(stock_logits, our_logits, rtol=1e-5, atol=1e-5)
    text_columns = torch.ones(masked.shape[-1], dtype=torch.bool)
    text_columns[vocab.image_token_ids] = False
    torch.testing.assert_close(masked[..., text_columns], our_logits[..., text_columns], rtol=1e-5, atol=1e-5)
