"""Write the demo's drawn scenes as your own data would be, in every input format of launch/pretokenize.py,
with the demo's tiny models and a pre-tokenization config for them (README: "Your own data").

    python launch/demo_data.py out_dir=my_data

my_data/images/ (scene-00000.png + scene-00000.txt, ...), captions.jsonl, captions.csv,
conversations.json, shards/scenes-000000.tar ..., models/ and pretokenize.yaml. The models are the
ones the demo data set was pre-tokenised with (built first when the cache has none).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds import warnings as known_warnings  # noqa: E402

known_warnings.install()  # before the imports below: DeepSpeed logs while it is imported

from arra_ds.cli import launcher_parser, parse_args, run_launcher  # noqa: E402
from arra_ds.config import load_dataclass_config  # noqa: E402
from arra_ds.demo.own_data import OwnDataConfig, write_own_data  # noqa: E402


def main(argv=None) -> int:
    args = parse_args(launcher_parser(__doc__, OwnDataConfig), argv)

    def work():
        written = write_own_data(load_dataclass_config(OwnDataConfig, args.config, args.overrides))
        print(f"wrote {written['samples']} scenes to {written['out_dir']} as images + .txt pairs, captions.jsonl, "
              f"captions.csv, conversations.json and {written['shards']} WebDataset shards; models and "
              f"pretokenize.yaml for them in {written['out_dir']}", flush=True)

    return run_launcher(work)


if __name__ == "__main__":
    sys.exit(main())
