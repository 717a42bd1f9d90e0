"""Run under ``deepspeed --num_gpus 2`` by tests/test_alignment.py: align.stop_step under DeepSpeed ZeRO-3.

Two runs of the same tiny model on the same per-rank batches, 4 steps, alignment until step 2:
- ``skip``: ``ARRAModel.set_align_step`` every step; from step 2 on the projector and the layer hook
  are skipped on every rank (and the projector's parameters frozen);
- ``zero_weight``: the projector keeps running from step 2 on with lambda = 0: its gradients are exact
  zeros, what "the alignment term changes nothing" means.
Writes per step (loss, grad norm) of both runs and the projector's weights at the end to argv[-1] (rank 0).
"""

import json
import sys

from arra_ds import warnings as known_warnings

known_warnings.install()  # before the imports below: DeepSpeed logs while it is imported

import torch  # noqa: E402

from arra_ds import distributed  # noqa: E402
from arra_ds.cli import run_launcher  # noqa: E402
from arra_ds.data.loader import Collator  # noqa: E402
from arra_ds.tokens.layout import IGNORE_INDEX, conversation_tokens, image_to_tokens  # noqa: E402
from arra_ds.train.engine import Engine, fill_ds_config, init_distributed, load_ds_config  # noqa: E402
from arra_ds.train.run_config import load_run_config  # noqa: E402

STEPS, STOP = 4, 2
OVERRIDES = [
    "align.feature_dim=8", f"align.stop_step={STOP}", f"train.max_steps={STEPS}", "train.micro_batch_size=2",
    "model.debug.hidden_size=32", "model.debug.num_hidden_layers=2", "model.debug.num_attention_heads=2",
    "model.debug.intermediate_size=64", "optim.grad_clip=0.5",
]


def batches(vocab, rank: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(STEPS):
        items = []
        for words in (2, 5):
            codes = torch.randint(0, vocab.num_image_codes, (2, 2), generator=g)
            prompt = [vocab.id(w) for w in "a blue ring at the top".split()[:words]]
            tokens, prompt_len = conversation_tokens(prompt, image_to_tokens(codes, vocab), vocab)
            labels = torch.tensor(tokens)
            labels[:prompt_len] = IGNORE_INDEX
            items.append({"input_ids": torch.tensor(tokens), "labels": labels})
        batch = Collator(vocab.pad_id)(items)
        batch.pop("meta")
        batch["target_features"] = torch.randn(2, 8, generator=g)
        out.append(batch)
    return out


def run(mode: str) -> dict:
    cfg = load_run_config(None, OVERRIDES)
    ds_config = fill_ds_config(load_ds_config("ds_configs/zero3.json"), cfg.train, cfg.optim, distributed.world_size(),
                               cfg.model.shape().hidden_size)  # fmt: skip
    distributed.seed_everything(0)
    engine = Engine(cfg.model, cfg.align, cfg.optim, ds_config)
    model = engine.model
    engine.train()
    losses, norms = [], []
    for step, batch in enumerate(batches(model.vocab, distributed.rank())):
        model.set_align_step(step, STEPS)
        if mode == "zero_weight" and step >= STOP:
            model.align_weight, model.align_active = 0.0, True  # the projector stays in the graph, weighted 0
            model.align_head.requires_grad_(True)
        out = engine.forward(batch)
        engine.backward(out.loss)
        engine.step()
        losses.append(distributed.all_reduce_mean(out.loss.detach().double().reshape(1)).item())
        norms.append(engine.grad_norm())
    with engine.gathered_for_reading(model.align_head.parameters()):
        projector = [p.detach().double().sum().item() for p in model.align_head.parameters()]
    return {"loss": losses, "grad_norm": norms, "projector": projector}


def main() -> None:
    init_distributed()
    result = {mode: run(mode) for mode in ("skip", "zero_weight")}
    if distributed.is_rank0():
        with open(sys.argv[-1], "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    # as the launchers do: the process group is torn down before the interpreter exits (a rank left with a live gloo
    # group aborted, "terminate called without an active exception", when its peer had exited first under load)
    sys.exit(run_launcher(main))
