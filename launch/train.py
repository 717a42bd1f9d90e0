"""Train with ARRA on DeepSpeed.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json [--config configs/X.yaml] [key=value ...]
    torchrun --nproc_per_node=2 launch/train.py --ds_config ds_configs/zero3.json [key=value ...]
    python launch/train.py --ds_config ds_configs/zero3.json     (one process, no launcher)

Without --config the embedded default (configs/debug.yaml: tiny Chameleon, built-in demo data) runs.
Options and key=value overrides go in any order. ARRA_DS_MAX_STEPS=<n> in the environment sets
train.max_steps=<n> (smoke runs of the documented commands). Exit codes: 0 done, 2 bad config/data/checkpoint,
3 non-finite loss, 75 preempted (checkpoint written; run again with train.resume=auto).
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds import warnings as known_warnings  # noqa: E402

known_warnings.install()  # before the imports below: DeepSpeed logs while it is imported

from arra_ds.cli import launcher_parser, parse_args, run_launcher  # noqa: E402
from arra_ds.train.trainer import run_training  # noqa: E402
from arra_ds.train.preemption import REQUEUE_EXIT_CODE  # noqa: E402
from arra_ds.train.run_config import RunConfig, load_run_config  # noqa: E402

# Shortens training (train.max_steps) and changes nothing else: how tests/test_readme.py runs the README's
# commands exactly as written.
MAX_STEPS_ENV = "ARRA_DS_MAX_STEPS"


def main(argv=None) -> int:
    parser = launcher_parser(__doc__, RunConfig, config_help="run config YAML (default: configs/debug.yaml)")
    parser.add_argument("--ds_config", default="ds_configs/zero3.json", help="DeepSpeed JSON (auto fields are filled)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = parse_args(parser, argv)
    overrides = list(args.overrides)
    if os.environ.get(MAX_STEPS_ENV):  # after the user's keys: it wins
        overrides.append(f"train.max_steps={os.environ[MAX_STEPS_ENV]}")

    def work() -> int:
        summary = run_training(load_run_config(args.config, overrides), args.ds_config)
        return REQUEUE_EXIT_CODE if summary["preempted"] else 0

    return run_launcher(work)


if __name__ == "__main__":
    sys.exit(main())
