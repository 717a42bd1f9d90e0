"""The study's measuring instruments, made once before any run: the judge (attribute model), the FID
reference, and the levels every generated number is read against.

- FID reference: ``eval.reference_per_prompt`` fresh real pictures of every evaluated prompt (drawn
  for its caption, VQ-encoded, decoded): generated and reference pictures answer the same prompts;
- FID floor: ``eval.samples_per_prompt`` more fresh real pictures per prompt, as many as an
  evaluation generates, against the reference: what a perfect generator scores at that sample size;
- ceiling: the judge on the real held-out pictures (VQ reconstructions) of the evaluated prompts:
  their prompt fidelity and CLIP-Score, and the judge's attribute accuracy on all held-out pictures;
- chance: the same real pictures scored against *another* prompt's caption.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from arra_ds.data.images import ImagePreprocessConfig, VQImagePreprocessor
from arra_ds.demo.attributes import load_attribute_net
from arra_ds.demo.scenes import SceneAttributes, draw_scene, parse_caption
from arra_ds.eval.clip_score import build_clip_scorer
from arra_ds.eval.extractors import build_extractor
from arra_ds.eval.fid import load_stats
from arra_ds.eval.reference import ReferenceStatsConfig, write_reference_stats
from arra_ds.eval.summary import fid_score
from arra_ds.generate.images import list_images, load_rgb, save_png, to_chw_batch
from arra_ds.generate.prompts import load_prompts
from arra_ds.io import atomic_write_json
from arra_ds.study.clip import retrieval_accuracy
from arra_ds.study.config import StudyConfig
from arra_ds.study.data import read_scene_records, study_vocab
from arra_ds.study.judge import CodePainter, attribute_accuracy, prompt_fidelity, train_judge
from arra_ds.study.paths import StudyPaths
from arra_ds.study.runs import SCENE_EXTRACTOR, judge_weights, reference_stats_file
from arra_ds.tokens.vqgan import VQGAN

PAINT_CHECK_GRIDS = 4  # train code grids decoded to confirm that painting equals decoding
READ_BATCH = 64  # pictures per judge / extractor pass


def draw_prompt_pictures(cfg: StudyConfig, vq: VQGAN, painter: CodePainter, captions: list[str], per_prompt: int,
                         folder: Path, stream: int) -> None:
    """``per_prompt`` fresh pictures of each caption, VQ-encoded and decoded (painted), as
    ``<prompt>_<replica>.png`` in ``folder`` (random stream ``stream`` of the scene seed)."""
    if folder.is_dir() and len(list(folder.glob("*.png"))) == len(captions) * per_prompt:
        return
    rng = np.random.default_rng([cfg.scenes.seed, stream])
    preprocess = VQImagePreprocessor(ImagePreprocessConfig(target_size=cfg.scenes.image_size, crop="square"))
    jobs = [(i, r, parse_caption(caption)) for i, caption in enumerate(captions) for r in range(per_prompt)]
    folder.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(jobs), READ_BATCH), desc=f"real pictures: {folder.name}", disable=not cfg.progress_bar,
                      dynamic_ncols=True):
        chunk = jobs[start : start + READ_BATCH]
        pixels = torch.stack([preprocess(draw_scene(spec.shapes_for(rng), spec.background, cfg.scenes.image_size, rng))
                              for _, _, spec in chunk])
        with torch.no_grad():
            pictures = painter.paint(vq.encode(pixels))
        for (i, r, _), picture in zip(chunk, pictures):
            save_png(picture.permute(1, 2, 0).numpy(), folder / f"{i:04d}_{r}.png")


def heldout_items(paths: StudyPaths) -> list[dict]:
    """The evaluation prompts in order: uid, caption, the reconstruction PNG."""
    items = json.loads(paths.heldout_prompts.read_text())
    folder = paths.heldout_prompts.parent
    return [{"uid": it["id"], "caption": it["conversations"][0]["value"], "image": folder / it["image"][0]} for it in items]


def read_pictures(files) -> torch.Tensor:
    return to_chw_batch([load_rgb(f) for f in files])


def judge_pictures(net, pictures: torch.Tensor) -> list[SceneAttributes]:
    seen = []
    for start in range(0, pictures.shape[0], READ_BATCH):
        seen.extend(net.read(pictures[start : start + READ_BATCH]))
    return seen


def prepare_instruments(cfg: StudyConfig, paths: StudyPaths, data_summary: dict) -> dict:
    """Train the judge, write the reference statistics, measure ceiling / chance / floor; ``setup.json``."""
    if paths.setup.is_file():
        return json.loads(paths.setup.read_text())
    records = read_scene_records(paths)
    decoder = VQGAN.from_original(paths.vqgan_yaml, paths.vqgan_ckpt).eval()
    painter = CodePainter.from_decoder(decoder, cfg.scenes.num_image_codes)
    train = load_prompts(paths.mds("train"), study_vocab(cfg)).prompts
    codes = torch.from_numpy(np.stack([p.real_codes for p in train]).astype(np.int64))  # [N, h, w]
    paint_error = painter.check(decoder, [p.real_codes for p in train[:PAINT_CHECK_GRIDS]])
    if not judge_weights(paths).is_file():
        truth = [SceneAttributes.from_dict(records[p.uid]["attributes"]) for p in train]
        train_judge(cfg.judge, cfg.scenes.code_size, painter, codes, truth, paths.judge, seed=cfg.scenes.seed,
                    progress=cfg.progress_bar)
    px = cfg.scenes.image_size
    items = heldout_items(paths)
    evaluated = [item["caption"] for item in items[: cfg.eval.num_prompts]]
    vq = VQGAN.from_original(paths.vqgan_yaml, paths.vqgan_ckpt).use_channels_last()
    draw_prompt_pictures(cfg, vq, painter, evaluated, cfg.eval.reference_per_prompt, paths.reference_pictures, stream=1)
    draw_prompt_pictures(cfg, vq, painter, evaluated, cfg.eval.samples_per_prompt, paths.floor_pictures, stream=2)
    write_reference_stats(ReferenceStatsConfig(
        source=str(paths.reference_pictures), extractors=[SCENE_EXTRACTOR],
        extractor_weights={SCENE_EXTRACTOR: str(judge_weights(paths))}, height=px, width=px,
        output_dir=str(paths.reference), progress_bar=False,
    ))

    pictures = read_pictures(item["image"] for item in items)  # uint8 [H, 3, px, px]
    captions = [item["caption"] for item in items]
    net = load_attribute_net(judge_weights(paths))
    seen = judge_pictures(net, pictures)
    truth = [SceneAttributes.from_dict(records[item["uid"]]["attributes"]) for item in items]
    shown = min(cfg.eval.num_prompts, len(items))
    other = np.roll(np.arange(shown), 1)  # each picture against the next prompt's caption

    clip = build_clip_scorer(f"local-dir:{paths.clip}")
    clip_matched = clip.scores(pictures[:shown], captions[:shown])
    clip_other = clip.scores(pictures[:shown], [captions[i] for i in other])
    drawn = [Image.open(paths.scenes / records[item["uid"]]["image"]).convert("RGB") for item in items]
    recon = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pictures]

    extractor = build_extractor(SCENE_EXTRACTOR, str(judge_weights(paths)))
    reference = load_stats(reference_stats_file(paths), extractor.name, extractor.weights_hash)
    floor_files = list_images(paths.floor_pictures)
    features = np.concatenate([
        extractor.extract(read_pictures(floor_files[i : i + READ_BATCH])).numpy() for i in range(0, len(floor_files), READ_BATCH)
    ])

    setup = {
        "data": data_summary,
        "picture_px": px,
        "code_grid": [cfg.scenes.code_size, cfg.scenes.code_size],
        "paint_vs_decode_max_error": paint_error,
        "judge": {
            "weights": str(judge_weights(paths)),
            "attribute_accuracy_heldout": attribute_accuracy(seen, truth),
        },
        "clip": {
            "dir": str(paths.clip),
            "retrieval_top1_heldout_reconstructed": retrieval_accuracy(paths.clip, recon, captions),
            "retrieval_top1_heldout_drawn": retrieval_accuracy(paths.clip, drawn, captions),
            "num_captions": len(captions),
        },
        "ceiling": {
            "what": f"the real held-out pictures (VQ reconstructions) of the {shown} evaluated prompts",
            "fidelity": prompt_fidelity(seen[:shown], captions[:shown]),
            "clip_score": float(clip_matched.mean()),
        },
        "chance": {
            "what": "the same real pictures scored against another prompt's caption",
            "fidelity": prompt_fidelity(seen[:shown], [captions[i] for i in other]),
            "clip_score": float(clip_other.mean()),
        },
        "fid_reference": {
            "what": f"{reference.num_samples} fresh real pictures ({cfg.eval.reference_per_prompt} per evaluated prompt), VQ-decoded",
            "stats": str(reference_stats_file(paths)),
        },
        "fid_floor": {
            "what": f"{len(floor_files)} more fresh real pictures of the evaluated prompts against the reference: a "
                    "perfect generator's FID at this sample size",
            "fid_scene": fid_score(features, extractor, reference),
        },
    }
    atomic_write_json(paths.setup, setup)
    return setup
