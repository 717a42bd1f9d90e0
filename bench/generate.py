"""Images/s of our batched sampler vs one-image-at-a-time sampling as Lumina-mGPT does it.

Both sides use the same randomly initialised model, the same logit operations (guidance, structure
mask, image top-k, inverse-CDF draws with per-sample seeds) and the same machine, in one run:

- baseline (Lumina-mGPT's ``inference_solver.py`` scheme): one prompt at a time, the unconditional
  branch of classifier-free guidance as a second batch-1 model call per token with its own KV cache
  (``LLMImageStartTriggeredUnbatchedClassifierFreeGuidanceLogitsProcessor``);
- ours (``arra_ds.generate.ImageSampler``): ``--batch-size`` prompts per call, conditional and
  unconditional rows in the same forward pass.

The baseline omits Hugging Face ``generate``'s own per-step Python overhead, so the ratio is a lower
bound of the speed-up over the real Lumina-mGPT code. Also reported: how many images both produce
identically (same seed; differences come only from float round-off flipping a draw), and seconds
per image of each side.

``--shape demo`` is the model of the default run (configs/debug.yaml: hidden 64, 4 layers, the debug
vocabulary) at its trained size, 128 x 128; ``--decode`` adds turning the codes into pixels with a
VQGAN of the demo's architecture (one image per call, as the generation pipeline does) to both sides:

    python bench/generate.py --shape demo --size 128 --num-images 16 --batch-size 16 --decode --threads 1
    python bench/generate.py --shape cpu-small --size 256 --num-images 8 --batch-size 8
    python bench/generate.py --shape chameleon7b --size 512 --num-images 32 --batch-size 16 --device cuda --dtype bf16
    # within a short GPU lease (bench/gpu/suite.py): a 64-px warm-up and the baseline on the first 2 images only
    python bench/generate.py --shape chameleon7b --size 512 --num-images 16 --batch-size 16 --baseline-images 2 \
        --warmup-size 64 --device cuda --dtype bf16

Images/s of each path is measured on its own images, so the baseline may run on fewer (--baseline-images: one
image at a time costs the most); ``identical_images`` compares the images both paths made.
"""

import argparse
import json
import sys
import time
from pathlib import Path

# run from a checkout without installing; before torch / transformers, which may import arra_ds through an
# installed copy (transformers probes for a top-level `kernels` package)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from arra_ds.demo.config import DemoDataConfig  # noqa: E402
from arra_ds.demo.models import demo_vqgan_config  # noqa: E402
from arra_ds.generate.pipeline import decode_to_uint8  # noqa: E402
from arra_ds.generate.sampler import Sampler  # noqa: E402
from arra_ds.generate.sampling import (  # noqa: E402  # noqa: E402
    SamplingConfig,
    draw_uniforms,
    restrict_to,
    sample_generators,
    sample_top_k,
    seed_for_sample,
)
from arra_ds.model.config import ModelConfig  # noqa: E402
from arra_ds.model.debug import DEBUG, DebugModelConfig  # noqa: E402
from arra_ds.tokens.layout import CODE_PATCH_PX, ImageGrid  # noqa: E402
from arra_ds.tokens.vqgan import VQGAN  # noqa: E402
from arra_ds.train.run_config import load_run_config  # noqa: E402
from bench.harness import synchronize  # noqa: E402

# Chameleon-7B: hidden 4096, 32 layers x 32 heads, MLP 11008, vocab 65536, 8192 image codes.
SHAPES = {
    "chameleon7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008),
    "cpu-small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=704),
}
CHAMELEON_VOCAB = 65536
CHAMELEON_IMAGE_CODES = 8192
DEMO = "demo"  # the default run's model (configs/debug.yaml), with its own vocabulary


def build_model(shape: str, layers: int, device: str, dtype: torch.dtype):
    """(model, vocab) as the debug backbone builds it: the default run's model, or a Chameleon shape with the real
    LM-head width (ids past the debug vocabulary are unused)."""
    if shape == DEMO:
        debug = load_run_config().model.debug
    else:
        debug = DebugModelConfig(**SHAPES[shape], num_image_codes=CHAMELEON_IMAGE_CODES, max_position_embeddings=4096,
                                 vocab_size=CHAMELEON_VOCAB)
    if layers:
        debug.num_hidden_layers = layers
    torch.manual_seed(0)
    model, vocab = DEBUG.load_backbone(ModelConfig(debug=debug, attn_implementation="sdpa"), dtype=dtype)
    return model.to(device).eval().requires_grad_(False), vocab


def image_sampler(model, vocab, cfg: SamplingConfig) -> Sampler:
    return Sampler(DEBUG, model, vocab, cfg, DEBUG.sampling_grid(ModelConfig(), cfg.height, cfg.width))


