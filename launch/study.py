"""Does ARRA help? Train next-token-only and ARRA arms from the same seeds on drawn scenes, evaluate
them on held-out prompts, and write a report (report.md, report.json, curves.png, samples.png).

    python launch/study.py [--config configs/studies/demo_arra.yaml] [profile=cpu|smoke|gpu] [key=value ...]

Without --config the study file configs/studies/demo_arra.yaml is used. Running the same command
again resumes an interrupted study. Exit codes: 0 done, 2 bad settings or failed runs (named, with
their logs). See docs/study.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds.cli import launcher_parser, parse_args, run_launcher  # noqa: E402
from arra_ds.study.config import StudyConfig, load_study_config  # noqa: E402
from arra_ds.study.pipeline import run_study  # noqa: E402


def main(argv=None) -> int:
    parser = launcher_parser(__doc__, StudyConfig, config_help="study file (default: configs/studies/demo_arra.yaml)")
    args = parse_args(parser, argv)
    return run_launcher(lambda: run_study(load_study_config(args.config, args.overrides)))


if __name__ == "__main__":
    sys.exit(main())
