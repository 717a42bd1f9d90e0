"""Evaluate a class-conditional model (ARRA-Base / LlamaGen): N samples per class on all ranks, FID and Inception Score.

    torchrun --nproc_per_node=8 launch/eval_c2i.py model=runs/llamagen_b_arra_base \
        vq_ckpt=ckpts/vq_ds16_c2i.pt reference_stats=ckpts/VIRTUAL_imagenet256_labeled.npz \
        samples_per_class=50 sampling.cfg_scale=2.0 output_dir=runs/llamagen_b_arra_base/eval

model= is a trainer checkpoint (run dir, checkpoints/ or checkpoints/step_<n>) of a model.source=llamagen run,
or an upstream LlamaGen c2i file (c2i_B_256.pt; its sizes from llamagen.size=B ...). Keys are the fields of
ClassEvalConfig (listed below). Re-running with the same output_dir resumes: existing images are kept.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds.cli import launcher_parser, parse_args, run_launcher  # noqa: E402
from arra_ds.config import load_dataclass_config  # noqa: E402
from arra_ds.eval.c2i import ClassEvalConfig, run_class_eval  # noqa: E402


def main(argv=None) -> int:
    args = parse_args(launcher_parser(__doc__, ClassEvalConfig), argv)
    return run_launcher(lambda: run_class_eval(load_dataclass_config(ClassEvalConfig, args.config, args.overrides)))


if __name__ == "__main__":
    sys.exit(main())
