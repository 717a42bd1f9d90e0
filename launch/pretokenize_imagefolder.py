"""Pre-tokenise an ImageFolder tree (ImageNet layout) into class-to-image MDS shards (ARRA-Base / LlamaGen).

    python launch/pretokenize_imagefolder.py input=/data/imagenet/train out_dir=/data/imagenet256_mds \
        vq_ckpt=ckpts/vq_ds16_c2i.pt encoders=[clip_b16=/models/clip-vit-b16] \
        image_size=256 crops=center_flip num_procs=8 num_workers=8

Each sample: the VQ-16 codes of one crop, its class id (sorted folder names, or class_map=<file> with
one "<folder> [name]" per line), and feat_<encoder> of that crop. crops=center (ADM's centre crop),
center_flip (+ its mirror image, upstream's default) or ten_crop (crop_range=1.1). num_images=256233
subset_seed=0 draws the paper's ImageNet subset size. Keys are the fields of ImageFolderConfig (listed
below); --config takes them from a YAML file. Rerun the same command to resume; unreadable images are
skipped and listed in <out_dir>/report.json.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds.cli import launcher_parser, parse_args, run_launcher  # noqa: E402
from arra_ds.config import load_dataclass_config  # noqa: E402
from arra_ds.data.pretokenize import ImageFolderConfig, format_summary, run_pretokenize_imagefolder  # noqa: E402


def main(argv=None) -> int:
    args = parse_args(launcher_parser(__doc__, ImageFolderConfig), argv)

    def work():
        cfg = load_dataclass_config(ImageFolderConfig, args.config, args.overrides)
        summary = run_pretokenize_imagefolder(cfg)
        if summary is None:
            print(f"rank {cfg.rank}: its parts are done; run once more without rank/world_size to merge", flush=True)
        else:
            print(format_summary(summary), flush=True)

    return run_launcher(work)


if __name__ == "__main__":
    sys.exit(main())
