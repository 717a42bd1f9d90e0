"""Reference statistics for FID from real images: <output_dir>/<extractor>.npz per extractor.

    torchrun --nproc_per_node=4 launch/fid_stats.py source=data/mimic_test_images extractors=[xrv,inception] \
        height=512 width=512 output_dir=stats/mimic_test
    # an MDS split (its images are VQ codes: decoded with the VQGAN, tokens read with the model's vocabulary)
    python launch/fid_stats.py source=data/mds/test model=runs/x vqgan_config=vqgan.yaml vqgan_checkpoint=vqgan.ckpt

The files carry the extractor name and weights hash; launch/eval.py refuses them for other weights
(pass them as reference_stats={xrv: stats/mimic_test/xrv.npz}).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds import warnings as known_warnings  # noqa: E402

known_warnings.install()  # before the imports below: DeepSpeed logs while it is imported

from arra_ds.cli import launcher_parser, parse_args, run_launcher  # noqa: E402
from arra_ds.config import load_dataclass_config  # noqa: E402
from arra_ds.eval.reference import ReferenceStatsConfig, write_reference_stats  # noqa: E402


def main(argv=None) -> int:
    args = parse_args(launcher_parser(__doc__, ReferenceStatsConfig), argv)
    return run_launcher(
        lambda: write_reference_stats(load_dataclass_config(ReferenceStatsConfig, args.config, args.overrides))
    )


if __name__ == "__main__":
    sys.exit(main())
