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

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds.config import ConfigError, apply_overrides, from_dict  # noqa: E402
from arra_ds.generate.pipeline import GenerateConfig, run_generate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML with GenerateConfig fields")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); instead of prompts=<file>")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. model=runs/x sampling.guidance_scale=3")
    args = parser.parse_args()
    try:
        data = (yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else {}
        cfg = from_dict(GenerateConfig, apply_overrides(data, args.overrides))
        cfg.prompt_texts += args.prompt
        run_generate(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
