"""Export a training checkpoint in its backbone's released format (backbone only, projector dropped).

    python launch/export_hf.py runs/debug out/debug_hf [--dtype bf16] [--base_model DIR] [--adapter_only]

CHECKPOINT is a run directory, its checkpoints/ directory (both: the latest checkpoint) or one
checkpoints/step_<n> directory. Only the model section of the run's config.yaml is read, so the
training data need not be there. A Chameleon-family run becomes a Hugging Face directory that loads with
``ChameleonForConditionalGeneration.from_pretrained(OUT)``; a LlamaGen run an upstream-layout ``OUT/c2i.pt``.
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
    parser.add_argument("out", help="output directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights dtype of the export")
    parser.add_argument("--base_model", default="", help="the base checkpoint directory, if it moved since training "
                        "(the run recorded its untrained tensors, e.g. Chameleon's VQ encoder, by hash)")
    parser.add_argument("--adapter_only", action="store_true", help="a LoRA run: write the adapter alone (peft format) "
                        "instead of the merged model")
    args = parse_args(parser, argv)

    def work():
        summary = export_hf(args.checkpoint, args.out, DTYPES[args.dtype], args.base_model, args.adapter_only)
        print(json.dumps(summary, indent=2))
        print(f"exported {summary['checkpoint']} (step {summary['step']}) to {args.out}")

    return run_launcher(work)


if __name__ == "__main__":
    sys.exit(main())
