"""Train with ARRA on DeepSpeed.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json [--config configs/X.yaml] [key=value ...]

Without --config the embedded default (configs/debug.yaml: tiny Chameleon, built-in demo data) runs.
Exit codes: 0 done, 2 bad config/data/checkpoint, 3 non-finite loss, 75 preempted (checkpoint
written; requeue and run again with train.resume=auto).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds.config import ConfigError, load_config  # noqa: E402
from arra_ds.data.schema import SchemaError  # noqa: E402
from arra_ds.train.checkpoint import CheckpointError  # noqa: E402
from arra_ds.train.engine import DSConfigError  # noqa: E402
from arra_ds.train.loop import NonFiniteLossError, run_training  # noqa: E402
from arra_ds.train.preemption import REQUEUE_EXIT_CODE  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ds_config", default="ds_configs/zero3.json", help="DeepSpeed JSON (auto fields are filled)")
    parser.add_argument("--config", default=None, help="run config YAML (default: configs/debug.yaml)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=20 align.layer=2")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        summary = run_training(cfg, args.ds_config)
    except (ConfigError, DSConfigError, SchemaError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    return REQUEUE_EXIT_CODE if summary["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main())
