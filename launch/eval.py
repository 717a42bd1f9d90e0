"""Evaluate a checkpoint: generate images for the test prompts on all ranks, then FID / MS-SSIM / CLIP-Score.

    torchrun --nproc_per_node=4 launch/eval.py [--config eval.yaml] key=value ...

    torchrun --nproc_per_node=8 launch/eval.py model=runs/mimic/checkpoints/step_00020000 \
        prompts=data/mimic_test.json vqgan_config=ckpts/vqgan.yaml vqgan_checkpoint=ckpts/vqgan.ckpt \
        extractors=[xrv,inception] clip_model=biomedclip samples_per_prompt=1 output_dir=runs/mimic/eval

    torchrun --nproc_per_node=2 launch/eval.py model=runs/debug     # a demo run: nothing else needed

Keys are the fields of EvalConfig (listed below: every generation key plus the metrics). What is left
out comes from the run's data record (arra_data.json): VQGAN, size, held-out prompts, extractors, CLIP.
Re-running with the same output_dir resumes: existing images are kept, only missing ones are generated.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds import warnings as known_warnings  # noqa: E402

known_warnings.install()  # before the imports below: DeepSpeed logs while it is imported

from arra_ds.cli import launcher_parser, parse_args, run_launcher  # noqa: E402
from arra_ds.config import load_dataclass_config  # noqa: E402
from arra_ds.eval.runner import EvalConfig, run_eval  # noqa: E402


def main(argv=None) -> int:
    args = parse_args(launcher_parser(__doc__, EvalConfig), argv)
    return run_launcher(lambda: run_eval(load_dataclass_config(EvalConfig, args.config, args.overrides)))


if __name__ == "__main__":
    sys.exit(main())
