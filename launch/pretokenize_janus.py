"""Pre-tokenise a conversation JSON into MDS shards in Janus-Pro's layout (model.source=janus).

    python launch/pretokenize_janus.py input=train.json out_dir=data/janus_mds model=checkpoints/Janus-Pro-1B \
        encoders=[biomedclip=/models/BiomedCLIP] num_procs=8 num_workers=8

Each sample: BOS <|User|>: {prompt}\\n\\n<|Assistant|>: <begin_of_image> and the 24 x 24 codes of the image's
384 x 384 centre crop (image_size=0: the size the model draws; Janus's VQ tokenizer, written once to
<out_dir>/janus_vq.pt), and feat_<encoder> of the crop. Keys are the fields of JanusPretokenizeConfig (listed
below); --config takes them from a YAML file.
Rerun the same command to resume; skipped items are listed in <out_dir>/report.json.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds import warnings as known_warnings  # noqa: E402

known_warnings.install()  # before the imports below: DeepSpeed logs while it is imported

from arra_ds.cli import launcher_parser, parse_args, run_launcher  # noqa: E402
from arra_ds.config import load_dataclass_config  # noqa: E402
from arra_ds.data.pretokenize import JanusPretokenizeConfig, format_summary, run_pretokenize_janus  # noqa: E402


def main(argv=None) -> int:
    args = parse_args(launcher_parser(__doc__, JanusPretokenizeConfig), argv)

    def work():
        cfg = load_dataclass_config(JanusPretokenizeConfig, args.config, args.overrides)
        print(format_summary(run_pretokenize_janus(cfg), cfg.rank), flush=True)

    return run_launcher(work)


if __name__ == "__main__":
    sys.exit(main())
