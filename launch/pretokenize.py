"""Pre-tokenise text-image pairs into MDS shards (tokens + encoder features).

    python launch/pretokenize.py input=train.json out_dir=mds/train \
        tokenizer=ckpts/chameleon/tokenizer/text_tokenizer.json \
        vqgan_yaml=ckpts/chameleon/tokenizer/vqgan.yaml vqgan_ckpt=ckpts/chameleon/tokenizer/vqgan.ckpt \
        encoders=[biomedclip=/models/BiomedCLIP,medsam=/models/medsam-vit-base] \
        image.target_size=512 image.crop=square num_procs=8 num_workers=8

input (input_format=auto picks from it; set input_format to choose):
  conversation  train.json: the ARRA / Lumina-mGPT conversation JSON
  table         captions.jsonl / .csv / .tsv / .parquet: one row per image, table.image_column (an image
                path, relative to the table's folder) and table.text_column (the prompt)
  pairs         a folder of images with a caption file beside each: cat.jpg + cat.txt (recursive)
  webdataset    tar shards with <key>.jpg|jpeg|png|webp + <key>.txt members: a .tar file, a folder of
                them, a glob ("shards/*.tar") or a brace list ("shards/train-{000000..000099}.tar")

validate=true: a dry run. Reads and checks every item (images opened, text tokenised), prints counts,
an image-size histogram, what would be skipped and why, tokens per sample and the disk the shards
would take, and writes nothing; it needs no VQGAN or encoder weights.

Keys are the fields of PretokenizeConfig (listed below); --config takes them from a YAML file
(configs/pretokenize_arra512.yaml: the 7B recipes' square 512 x 512 centre crop).
Rerun the same command to resume. With an external launcher (slurm), pass rank= and world_size= per
process, then run once more without them to merge the index and write the report.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds import warnings as known_warnings  # noqa: E402

known_warnings.install()  # before the imports below: DeepSpeed logs while it is imported

from arra_ds.cli import launcher_parser, parse_args, run_launcher  # noqa: E402
from arra_ds.config import load_dataclass_config, parse_override  # noqa: E402
from arra_ds.data.pretokenize import (  # noqa: E402
    PretokenizeConfig,
    format_dry_run,
    format_summary,
    run_pretokenize,
    validate_pretokenize,
)
from arra_ds.errors import ConfigError  # noqa: E402

DRY_RUN_KEY = "validate"  # a launcher key, not a config field: every config's validate() is its check


def split_dry_run(overrides: list[str]) -> tuple[bool, list[str]]:
    """(validate=true given, the other overrides)."""
    dry_run, rest = False, []
    for text in overrides:
        if text.split("=", 1)[0].strip() != DRY_RUN_KEY:
            rest.append(text)
            continue
        value = parse_override(text)[1]
        if not isinstance(value, bool):
            raise ConfigError(f"{text!r}: {DRY_RUN_KEY} is true (dry run, nothing written) or false")
        dry_run = value
    return dry_run, rest


def main(argv=None) -> int:
    args = parse_args(launcher_parser(__doc__, PretokenizeConfig), argv)

    def work():
        dry_run, overrides = split_dry_run(args.overrides)
        cfg = load_dataclass_config(PretokenizeConfig, args.config, overrides)
        if dry_run:
            print(format_dry_run(validate_pretokenize(cfg)), flush=True)
        else:
            print(format_summary(run_pretokenize(cfg), cfg.rank), flush=True)

    return run_launcher(work)


if __name__ == "__main__":
    sys.exit(main())
