"""Pre-tokenization throughput: our batched pipeline vs a one-image-at-a-time loop like the reference.

    # CPU, tiny models (the numbers in bench/RESULTS.md):
    python bench/pretokenize.py --size tiny --num-images 256 --batch-size 64 --num-workers 1
    # GPU, real sizes: Chameleon-size VQGAN at 512 x 512 + an open_clip ViT-B/16 (random weights):
    python bench/pretokenize.py --size real --num-images 1024 --batch-size 32 --num-workers 8 --device cuda

Both paths run in the same process on the same machine with the same models and images:
- reference: what ARRA's scripts do. pre_tokenize_new.py: per item, open the image, crop, VQ-encode
  it alone, build the tokens, pickle one file per item and append a record line; then
  pre_biomedclip_feature.py / pre_medsam_feature.py: per encoder, per image, open it again,
  preprocess, encode it alone, torch.save one .pt per image.
- ours: ``run_pretokenize`` (DataLoader workers decode and preprocess, crop-size buckets, batched
  VQGAN and encoders, MDS shards).
Each path runs once on a few images first (warm-up), then (reference, ours) pairs are timed end to
end including model loading, interleaved. Prints median images/s and the median ratio; --out
writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arra_ds.data.features import EncoderSpec, build_tiny_open_clip_dir, build_tiny_sam_dir, load_encoder  # noqa: E402
from arra_ds.data.images import ImagePreprocessConfig, VQImagePreprocessor  # noqa: E402
from arra_ds.data.pretokenize import PretokenizeConfig, run_pretokenize  # noqa: E402
from arra_ds.tokens.conversation import ConversationTokenizer, load_text_tokenizer  # noqa: E402
from arra_ds.tokens.layout import IMAGE_PLACEHOLDER, image_to_tokens  # noqa: E402
from arra_ds.tokens.vocab import ChameleonVocab, build_debug_tokenizer  # noqa: E402
from arra_ds.tokens.vqgan import VQGAN, VQGANConfig  # noqa: E402
from bench.harness import timed  # noqa: E402

# --size: the VQGAN, its crop target and the source image sizes. "tiny" is the size of the test
# models (per-call overhead dominates on CPU), "small" a 128-px VQGAN with res blocks (convolution
# dominates), "real" Chameleon's VQGAN at 512 px with an open_clip ViT-B/16 (for a GPU).
SIZES = {
    "tiny": (VQGANConfig(n_embed=256, embed_dim=8, z_channels=16, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=0,
                         resolution=64), 64, [(96, 80), (80, 80), (112, 72), (75, 100)]),
    "small": (VQGANConfig(n_embed=1024, embed_dim=16, z_channels=32, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1,
                          resolution=128), 128, [(192, 160), (160, 160), (224, 144), (150, 200)]),
    "real": (VQGANConfig(), 512, [(640, 560), (600, 600), (800, 520), (560, 720)]),
}


def build_assets(root: Path, num_images: int, size: str) -> dict:
    """Models saved in their real on-disk formats + a conversation JSON of varied-size JPEGs."""
    torch.manual_seed(0)
    vq_cfg, target, sizes = SIZES[size]
    VQGAN(vq_cfg).save_original(root / "vqgan.yaml", root / "vqgan.ckpt")
    build_debug_tokenizer(num_image_codes=vq_cfg.n_embed).save(str(root / "text_tokenizer.json"))
    if size == "real":
        import open_clip
        from safetensors.torch import save_file

        model_cfg = open_clip.get_model_config("ViT-B-16")
        clip_dir = root / "clip"
        clip_dir.mkdir()
        model = open_clip.CLIP(**model_cfg)
        (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(clip_dir / "open_clip_model.safetensors"))
        encoders = [EncoderSpec("clip", "open_clip", path=str(clip_dir))]
    else:
        encoders = [
            EncoderSpec("clip", "open_clip", path=str(build_tiny_open_clip_dir(root / "clip"))),
            EncoderSpec("sam", "sam", path=str(build_tiny_sam_dir(root / "sam")), aggregation="avgpool"),
        ]
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    items = []
    for i in range(num_images):
        w, h = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h), Image.BILINEAR).save(root / "images" / f"{i:05d}.jpg", quality=90)
        items.append({"conversations": [{"from": "human", "value": f"a red circle number {i % 10}"},
                                        {"from": "gpt", "value": IMAGE_PLACEHOLDER}], "image": [f"images/{i:05d}.jpg"]})
    (root / "data.json").write_text(json.dumps(items))
    return {"root": root, "encoders": encoders, "target": target, "items": items}


def reference_loop(assets: dict, items: list, out: Path, device: str) -> None:
    """One image at a time, one output file per image, images read again for every encoder."""
    root = assets["root"]
    tokenizer = load_text_tokenizer(root / "text_tokenizer.json")
    vocab = ChameleonVocab(tokenizer.get_vocab(with_added_tokens=True))
    conversation = ConversationTokenizer(tokenizer, vocab)
    vq = VQGAN.from_original(root / "vqgan.yaml", root / "vqgan.ckpt").to(device)
    crop = VQImagePreprocessor(ImagePreprocessConfig(target_size=assets["target"]))
    (out / "files").mkdir(parents=True)
    with torch.no_grad(), open(out / "record.jsonl", "w") as records:
        for i, item in enumerate(items):
            image = Image.open(root / item["image"][0])
            codes = vq.encode(crop(image)[None].to(device))[0].cpu()
            text = conversation.tokenize([(t["from"], t["value"]) for t in item["conversations"]])
            tokens, labels = text.with_images([image_to_tokens(codes, vocab)])
            with open(out / "files" / f"{i}.pkl", "wb") as f:
                pickle.dump({"token": tokens, "label": labels, "id": i}, f)
            records.write(json.dumps({"file": str(out / "files" / f"{i}.pkl"), "len": len(tokens), "id": i}) + "\n")
        for spec in assets["encoders"]:
            encoder = load_encoder(spec, device=device)
            (out / spec.name).mkdir()
            for i, item in enumerate(items):
                image = Image.open(root / item["image"][0]).convert("RGB")
                feature = encoder.encode(encoder.preprocess(image)[None])
                torch.save(feature, out / spec.name / f"{i}_visual_feature.pt")


def ours(assets: dict, items: list, out: Path, args) -> None:
    root = assets["root"]
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(items))
    run_pretokenize(PretokenizeConfig(
        input=str(json_path), out_dir=str(out), tokenizer=str(root / "text_tokenizer.json"),
        vqgan_yaml=str(root / "vqgan.yaml"), vqgan_ckpt=str(root / "vqgan.ckpt"), encoders=assets["encoders"],
        image=ImagePreprocessConfig(target_size=assets["target"]), image_root=str(root), batch_size=args.batch_size,
        num_workers=args.num_workers, items_per_part=max(len(items), 1), device=args.device,
        channels_last=args.channels_last, progress=False,
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--warmup-images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed (reference, ours) pairs; medians are reported")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    reference_times, our_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "assets").mkdir()
        assets = build_assets(root / "assets", args.num_images, args.size)
        warm = assets["items"][: args.warmup_images]
        reference_loop(assets, warm, root / "warm_ref", args.device)
        ours(assets, warm, root / "warm_ours", args)
        for repeat in range(args.repeats):  # interleaved, so a change in machine load hits both
            reference_times.append(timed(reference_loop, assets, assets["items"], root / f"ref{repeat}", args.device)[0])
            our_times.append(timed(ours, assets, assets["items"], root / f"ours{repeat}", args)[0])
            shutil.rmtree(root / f"ref{repeat}", ignore_errors=True)
            shutil.rmtree(root / f"ours{repeat}", ignore_errors=True)
    ratios = [r / o for r, o in zip(reference_times, our_times)]
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "size": args.size,
        "num_images": args.num_images,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "channels_last": args.channels_last,
        "encoders": [s.name for s in assets["encoders"]],
        "reference_images_per_s": args.num_images / statistics.median(reference_times),
        "ours_images_per_s": args.num_images / statistics.median(our_times),
        "speedup_median": statistics.median(ratios),
        "speedup_per_repeat": ratios,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
