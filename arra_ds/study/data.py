"""The study's data: drawn scenes, the tokenizer and VQGAN, the trained target encoder, and the
pre-tokenised train split and held-out prompt set.

Held-out prompts are drawn first (distinct captions); train scenes are then drawn fresh and any
scene whose caption is a held-out one is drawn again, so no held-out prompt is ever trained on
(the model must compose what it learnt). Every step checks whether its output exists, so a rerun
continues where an interrupted one stopped; pre-tokenization resumes part by part.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from tqdm.auto import tqdm

from arra_ds.data.features import EncoderSpec, build_tiny_open_clip_dir
from arra_ds.data.images import ImagePreprocessConfig
from arra_ds.data.pretokenize import PretokenizeConfig, run_pretokenize
from arra_ds.demo.config import DemoDataConfig
from arra_ds.demo.dataset import check_captions_in_vocabulary
from arra_ds.demo.models import build_demo_vqgan, centre_feature_projection
from arra_ds.demo.scenes import SceneAttributes, draw_scene, random_scene
from arra_ds.generate.images import save_png
from arra_ds.generate.pipeline import decode_to_uint8
from arra_ds.generate.prompts import load_prompts
from arra_ds.io import atomic_write, atomic_write_json
from arra_ds.study.clip import train_clip
from arra_ds.study.config import StudyConfig
from arra_ds.study.paths import StudyPaths
from arra_ds.tokens.layout import IMAGE_PLACEHOLDER
from arra_ds.tokens.vocab import ChameleonVocab, build_debug_tokenizer
from arra_ds.tokens.vqgan import VQGAN

SPLITS = ("train", "heldout")
RANDOM_ENCODER = "randclip"  # the column of the random-init control encoder (not a foundation model)
PRETOKENIZE_BATCH = 64  # pictures per VQGAN / encoder pass
CENTRING_IMAGES = 64  # pictures whose mean [CLS] direction is removed from the random encoder


def conversation_item(uid: str, caption: str, image: str) -> dict:
    """One (prompt, picture) item of the ARRA / Lumina-mGPT conversation JSON."""
    return {"id": uid, "conversations": [{"from": "human", "value": caption}, {"from": "gpt", "value": IMAGE_PLACEHOLDER}],
            "image": [image]}


def draw_study_scenes(cfg: StudyConfig, paths: StudyPaths) -> None:
    """Held-out prompts (distinct captions), then train scenes with none of those captions; PNGs,
    one conversation JSON per split and ``scenes.jsonl`` (uid, split, caption, ground truth)."""
    if paths.scenes_done.is_file():
        return
    scenes = cfg.scenes
    rng = np.random.default_rng(scenes.seed)
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    heldout_captions: set[str] = set()
    wanted = {"heldout": scenes.heldout_prompts, "train": scenes.train_scenes}
    bar = tqdm(total=sum(wanted.values()), desc="scenes: draw", disable=not cfg.progress_bar, dynamic_ncols=True)
    for split in ("heldout", "train"):
        (paths.scenes / split).mkdir(parents=True, exist_ok=True)
        while len(records[split]) < wanted[split]:
            shapes, background, caption = random_scene(rng)
            if caption in heldout_captions:
                continue  # held-out: distinct captions; train: never a held-out caption
            index = len(records[split])
            uid = f"{split}-{index:06d}"
            image = f"{split}/{index:06d}.png"
            draw_scene(shapes, background, scenes.image_size, rng).save(paths.scenes / image)
            if split == "heldout":
                heldout_captions.add(caption)
            records[split].append({"uid": uid, "split": split, "caption": caption, "image": image,
                                   "attributes": SceneAttributes.of_scene(shapes, background).as_dict()})
            bar.update(1)
    bar.close()
    for split in SPLITS:
        items = [conversation_item(r["uid"], r["caption"], r["image"]) for r in records[split]]
        atomic_write(paths.conversations(split), json.dumps(items, indent=1))
    atomic_write(paths.scene_records, "".join(json.dumps(r) + "\n" for split in SPLITS for r in records[split]))
    atomic_write_json(paths.scenes_done, {split: len(records[split]) for split in SPLITS})


def read_scene_records(paths: StudyPaths) -> dict[str, dict]:
    """uid -> {split, caption, image, attributes} of every drawn scene."""
    lines = paths.scene_records.read_text().splitlines()
    return {record["uid"]: record for record in map(json.loads, lines)}


def demo_data_config(cfg: StudyConfig) -> DemoDataConfig:
    """The demo VQGAN's settings at the study's grid and codebook size."""
    return DemoDataConfig(code_size=cfg.scenes.code_size, num_image_codes=cfg.scenes.num_image_codes,
                          feature_dim=cfg.clip.embed_dim)


def build_tokenizer_and_vqgan(cfg: StudyConfig, paths: StudyPaths, records: dict[str, dict]) -> None:
    """The debug tokenizer (the captions' words) and the closed-form demo VQGAN, its codebook fitted
    on the patch colours of the first train pictures (``arra_ds.demo.models``)."""
    if paths.vqgan_ckpt.is_file() and paths.tokenizer.is_file():
        return
    paths.models.mkdir(parents=True, exist_ok=True)
    tokenizer = build_debug_tokenizer(num_image_codes=cfg.scenes.num_image_codes)
    check_captions_in_vocabulary([r["caption"] for r in records.values()], tokenizer)
    train = [paths.scenes / r["image"] for r in records.values() if r["split"] == "train"]
    vq = build_demo_vqgan(demo_data_config(cfg), cfg.scenes.seed, train)
    vq.save_original(paths.vqgan_yaml, paths.vqgan_ckpt)
    tokenizer.save(str(paths.tokenizer))


def build_encoders(cfg: StudyConfig, paths: StudyPaths, records: dict[str, dict]) -> dict:
    """Train the target CLIP on the train split (and write the random control encoder if asked)."""
    summary_file = paths.clip / "training.json"
    if not summary_file.is_file():
        train = [r for r in records.values() if r["split"] == "train"]
        summary = train_clip(cfg.clip, [paths.scenes / r["image"] for r in train], [r["caption"] for r in train],
                             paths.clip, seed=cfg.scenes.seed, progress=cfg.progress_bar)
        atomic_write_json(summary_file, summary)
    if cfg.scenes.random_encoder and not (paths.random_clip / "centred.json").is_file():
        clip = cfg.clip
        build_tiny_open_clip_dir(paths.random_clip, seed=cfg.scenes.seed, image_size=clip.image_size,
                                 embed_dim=clip.embed_dim, width=clip.width, layers=clip.layers, patch_size=clip.patch_size)
        train_images = [paths.scenes / r["image"] for r in records.values() if r["split"] == "train"]
        centre_feature_projection(paths.random_clip, train_images[:CENTRING_IMAGES])
        atomic_write_json(paths.random_clip / "centred.json", {"images": CENTRING_IMAGES})
    return json.loads(summary_file.read_text())


def encoder_specs(cfg: StudyConfig, paths: StudyPaths) -> list[EncoderSpec]:
    specs = [EncoderSpec(cfg.clip.name, "open_clip", path=str(paths.clip), aggregation="cls")]
    if cfg.scenes.random_encoder:
        specs.append(EncoderSpec(RANDOM_ENCODER, "open_clip", path=str(paths.random_clip), aggregation="cls"))
    return specs


def pretokenize_splits(cfg: StudyConfig, paths: StudyPaths) -> dict[str, dict]:
    """Both splits through ``run_pretokenize`` (VQ codes, text layout, encoder features, MDS)."""
    summaries = {}
    for split in [*cfg.train_splits(), "heldout"]:
        source = "train" if split.startswith("train") else split  # train_rep: the train conversations with <REP>
        pretokenize = PretokenizeConfig(
            input=str(paths.conversations(source)), out_dir=str(paths.mds(split)), rep_token=split == "train_rep", tokenizer=str(paths.tokenizer),
            vqgan_yaml=str(paths.vqgan_yaml), vqgan_ckpt=str(paths.vqgan_ckpt), encoders=encoder_specs(cfg, paths),
            image=ImagePreprocessConfig(target_size=cfg.scenes.image_size, crop="square"),
            min_image_size=cfg.scenes.image_size, max_seq_len=cfg.scenes.max_sequence_length(split == "train_rep"),
            batch_size=PRETOKENIZE_BATCH, num_workers=0, items_per_part=cfg.scenes.items_per_part,
            num_procs=cfg.scenes.pretokenize_procs if source == "train" else 1, channels_last=True,
            progress=cfg.progress_bar,
        )
        report = paths.mds(split) / "report.json"
        summary = json.loads(report.read_text()) if (paths.mds(split) / "index.json").is_file() else run_pretokenize(pretokenize)
        if summary["skipped"]:
            raise RuntimeError(f"pre-tokenization of the {split} split lost {summary['skipped']} items: {summary['skipped_by_reason']}")
        summaries[split] = {"items": summary["items"], "written": summary["written"]}
    return summaries


def study_vocab(cfg: StudyConfig) -> ChameleonVocab:
    tokenizer = build_debug_tokenizer(num_image_codes=cfg.scenes.num_image_codes)
    return ChameleonVocab(tokenizer.get_vocab(with_added_tokens=True), source="debug tokenizer")


def write_heldout_prompts(cfg: StudyConfig, paths: StudyPaths) -> None:
    """Decode the held-out codes once (the real pictures as the VQ tokenizer gives them back) and
    write ``prompts.json``: the evaluation's prompts with those reconstructions as their real images
    (and ``prompts.txt``, the same prompts alone)."""
    if paths.heldout_prompts.is_file() and paths.eval_prompts_text.is_file():
        return
    prompt_set = load_prompts(paths.mds("heldout"), study_vocab(cfg))
    decoder = VQGAN.from_original(paths.vqgan_yaml, paths.vqgan_ckpt).eval()
    paths.heldout_recon.mkdir(parents=True, exist_ok=True)
    items = []
    for prompt in tqdm(prompt_set.prompts, desc="held-out: decode", disable=not cfg.progress_bar, dynamic_ncols=True):
        image = paths.heldout_recon / f"{prompt.uid}.png"
        if not image.is_file():
            save_png(decode_to_uint8(decoder, torch.from_numpy(prompt.real_codes.astype(np.int64))), image)
        items.append(conversation_item(prompt.uid, prompt.text, str(image.relative_to(paths.heldout_prompts.parent))))
    atomic_write(paths.eval_prompts_text, "".join(f"{p.text}\n" for p in prompt_set.prompts))
    atomic_write(paths.heldout_prompts, json.dumps(items, indent=1))


def prepare_data(cfg: StudyConfig, paths: StudyPaths) -> dict:
    """Every data step in order (each skipped when its output exists); returns what was made."""
    draw_study_scenes(cfg, paths)
    records = read_scene_records(paths)
    build_tokenizer_and_vqgan(cfg, paths, records)
    clip_summary = build_encoders(cfg, paths, records)
    splits = pretokenize_splits(cfg, paths)
    write_heldout_prompts(cfg, paths)
    return {"splits": splits, "clip_training": clip_summary}
