"""Pre-tokenise a conversation JSON into MDS shards (tokens + encoder features).

    python launch/pretokenize.py input=train.json out_dir=mds/train \
        tokenizer=ckpts/chameleon/tokenizer/text_tokenizer.json \
        vqgan_yaml=ckpts/chameleon/tokenizer/vqgan.yaml vqgan_ckpt=ckpts/chameleon/tokenizer/vqgan.ckpt \
        encoders=[biomedclip=/models/BiomedCLIP,medsam=/models/medsam-vit-base] \
        image.target_size=512 image.crop=square num_procs=8 num_workers=8

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
from arra_ds.config import load_dataclass_config  # noqa: E402
from arra_ds.data.pretokenize import PretokenizeConfig, format_summary, run_pretokenize  # noqa: E402


def main(argv=None) -> int:
    args = parse_args(launcher_parser(__doc__, PretokenizeConfig), argv)

    def work():
        cfg = load_dataclass_config(PretokenizeConfig, args.config, args.overrides)
        summary = run_pretokenize(cfg)
        if summary is None:
            print(f"rank {cfg.rank}: its parts are done; run once more without rank/world_size to merge", flush=True)
        else:
            print(format_summary(summary), flush=True)

    return run_launcher(work)


if __name__ == "__main__":
    sys.exit(main())
