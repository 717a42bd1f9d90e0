"""What do I need? The per-GPU memory of a training run, by part, planned before launch.

    python launch/plan.py --config configs/lumina7b_arra_adapt.yaml model.path=/path/to/Lumina-mGPT-7B-512 \
        gpus=8 gpu_memory_gb=80 [--ds_config ds_configs/zero3.json] [key=value ...] [--json]

Any run-config key (python launch/train.py --help) changes the plan as it would change the run, e.g.
model.trainable=lora, train.micro_batch_size=1, model.activation_checkpointing=false, data.max_seq_len=2048;
the keys below are the planner's own. model.path needs only the checkpoint's config.json (no weights are
read). Prints parameters, gradients, optimizer states, activations, LM-loss buffers, the alignment head,
ZeRO buffers and the CUDA overhead per GPU, then "fits: ..." or "does not fit: ... try ..." with the single
changes that would fit. --json prints the same as one JSON object.

Exit codes: 0 fits, 1 does not fit (so scripts can branch on it; the plan is printed either way),
2 bad config / key / file.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds import warnings as known_warnings  # noqa: E402

known_warnings.install()  # before the imports below: DeepSpeed logs while it is imported

from arra_ds.cli import launcher_parser, parse_args, run_launcher  # noqa: E402
from arra_ds.train.plan import DEFAULT_DS_CONFIG, PlanConfig, plan_run  # noqa: E402

DOES_NOT_FIT_EXIT_CODE = 1


def main(argv=None) -> int:
    parser = launcher_parser(__doc__, PlanConfig, config_help="run config YAML (default: configs/debug.yaml)")
    parser.add_argument("--ds_config", default=DEFAULT_DS_CONFIG, help="DeepSpeed JSON the run would use")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    args = parse_args(parser, argv)

    def work() -> int:
        plan = plan_run(args.config, args.overrides, args.ds_config)
        print(json.dumps(plan.as_dict(), indent=1) if args.json else plan.render(), flush=True)
        return 0 if plan.fits else DOES_NOT_FIT_EXIT_CODE

    return run_launcher(work)


if __name__ == "__main__":
    sys.exit(main())