@torch.inference_mode()
def lumina_style_generate(model, vocab, cfg: SamplingConfig, prompt_ids, seed) -> torch.Tensor:
    """One image; conditional and unconditional branches as separate batch-1 calls (own KV caches)."""
    layout = ImageGrid.for_pixels(cfg.height, cfg.width)
    device = next(model.parameters()).device
    allowed = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool, device=device)
    allowed[vocab.image_token_ids.to(device)] = True
    generator = sample_generators([seed])
    branches = []
    for prefix in ([vocab.bos_id, *prompt_ids, vocab.end_of_turn_id, *layout.prefix(vocab)], layout.prefix(vocab)):
        cache = DynamicCache()
        out = model.model(input_ids=torch.tensor([prefix], device=device), past_key_values=cache, use_cache=True)
        branches.append([cache, out.last_hidden_state[:, -1], len(prefix)])
    body = []
    for step in range(layout.body_length):
        forced = layout.forced_token(step, vocab)
        if forced is None:
            cond = model.lm_head(branches[0][1]).float()
            uncond = model.lm_head(branches[1][1]).float()
            logits = restrict_to(uncond + cfg.guidance_scale * (cond - uncond), allowed)
            token = int(sample_top_k(logits, cfg.image_top_k, cfg.temperature, draw_uniforms(generator))[0])
        else:
            token = forced
        body.append(token)
        if step == layout.body_length - 1:
            break
        for branch in branches:
            cache, _, length = branch
            out = model.model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True,
                              position_ids=torch.tensor([[length]], device=device))
            branch[1], branch[2] = out.last_hidden_state[:, -1], length + 1
    grid = torch.tensor(body[:-1]).view(layout.code_height, layout.code_width + 1)[:, :-1]
    return vocab.tokens_to_codes(grid)


def demo_decoder(num_codes: int, size: int, device: str) -> VQGAN:
    """A VQGAN of the demo's architecture (f = 16, cheap at 128 px); random weights decode as fast."""
    torch.manual_seed(0)
    cfg = DemoDataConfig(code_size=size // CODE_PATCH_PX, num_image_codes=num_codes)
    return VQGAN(demo_vqgan_config(cfg)).to(device).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted([*SHAPES, DEMO]), default="cpu-small")
    parser.add_argument("--layers", type=int, default=0, help="truncate to this many decoder layers (0 = the shape's)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (multiple of 32)")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--baseline-images", type=int, default=0,
                        help="images the one-at-a-time baseline makes (the first ones; 0 = --num-images)")
    parser.add_argument("--warmup-size", type=int, default=0,
                        help="image side of the warm-up generations (0 = --size; smaller saves time on a slow path)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--decode", action="store_true", help="include decoding to pixels (a VQGAN of the demo's architecture)")
    parser.add_argument("--out", default="", help="also write the result JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, vocab = build_model(args.shape, args.layers, args.device, dtype)
    cfg = SamplingConfig(height=args.size, width=args.size, guidance_scale=args.guidance)
    words = [t for t in vocab.token_to_id if t.isalpha()]
    prompts = [[vocab.id(w) for w in words[i % 7 : i % 7 + 5 + i % 4]] for i in range(args.num_images)]
    seeds = [seed_for_sample(0, k) for k in range(args.num_images)]
    sampler = image_sampler(model, vocab, cfg)
    cfg = sampler.cfg  # the backbone's defaults filled in (image top-k)
    steps = ImageGrid.for_pixels(args.size, args.size).body_length

    decoder = demo_decoder(vocab.num_image_codes, args.size, args.device) if args.decode else None

    def decoded(codes: torch.Tensor) -> torch.Tensor:
        if decoder is not None:
            decode_to_uint8(decoder, codes)  # one image per call, as the generation pipeline does
        return codes

    warmup_cfg = SamplingConfig(height=args.warmup_size or args.size, width=args.warmup_size or args.size,
                                guidance_scale=args.guidance)
    # warm-up (kernels, allocator)
    warmup = image_sampler(model, vocab, warmup_cfg)
    decoded(warmup.generate(prompts[:1], seeds[:1]).codes[0])
    lumina_style_generate(model, vocab, warmup.cfg, prompts[0], seeds[0])
    baseline_images = min(args.baseline_images or args.num_images, args.num_images)

    synchronize(args.device)
    start = time.perf_counter()
    ours = []
    for i in range(0, args.num_images, args.batch_size):
        batch = sampler.generate(prompts[i : i + args.batch_size], seeds[i : i + args.batch_size]).codes
        ours.extend(decoded(codes) for codes in batch)
    synchronize(args.device)
    batched_s = time.perf_counter() - start

    start = time.perf_counter()
    baseline = [decoded(lumina_style_generate(model, vocab, cfg, p, s))
                for p, s in zip(prompts[:baseline_images], seeds)]
    synchronize(args.device)
    baseline_s = time.perf_counter() - start

    result = {
        "shape": args.shape, "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
        "vocab": model.config.vocab_size, "size": args.size, "tokens_per_image": steps + 3, "device": args.device,
        "dtype": args.dtype, "guidance": args.guidance, "num_images": args.num_images, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "decode": args.decode,
        "batched_images_per_s": args.num_images / batched_s,
        "baseline_images": baseline_images,
        "warmup_size": args.warmup_size or args.size,
        "one_at_a_time_images_per_s": baseline_images / baseline_s,
        "batched_s_per_image": batched_s / args.num_images,
        "one_at_a_time_s_per_image": baseline_s / baseline_images,
        "speedup": (baseline_s / baseline_images) / (batched_s / args.num_images),
        "identical_images": sum(bool(torch.equal(a.cpu(), b.cpu())) for a, b in zip(ours, baseline)),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
