"""The run's data record (arra_data.json): written by the trainer, read back for any path to the run,
and the defaults generation and evaluation take from it (explicit keys always win)."""

import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch
from gen_helpers import NUM_CODES, TINY_BACKBONE, save_backbone_dir, save_vqgan, write_mds
from PIL import Image
from streaming import StreamingDataset

from arra_ds import checkpoints
from arra_ds.checkpoints import RUN_DATA_FILE, RunData, read_run_data
from arra_ds.config import save_config
from arra_ds.data.pretokenize.config import META_FILE
from arra_ds.eval.extractors import THUMBNAIL_SIDE, build_extractor
from arra_ds.eval.runner import EvalConfig, resolve_eval
from arra_ds.generate.pipeline import GenerateConfig, resolve_generation
from arra_ds.generate.sampling import SamplingConfig
from arra_ds.model.chameleon import DEFAULT_IMAGE_SIZE
from arra_ds.tokens.layout import ImageGrid
from arra_ds.tokens.vocab import build_debug_vocab
from arra_ds.train import checkpoint as ckpt
from arra_ds.train.data_record import describe_training_data, write_data_record
from arra_ds.train.run_config import RunConfig


class OneFileEngine:
    def save(self, root, tag):
        torch.save({"value": torch.tensor(0)}, root / tag / "model_states.pt")


def fake_run(run_dir, record: RunData, step: int = 4):
    """A run directory as the trainer leaves it (config.yaml, checkpoints/latest -> step_<n>, arra_data.json)."""
    ckpt.save_checkpoint(OneFileEngine(), run_dir / checkpoints.CHECKPOINTS_DIR, ckpt.TrainerState(step=step), 0)
    run_config = RunConfig()
    run_config.model.debug = TINY_BACKBONE
    save_config(run_config, run_dir / checkpoints.RUN_CONFIG_FILE)
    write_data_record(run_dir, record)
    return run_dir


def test_the_record_is_found_from_any_path_to_the_run(tmp_path):
    record = RunData(source="demo", code_height=8, code_width=6, vqgan_config="v.yaml", vqgan_checkpoint="v.ckpt",
                     encoder={"name": "demo", "kind": "open_clip", "path": "clip"}, extractors=["thumbnail"])
    run = fake_run(tmp_path / "run", record)
    # paths in the record are relative to the run (copies in its assets/) unless they are absolute
    in_run = RunData(**{**asdict(record), "vqgan_config": str(run / "v.yaml"), "vqgan_checkpoint": str(run / "v.ckpt")})
    for path in (run, run / "checkpoints", run / "checkpoints" / "step_00000004"):
        assert read_run_data(path) == in_run
    assert record.grid == ImageGrid(8, 6) and (record.grid.height_px, record.grid.width_px) == (128, 96)
    assert read_run_data(tmp_path) is None  # not a run: no record, no error
    (run / RUN_DATA_FILE).write_text("{broken")
    with pytest.raises(checkpoints.CheckpointError, match="arra_data.json is not valid JSON"):
        read_run_data(run)


def test_trainer_describes_pre_tokenised_data_from_its_meta_file(tmp_path):
    """Local MDS data: the grid of the first sample, the VQGAN / tokenizer / encoder of
    pretokenize_meta.json (kept only when the VQGAN files exist)."""
    data = write_mds(tmp_path / "mds", code_size=4)
    yaml_path, ckpt_path = save_vqgan(tmp_path)
    (data / META_FILE).write_text(json.dumps({
        "vqgan": [str(yaml_path), str(ckpt_path), ""], "tokenizer": "/t/text_tokenizer.json",
        "encoders": [{"name": "biomedclip", "kind": "open_clip", "path": str(tmp_path / "nowhere")}],
    }))
    vocab = build_debug_vocab(num_image_codes=NUM_CODES)
    dataset = StreamingDataset(local=str(data), shuffle=False, batch_size=1)
    record = describe_training_data(str(data), False, str(data), dataset, vocab, "biomedclip")
    assert (record.code_height, record.code_width) == (4, 4)
    assert (record.vqgan_config, record.vqgan_checkpoint) == (str(yaml_path), str(ckpt_path))
    assert record.encoder["name"] == "biomedclip" and record.clip_model == ""  # no open_clip dir there
    assert record.heldout_prompts == "" and record.extractors == []
    ckpt_path.unlink()  # the VQGAN moved away: not named, generation asks for it
    assert describe_training_data(str(data), False, str(data), dataset, vocab, "x").vqgan_config == ""
    (data / META_FILE).unlink()  # pre-tokenised elsewhere: only the grid is known
    bare = describe_training_data(str(data), False, str(data), dataset, vocab, "x")
    assert (bare.code_height, bare.vqgan_config, bare.encoder) == (4, "", {})


