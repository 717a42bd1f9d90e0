"""Evaluate a checkpoint: generate images for the test prompts on all ranks, then FID / MS-SSIM / CLIP-Score.

    torchrun --nproc_per_node=4 launch/eval.py [--config eval.yaml] key=value ...

    torchrun --nproc_per_node=8 launch/eval.py model=runs/mimic/checkpoints/step_00020000 \
        prompts=data/mimic_test.json vqgan_config=ckpts/vqgan.yaml vqgan_checkpoint=ckpts/vqgan.ckpt \
        extractors=[xrv,inception] clip_model=biomedclip samples_per_prompt=1 output_dir=runs/mimic/eval

Keys are the fields of arra_ds.eval.runner.EvalConfig (sampling.* for the sampler). Re-running with
the same output_dir resumes: existing images are kept, only missing ones are generated.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds.cli import run_launcher  # noqa: E402
from arra_ds.config import load_dataclass_config  # noqa: E402
from arra_ds.eval.fid import StatsMismatchError  # noqa: E402
from arra_ds.eval.runner import EvalConfig, run_eval  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML with EvalConfig fields")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. model=runs/x sampling.guidance_scale=3")
    args = parser.parse_args()
    return run_launcher(
        lambda: run_eval(load_dataclass_config(EvalConfig, args.config, args.overrides)),
        bad_input=(StatsMismatchError, FileNotFoundError, ValueError),  # ValueError includes ConfigError
    )


if __name__ == "__main__":
    sys.exit(main())
