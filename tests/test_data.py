"""MDS schema, the streaming loader (padding, labels, resumable state) and the demo data set."""

import json

import numpy as np
import pytest
import torch
from streaming import MDSWriter

from arra_ds.data.loader import DataConfig, build_dataloader, build_dataset, feature_dim_of
from arra_ds.data.schema import SchemaError, check_columns, columns_for
from arra_ds.demo.config import DemoDataConfig
from arra_ds.demo.dataset import write_demo_dataset
from arra_ds.tokens.layout import IGNORE_INDEX
from arra_ds.tokens.vocab import build_debug_vocab


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "set", DemoDataConfig(num_samples=64, samples_per_shard=16))


def _loader(path, micro=4, feature="feat_demo", **data):
    cfg = DataConfig(path=str(path), **data)
    dataset = build_dataset(cfg, micro, seed=0, feature_column=feature, remote=None, local=str(path))
    return dataset, build_dataloader(dataset, cfg, micro, pad_id=build_debug_vocab().pad_id)


def test_demo_set_has_the_schema_and_several_shards(demo):
    columns = check_columns(demo, "feat_demo")
    assert columns == columns_for(["demo"], patch_features=True)  # feat_demo and patch_demo (align.feature=patch)
    assert len(json.loads((demo / "index.json").read_text())["shards"]) == 4


def test_batches_are_right_padded_with_prompt_and_padding_ignored(demo):
    vocab = build_debug_vocab()
    dataset, loader = _loader(demo)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["target_features"].shape == (4, feature_dim_of(dataset, "feat_demo"))
    for b in range(4):
        n = int(batch["attention_mask"][b].sum())
        assert (batch["input_ids"][b, n:] == vocab.pad_id).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        ids = batch["input_ids"][b, :n]
        start = int((ids == vocab.image_start_id).nonzero()[0])
        eot = int((ids == vocab.end_of_turn_id).nonzero()[0])
        assert start == eot + 1  # prompt ends with <eot>, then the image
        assert (batch["labels"][b, : eot + 1] == IGNORE_INDEX).all()
        assert (batch["labels"][b, eot + 1 : n] == ids[eot + 1 :]).all()


def test_loader_state_resumes_mid_epoch_exactly(demo):
    _, loader = _loader(demo)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    expected = [next(it)["input_ids"] for _ in range(4)]

    _, resumed = _loader(demo)
    resumed.load_state_dict(state)
    got = [b["input_ids"] for _, b in zip(range(4), resumed)]
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def test_an_epoch_sees_every_sample_once(demo):
    dataset, loader = _loader(demo)
    seen = []
    for batch in loader:
        seen.extend(batch["target_features"][:, 0].tolist())
    assert len(seen) == 64 == len(dataset)


def test_missing_feature_column_lists_the_available_ones(demo):
    with pytest.raises(SchemaError, match=r"no feature column 'feat_clip'.*Features in it: \['demo'\]"):
        _loader(demo, feature="feat_clip")


def test_patch_targets_come_with_their_grid(demo, tmp_path):
    dataset, loader = _loader(demo, feature="patch_demo")
    batch = next(iter(loader))
    assert "target_features" not in batch and feature_dim_of(dataset, "patch_demo") == 32
    assert batch["target_patches"].shape == (4, 16, 32) and batch["target_patches"].dtype == torch.float32
    assert batch["patch_grid"].tolist() == [4, 4]  # the tiny demo encoder's 4 x 4 patches, raster order
    with pytest.raises(SchemaError, match=r"no feature column 'patch_clip'.*Patch features in it: \['demo'\].*patch_features=true"):
        _loader(demo, feature="patch_clip")

    out = tmp_path / "odd"
    with MDSWriter(out=str(out), columns=columns_for(["x"], patch_features=True)) as w:
        for i in range(2):
            w.write({"tokens": np.arange(8, dtype=np.int32), "prompt_len": np.int32(2), "feat_x": np.ones(3, np.float16),
                     "patch_x": np.ones((6, 3), np.float16), "caption": "c", "uid": f"u{i}"})
    _, loader = _loader(out, micro=2, feature="patch_x")
    with pytest.raises(SchemaError, match="holds 6 patches, not a square grid"):
        next(iter(loader))


def test_not_an_mds_dir_is_explained(tmp_path):
    with pytest.raises(SchemaError, match="index.json not found"):
        check_columns(tmp_path, None)


def test_overlong_sequences_truncate_or_raise(tmp_path):
    out = tmp_path / "long"
    with MDSWriter(out=str(out), columns=columns_for(["x"])) as w:
        for i in range(4):
            w.write({"tokens": np.arange(40, dtype=np.int32), "prompt_len": np.int32(5),
                     "feat_x": np.ones(3, np.float16), "caption": "c", "uid": f"u{i}"})
    _, loader = _loader(out, micro=2, feature="feat_x", max_seq_len=16, pad_to_multiple_of=1)
    assert next(iter(loader))["input_ids"].shape == (2, 16)
    _, loader = _loader(out, micro=2, feature="feat_x", max_seq_len=16, overlong="error")
    with pytest.raises(ValueError, match="40 tokens > data.max_seq_len=16"):
        next(iter(loader))
