"""Export a training checkpoint as a Hugging Face Chameleon model (backbone only, projector dropped).

    python launch/export_hf.py runs/debug out/debug_hf [--dtype bf16]

CHECKPOINT is a run directory, its checkpoints/ directory (both: the latest checkpoint) or one
checkpoints/step_<n> directory. Only the model section of the run's config.yaml is read, so the
training data need not be there. The result loads with
``ChameleonForConditionalGeneration.from_pretrained(OUT)``.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds import warnings as known_warnings  # noqa: E402

known_warnings.install()  # before the imports below: DeepSpeed logs while it is imported

from arra_ds.cli import parse_args, run_launcher  # noqa: E402
from arra_ds.distributed import DTYPES  # noqa: E402
from arra_ds.train.export import export_hf  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or a checkpoints/step_<n> dir")
    parser.add_argument("out", help="output directory (Hugging Face format)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights dtype of the export")
    args = parse_args(parser, argv)

    def work():
        summary = export_hf(args.checkpoint, args.out, DTYPES[args.dtype])
        print(json.dumps(summary, indent=2))
        print(f"exported {summary['checkpoint']} (step {summary['step']}) to {args.out}")

    return run_launcher(work)


if __name__ == "__main__":
    sys.exit(main())