def pixel_size(cfg) -> tuple[int, int]:
    return cfg.sampling.height, cfg.sampling.width


def test_generation_takes_vqgan_and_size_from_the_record_and_explicit_keys_win(tmp_path, capsys):
    vqgan = (str(tmp_path / "v.yaml"), str(tmp_path / "v.ckpt"))
    run = fake_run(tmp_path / "run", RunData(code_height=4, code_width=2, vqgan_config=vqgan[0], vqgan_checkpoint=vqgan[1]))
    given = GenerateConfig(model=str(run), prompt_texts=["a red circle"])
    cfg = resolve_generation(given).cfg
    assert (cfg.vqgan_config, cfg.vqgan_checkpoint) == vqgan
    assert pixel_size(cfg) == (64, 32) and capsys.readouterr().err == ""
    assert given.vqgan_config == "" and pixel_size(given) == (0, 0)  # resolution returns a new config
    assert (cfg.sampling.guidance_scale, cfg.sampling.image_top_k) == (4.0, 2000)  # the backbone's defaults

    cfg = GenerateConfig(model=str(run), prompt_texts=["x"], vqgan_config="mine.yaml", vqgan_checkpoint="mine.ckpt",
                         sampling=SamplingConfig(width=64))
    cfg = resolve_generation(cfg).cfg
    assert (cfg.vqgan_config, pixel_size(cfg)) == ("mine.yaml", (64, 64))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: sampling 64x64 px") and "trained on 64x32 px" in err[0]

    unknown = resolve_generation(GenerateConfig(model=str(save_backbone_dir(tmp_path / "hf_without_record")),
                                                prompt_texts=["x"])).cfg
    assert pixel_size(unknown) == (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE) and unknown.vqgan_config == ""


def test_eval_takes_prompts_metrics_and_output_dir_from_the_record(tmp_path, capsys):
    record = RunData(code_height=4, code_width=4, vqgan_config="v.yaml", vqgan_checkpoint="v.ckpt",
                     heldout_prompts="heldout", extractors=["thumbnail"], clip_model="local-dir:clip",
                     notes={"extractors": "fid note", "clip_model": "clip note"})
    run = fake_run(tmp_path / "run", record, step=7)
    resolved = resolve_eval(EvalConfig(model=str(run)))
    cfg, notes = resolved.cfg, resolved.notes
    assert (cfg.prompts, cfg.extractors, cfg.clip_model) == (str(run / "heldout"), ["thumbnail"], "local-dir:clip")
    assert cfg.output_dir == str(run / "evaluation" / "step_00000007")
    # 64 px images: MS-SSIM's window shrinks from 11 to the largest that fits 5 scales (3), and says so
    assert notes[:2] == ["fid note", "clip note"] and "window 3 instead of 11" in notes[2]
    assert cfg.ms_ssim_config.win_size == 3 and "window 3" in capsys.readouterr().out

    explicit = resolve_eval(EvalConfig(model=str(run), prompts="mine.txt", extractors=["xrv"], clip_model="",
                                       output_dir="out", sampling=SamplingConfig(height=256, width=256)))
    assert explicit.notes == []
    explicit = explicit.cfg
    assert (explicit.prompts, explicit.extractors, explicit.clip_model, explicit.output_dir) == ("mine.txt", ["xrv"], "", "out")
    assert explicit.ms_ssim_config.win_size == 11

    hf = save_backbone_dir(tmp_path / "hf")  # a model without a record: the library defaults
    plain = resolve_eval(EvalConfig(model=str(hf), prompts="p.txt"))
    assert plain.notes == [] and (plain.cfg.extractors, plain.cfg.clip_model, plain.cfg.output_dir) == (
        ["inception"], "", "runs/eval")


