"""Generate images for a list of prompts and write them as PNG files.

    python launch/generate.py model=<trainer checkpoint | HF dir> vqgan_config=vqgan.yaml \
        vqgan_checkpoint=vqgan.ckpt --prompt "PA view chest x-ray image, ..." output_dir=out
    torchrun --nproc_per_node=4 launch/generate.py model=... prompts=prompts.txt samples_per_prompt=4 ...

Keys are the fields of arra_ds.generate.pipeline.GenerateConfig (sampling.* for the sampler:
guidance_scale, image_top_k, text_top_k, temperature, height, width, seed). Re-running with the
same output_dir only generates the missing images.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds.cli import run_launcher  # noqa: E402
from arra_ds.config import load_dataclass_config  # noqa: E402
from arra_ds.generate.pipeline import GenerateConfig, run_generate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML with GenerateConfig fields")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); instead of prompts=<file>")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. model=runs/x sampling.guidance_scale=3")
    args = parser.parse_args()

    def work():
        cfg = load_dataclass_config(GenerateConfig, args.config, args.overrides)
        cfg.prompt_texts += args.prompt
        run_generate(cfg)

    return run_launcher(work, bad_input=(FileNotFoundError, ValueError))  # ValueError includes ConfigError


if __name__ == "__main__":
    sys.exit(main())
