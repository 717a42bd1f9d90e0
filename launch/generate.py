"""Generate images for prompts and write them as PNG files.

    python launch/generate.py model=<trainer checkpoint | HF dir> --prompt "a red circle ..." [key=value ...]
    torchrun --nproc_per_node=4 launch/generate.py model=... prompts=prompts.txt samples_per_prompt=4 ...

Keys are the fields of GenerateConfig (listed below; sampling.* for the sampler). Options and
key=value overrides go in any order. The VQGAN files and the image size default to the run's data
record (arra_data.json, also in an export): a demo run needs only model= and a prompt. Re-running
with the same output_dir only generates the missing images (and those made with other settings).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds import warnings as known_warnings  # noqa: E402

known_warnings.install()  # before the imports below: DeepSpeed logs while it is imported

from arra_ds.cli import launcher_parser, parse_args, run_launcher  # noqa: E402
from arra_ds.config import load_dataclass_config  # noqa: E402
from arra_ds.generate.pipeline import GenerateConfig, run_generate  # noqa: E402


def main(argv=None) -> int:
    parser = launcher_parser(__doc__, GenerateConfig)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); instead of prompts=<file>")
    args = parse_args(parser, argv)

    def work():
        cfg = load_dataclass_config(GenerateConfig, args.config, args.overrides)
        cfg.prompt_texts += args.prompt
        run_generate(cfg)

    return run_launcher(work)


if __name__ == "__main__":
    sys.exit(main())
