"""Export a training checkpoint as a Hugging Face Chameleon model (backbone only, projector dropped).

    python launch/export_hf.py runs/debug out/debug_hf [--dtype bf16] [--config runs/debug/config.yaml]

CHECKPOINT is a run directory, its checkpoints/ directory (both: the latest checkpoint) or one
checkpoints/step_<n> directory. The result loads with
``ChameleonForConditionalGeneration.from_pretrained(OUT)``.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from arra_ds.config import ConfigError, load_config  # noqa: E402
from arra_ds.train.checkpoint import CheckpointError  # noqa: E402
from arra_ds.train.export import export_hf  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or a checkpoints/step_<n> dir")
    parser.add_argument("out", help="output directory (Hugging Face format)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights dtype of the export")
    parser.add_argument("--config", default=None, help="run config the checkpoint was trained with (default: the run's config.yaml)")
    args = parser.parse_args()
    try:
        run_config = load_config(args.config) if args.config else None
        summary = export_hf(args.checkpoint, args.out, DTYPES[args.dtype], run_config)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(summary, indent=2))
    print(f"exported {summary['checkpoint']} (step {summary['step']}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
