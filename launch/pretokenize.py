"""Pre-tokenise a conversation JSON into MDS shards (tokens + encoder features).

    python launch/pretokenize.py --input train.json --out-dir mds/train \
        --tokenizer ckpts/chameleon/tokenizer/text_tokenizer.json \
        --vqgan-yaml ckpts/chameleon/tokenizer/vqgan.yaml --vqgan-ckpt ckpts/chameleon/tokenizer/vqgan.ckpt \
        --encoder biomedclip=/models/BiomedCLIP --encoder medsam=/models/medsam-vit-base \
        --target-size 512 --num-procs 8 --num-workers 8

Rerun the same command to resume. With an external launcher (slurm), pass --rank/--world-size per
process, then run once more without them to merge the index and write the report.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from arra_ds.config import ConfigError  # noqa: E402
from arra_ds.data.features import parse_encoder_arg  # noqa: E402
from arra_ds.data.images import ImagePreprocessConfig  # noqa: E402
from arra_ds.data.pretokenize import PretokenizeConfig, PretokenizeError, format_summary, run_pretokenize  # noqa: E402
from arra_ds.model.vqgan import VQGANError  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="conversation JSON (list of items)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--tokenizer", required=True, help="Chameleon text_tokenizer.json")
    p.add_argument("--vqgan-yaml", default="", help="original Chameleon vqgan.yaml (with --vqgan-ckpt)")
    p.add_argument("--vqgan-ckpt", default="")
    p.add_argument("--vqgan-hf", default="", help="or: a Hugging Face Chameleon checkpoint dir (encoder only)")
    p.add_argument("--encoder", action="append", default=[], help="NAME[:cls|avgpool|concat][=PATH]; repeatable")
    p.add_argument("--target-size", type=int, default=512, help="crop area budget as in the reference (512 -> 32x32 codes)")
    p.add_argument("--crop", choices=["var", "square"], default="var")
    p.add_argument("--image-root", default="", help="base of relative image paths (default: the JSON's dir)")
    p.add_argument("--min-image-size", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--num-procs", type=int, default=1, help="local processes (one per GPU, or CPU processes)")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--items-per-part", type=int, default=2048)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--channels-last", action="store_true", help="NHWC VQGAN convs (faster)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    try:
        cfg = PretokenizeConfig(
            input=a.input, out_dir=a.out_dir, tokenizer=a.tokenizer, vqgan_yaml=a.vqgan_yaml, vqgan_ckpt=a.vqgan_ckpt,
            vqgan_hf=a.vqgan_hf, encoders=[parse_encoder_arg(e) for e in a.encoder],
            image=ImagePreprocessConfig(target_size=a.target_size, crop=a.crop), image_root=a.image_root,
            min_image_size=a.min_image_size, max_seq_len=a.max_seq_len, batch_size=a.batch_size,
            num_workers=a.num_workers, num_procs=a.num_procs, rank=a.rank, world_size=a.world_size,
            items_per_part=a.items_per_part, device=a.device, dtype=a.dtype, channels_last=a.channels_last,
            progress=not a.no_progress,
        )
        summary = run_pretokenize(cfg)
    except (ConfigError, PretokenizeError, VQGANError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if summary is None:
        print(f"rank {a.rank}: its parts are done; run once more without --rank/--world-size to merge", flush=True)
    else:
        print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