def test_thumbnail_features_are_mean_colours_of_a_grid():
    extractor = build_extractor("thumbnail")
    image = np.zeros((2, 128, 128, 3), np.uint8)
    image[0, :16, :16] = (255, 0, 0)  # a red top-left cell, one 16-px patch
    features = extractor.extract(torch.from_numpy(image).permute(0, 3, 1, 2))
    assert features.shape == (2, 3 * THUMBNAIL_SIDE**2) and extractor.feature_dim == 3 * THUMBNAIL_SIDE**2
    cells = features[0].view(3, THUMBNAIL_SIDE, THUMBNAIL_SIDE)
    assert cells[0, 0, 0] == 1.0 and cells[1:, 0, 0].abs().sum() == 0 and cells[:, 1:, 1:].abs().sum() == 0
    assert extractor.weights_hash == build_extractor("thumbnail").weights_hash
    assert extractor.device == torch.device("cpu")


def test_export_carries_the_record(tmp_path):
    """An HF directory with a copied record is read like the run (generation from an export)."""
    record = RunData(code_height=8, code_width=8, vqgan_config="v.yaml", vqgan_checkpoint="v.ckpt")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / RUN_DATA_FILE).write_text(json.dumps(asdict(record)))
    assert read_run_data(hf) == RunData(**{**asdict(record), "vqgan_config": str(hf / "v.yaml"),
                                          "vqgan_checkpoint": str(hf / "v.ckpt")})


def test_stale_images_are_made_again_and_kept_ones_are_identical(tmp_path, one_torch_thread):
    """Re-running generation into the same output_dir keeps the images of the same samples and
    settings, and makes again those of another prompt or other settings."""
    from arra_ds.generate.pipeline import run_generate

    model = save_backbone_dir(tmp_path / "model")
    yaml_path, ckpt_path = save_vqgan(tmp_path)

    def generate(prompts, out, **sampling):
        cfg = GenerateConfig(model=str(model), vqgan_config=str(yaml_path), vqgan_checkpoint=str(ckpt_path),
                             prompt_texts=prompts, output_dir=str(tmp_path / out), progress_bar=False,
                             sampling=SamplingConfig(height=32, width=32, image_top_k=20, **sampling))
        return run_generate(cfg)

    assert generate(["a red circle", "two blue squares"], "out")["generated"] == 2
    first = (tmp_path / "out" / "images" / "000000.png").read_bytes()
    assert generate(["a red circle", "two blue squares"], "out") == {
        "generated": 0, "reused": 2, "images_dir": str(tmp_path / "out" / "images"), "num_samples": 2}
    assert generate(["a red circle", "a green cross"], "out")["generated"] == 1  # the second prompt changed
    assert (tmp_path / "out" / "images" / "000000.png").read_bytes() == first
    generate(["a red circle", "a green cross"], "fresh")
    assert (tmp_path / "out" / "images" / "000001.png").read_bytes() == (tmp_path / "fresh" / "images" / "000001.png").read_bytes()
    assert generate(["a red circle", "a green cross"], "out", seed=5)["generated"] == 2  # other settings: all again
    shutil.rmtree(tmp_path / "fresh")
    assert Image.open(tmp_path / "out" / "images" / "000000.png").size == (32, 32)
