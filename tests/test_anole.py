"""Anole-7B's recipe (configs/anole7b_arra.yaml, model.source=chameleon) on a tiny Chameleon checkpoint whose image
rows of lm_head are trained (non-zero): the recipe keeps them, and sampling draws from them from the start."""

from __future__ import annotations

import torch
from conftest import REPO_ROOT
from gen_helpers import PROMPTS, save_backbone_dir
from transformers import ChameleonForConditionalGeneration

from arra_ds.config import load_dataclass_config
from arra_ds.generate.sampler import Sampler
from arra_ds.generate.sampling import SamplingConfig
from arra_ds.train.run_config import RunConfig

GRID = (4, 4)


def recipe_model(name: str, checkpoint):
    cfg = load_dataclass_config(RunConfig, REPO_ROOT / "configs" / name, [f"model.path={checkpoint}"]).model
    cfg.validate()
    return cfg


def greedy_codes(cfg, prompt_ids: list[int]) -> torch.Tensor:
    model, vocab = cfg.backbone.load_backbone(cfg)
    sampler = Sampler(cfg.backbone, model.eval(), vocab, SamplingConfig(temperature=0.0, guidance_scale=1.0), GRID)
    return sampler.generate([prompt_ids], seeds=[0]).codes[0]  # [4, 4]


def test_the_anole_recipe_keeps_the_trained_image_rows_and_samples_from_them(tmp_path, one_torch_thread):
    checkpoint = save_backbone_dir(tmp_path / "Anole-7b-hf")
    anole = recipe_model("anole7b_arra.yaml", checkpoint)
    assert (anole.source, anole.init_image_head) == ("chameleon", "keep")
    stock = ChameleonForConditionalGeneration.from_pretrained(checkpoint).eval()
    vocab = anole.backbone.vocab(anole)
    image_ids = vocab.image_token_ids
    released = stock.lm_head.weight[image_ids]
    assert released.abs().sum(dim=1).min() > 0  # every image row is trained

    model, _ = anole.backbone.load_backbone(anole)
    assert torch.equal(model.lm_head.weight[image_ids], released)  # kept, not zeroed
    chameleon = recipe_model("chameleon7b_arra.yaml", checkpoint)  # Chameleon-7B's recipe zeroes them
    assert not chameleon.backbone.load_backbone(chameleon)[0].lm_head.weight[image_ids].any()

    # used: the first greedy code is the argmax of the checkpoint's own image rows after the prompt's prefix
    tokenizer = anole.backbone.text_tokenizer(anole)
    prompt_ids = anole.backbone.encode_prompt(tokenizer, vocab, PROMPTS[0])
    codes = greedy_codes(anole, prompt_ids)
    prefix = [vocab.bos_id, *prompt_ids, vocab.end_of_turn_id, vocab.image_start_id,
              vocab.grid_token_id(GRID[0] // 2), vocab.grid_token_id(GRID[1] // 2)]
    with torch.no_grad():
        hidden = stock.model(input_ids=torch.tensor([prefix])).last_hidden_state[0, -1]
    assert int(codes[0, 0]) == int(vocab.bpe_to_code[image_ids[(released @ hidden).argmax()]])
    assert codes.unique().numel() > 1
    # with zeroed rows every code is equally likely: greedy draws the same code everywhere
    assert greedy_codes(chameleon, prompt_ids).unique().numel() == 1
