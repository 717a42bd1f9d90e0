"""Built-in demo data set for the embedded default run: images drawn in code, pre-tokenised for real.

A few hundred small pictures of coloured circles, squares and triangles on a plain background,
each with a caption that states its global content (shapes, colours, positions, counts, sizes):

    "a large red circle at the top left on a black background"
    "a green square at the center and a blue triangle at the bottom right on a gray background"
    "three yellow triangles on a white background"

They are written as a conversation JSON + PNG files and go through ``run_pretokenize`` (the same
crop, VQGAN, text layout, feature encoders and MDS writer as real data) with tiny models built here:
the debug tokenizer (``build_debug_tokenizer``; the captions only use its words), a tiny VQGAN and
a tiny open_clip ViT whose [CLS] embedding is ``feat_demo``. Everything lives under
``$ARRA_DS_CACHE/demo/<hash of the config>/`` (``models/`` holds the tiny VQGAN, tokenizer and
encoder, e.g. ``load_demo_vqgan`` to decode generated demo images).

No trained VQGAN exists offline. A randomly initialised one gives meaningless codes: its GroupNorms
and attention mix whole-image statistics into every latent (a plain black picture got 48 different
codes) and its decoder returns noise. The demo VQGAN is instead built in closed form, with the
Chameleon architecture and parameter names (``design_patch_vqgan``), plus two cheap fits:
1. The encoder's latent of a 16 x 16 patch is its mean colour, and the codebook is the k-means
   centroids of the demo images' latents: a code is a patch colour ("black background", "red
   inside", "red/black edge"), the same wherever it appears, and all codes are in use.
2. The decoder paints each patch with its code's colour; its last conv is a least-squares linear
   read-out onto demo pixels, so ``decode(encode(image))`` is a blocky (16 px) copy of the picture
   and generated demo images can be looked at and scored.
The tiny encoder gets one closed-form change too (``centre_feature_projection``): without it all
random [CLS] features point the same way and the alignment cosine would be high from the start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from arra_ds.data.features import OPEN_CLIP_WEIGHTS, EncoderSpec, build_tiny_open_clip_dir, load_encoder
from arra_ds.data.images import ImagePreprocessConfig, VQImagePreprocessor
from arra_ds.data.sequence import IMAGE_PLACEHOLDER, image_part_length
from arra_ds.model.vocab import build_debug_tokenizer
from arra_ds.model.vqgan import NORM_EPS, VQGAN, VQGANConfig, fit_codebook

DEMO_VERSION = 5  # part of the cache key: bump when the drawn data or the models change
VQ_PATCH_PX = 16  # the Chameleon VQGAN's stride: one code per 16 x 16 pixels
DEBUG_MAX_GRID = 32  # build_debug_tokenizer's default number of grid-size tokens
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (235, 205, 40)}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # centre of a shape as a fraction of the image side (x, y)
    "top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73), "center": (0.5, 0.5),
}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
SIZES = {"small": 0.11, "large": 0.2}  # shape radius as a fraction of the image side
POSITION_JITTER = 0.03  # random shift of a shape's centre (fraction of the side)
DEMO_ENCODER = "demo"  # the feature column feat_demo: a tiny open_clip ViT's [CLS] embedding
CODEBOOK_FIT_IMAGES = 64  # images whose latents (code_size^2 each) the k-means codebook is fitted on
CODEBOOK_FIT_ITERATIONS = 10
# Demo VQGAN design (see design_patch_vqgan): colour pairs scaled so a GroupNorm group's variance
# (<= 1e-10) stays far below its eps (1e-6); SiLU(3 + 0.1 x) is near-linear for colours x in [-1, 1].
DEMO_PAIR_SCALE = 1e-5
DEMO_SILU_SLOPE, DEMO_SILU_SHIFT = 0.1, 3.0
READOUT_FIT_IMAGES = 4  # images whose pixels (16k each) the decoder read-out is fitted to
FEATURE_CENTRING_IMAGES = 64  # images whose mean [CLS] direction is removed from the encoder's projection


@dataclass
class DemoDataConfig:
    num_samples: int = 512
    code_size: int = 8  # image side in VQ codes; the images are 16 * code_size pixels square
    feature_dim: int = 32  # width of feat_demo (the tiny open_clip encoder's embedding)
    num_image_codes: int = 256  # VQ codebook size; must equal model.debug.num_image_codes
    samples_per_shard: int = 128

    @property
    def image_size(self) -> int:
        return VQ_PATCH_PX * self.code_size

    def validate(self) -> None:
        from arra_ds.config import ConfigError

        if self.code_size < 2 or self.code_size % 2 or self.code_size > 2 * DEBUG_MAX_GRID:
            raise ConfigError(
                f"data.demo.code_size={self.code_size} must be even and in [2, {2 * DEBUG_MAX_GRID}]: a grid token "
                f"counts 2 x 2 codes (32 px) and the debug vocabulary has grid tokens up to {DEBUG_MAX_GRID}"
            )
        if self.num_image_codes < 2:
            raise ConfigError(f"data.demo.num_image_codes={self.num_image_codes} must be >= 2")
        if min(self.num_samples, self.feature_dim, self.samples_per_shard) < 1:
            raise ConfigError("data.demo.num_samples, feature_dim and samples_per_shard must be >= 1")

    def max_sequence_length(self) -> int:
        """Tokens of the longest demo sample: <s> caption <eot> image <eot>."""
        return 1 + MAX_CAPTION_WORDS + 1 + image_part_length(self.code_size, self.code_size) + 1

    def check_run(self, model, align, max_seq_len: int) -> None:
        """Cross-checks against the run config (called by RunConfig.validate when data.path=demo)."""
        from arra_ds.config import ConfigError

        if model.source != "debug":
            raise ConfigError(
                f"data.path=demo is tokenised with the debug vocabulary and only fits model.source=debug "
                f"(got model.source={model.source}); pre-tokenise real data with launch/pretokenize.py instead"
            )
        if model.debug.num_image_codes != self.num_image_codes:
            raise ConfigError(
                f"data.demo.num_image_codes={self.num_image_codes} (the demo VQGAN's codebook) must equal "
                f"model.debug.num_image_codes={model.debug.num_image_codes} (the model's image vocabulary)"
            )
        if align.enabled and align.encoder != DEMO_ENCODER:
            raise ConfigError(
                f"align.encoder={align.encoder}: the demo data set has one feature column, feat_{DEMO_ENCODER}; "
                f"set align.encoder={DEMO_ENCODER}"
            )
        if max_seq_len < self.max_sequence_length():
            raise ConfigError(
                f"data.max_seq_len={max_seq_len} is shorter than the longest demo sample "
                f"({self.max_sequence_length()} tokens); raise it or lower data.demo.code_size"
            )


# ------------------------------------------------------------------------------------------------
# Scenes: what is drawn and what the caption says
# ------------------------------------------------------------------------------------------------


@dataclass
class Shape:
    kind: str
    colour: str
    position: str
    size: str


def _one(kind: str, colour: str, position: str, size: str | None) -> str:
    size_word = f"{size} " if size else ""
    return f"a {size_word}{colour} {kind} at the {position}"


def caption_of(shapes: list[Shape], background: str, counted: bool, sized: bool) -> str:
    if counted:
        first = shapes[0]
        return f"{COUNT_WORDS[len(shapes)]} {first.colour} {first.kind}s on a {background} background"
    parts = " and ".join(_one(s.kind, s.colour, s.position, s.size if sized else None) for s in shapes)
    return f"{parts} on a {background} background"


def _longest_caption_words() -> int:
    """Word count of the longest caption ``random_scene`` can make (each word is one debug token)."""
    shape = Shape("triangle", "yellow", "bottom right", "large")  # the two-word position is the longest
    captions = [
        caption_of([shape], "gray", counted=False, sized=True),  # one shape, with its size
        caption_of([shape] * 2, "gray", counted=False, sized=False),  # two shapes
        caption_of([shape] * max(COUNT_WORDS), "gray", counted=True, sized=False),  # counted shapes
    ]
    return max(len(c.split()) for c in captions)


MAX_CAPTION_WORDS = _longest_caption_words()


def random_scene(rng: np.random.Generator) -> tuple[list[Shape], str, str]:
    """(shapes, background, caption) of one picture."""
    background = str(rng.choice(list(BACKGROUNDS)))
    mode = rng.choice(["single", "pair", "count"])
    if mode == "count":
        n = int(rng.choice(list(COUNT_WORDS)))
        kind, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        corners = rng.choice(CORNERS, size=n, replace=False)
        shapes = [Shape(kind, colour, str(c), "small") for c in corners]
        return shapes, background, caption_of(shapes, background, counted=True, sized=False)
    n = 1 if mode == "single" else 2
    positions = rng.choice(list(POSITIONS), size=n, replace=False)
    shapes = [
        Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(p), "large" if n == 1 and rng.random() < 0.5 else "small")
        for p in positions
    ]
    return shapes, background, caption_of(shapes, background, counted=False, sized=n == 1)


def draw_scene(shapes: list[Shape], background: str, side: int, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (side, side), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        fx, fy = POSITIONS[shape.position]
        cx = (fx + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * side
        cy = (fy + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * side
        r = SIZES[shape.size] * side
        colour = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif shape.kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    return image


def write_demo_images(source_dir: Path, cfg: DemoDataConfig, seed: int) -> Path:
    """PNG files + the conversation JSON (ARRA / Lumina-mGPT format); returns the JSON path."""
    images_dir = source_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for index in range(cfg.num_samples):
        shapes, background, caption = random_scene(rng)
        name = f"images/demo-{index:05d}.png"
        draw_scene(shapes, background, cfg.image_size, rng).save(source_dir / name)
        items.append({
            "id": f"demo-{index:05d}",
            "conversations": [{"from": "human", "value": caption}, {"from": "gpt", "value": IMAGE_PLACEHOLDER}],
            "image": [name],
        })
    path = source_dir / "conversations.json"
    path.write_text(json.dumps(items, indent=1))
    return path


# ------------------------------------------------------------------------------------------------
# Tiny models
# ------------------------------------------------------------------------------------------------


def demo_vqgan_config(cfg: DemoDataConfig) -> VQGANConfig:
    """f=16 like Chameleon, no res blocks, average-pool / nearest resampling: cheap at 128 px.

    ch=64 gives GroupNorm(32 groups) two channels per group, which ``design_patch_vqgan`` needs.
    """
    return VQGANConfig(
        n_embed=cfg.num_image_codes, embed_dim=16, z_channels=16, ch=64, ch_mult=(1, 1, 1, 1, 1),
        num_res_blocks=0, resolution=cfg.image_size, resamp_with_conv=False,
    )


@torch.no_grad()
def design_patch_vqgan(vq: VQGAN) -> None:
    """Weights that make the latent of a 16 x 16 patch its mean colour (absolute, not per image).

    Every conv uses its centre tap only (no border effects), the mid blocks and attention are
    identities (their last conv / proj_out are zero) and resampling is average pooling / nearest,
    so the encoder carries each patch's mean colour down to the latent grid. The only obstacle is
    GroupNorm (norm_out), which would standardise every channel per image: each colour c travels as
    the channel pair (+t * c, -t * c) that forms one GroupNorm group, so the group mean is exactly
    zero, and t is so small that the group variance stays far below GroupNorm's eps; GroupNorm then
    just multiplies by 1 / sqrt(eps), and its affine (gain, shift 3) keeps the SiLU near-linear.
    conv_out takes SiLU(+) - SiLU(-) (the curvature cancels): latent ~ 0.2 x patch colour.
    The decoder runs the same path back; its conv_out is fitted afterwards (``fit_decoder_readout``).
    """
    for parameter in vq.parameters():
        parameter.zero_()
    centre = vq.encoder.conv_in.kernel_size[0] // 2
    colours = range(vq.config.in_channels)
    pairs = [(2 * c, 2 * c + 1) for c in colours]  # GroupNorm groups of vq.config.ch // 32 = 2 channels
    gain = DEMO_SILU_SLOPE * (NORM_EPS ** 0.5) / DEMO_PAIR_SCALE
    for c, (plus, minus) in zip(colours, pairs):
        for conv in (vq.encoder.conv_in, vq.decoder.conv_in):
            conv.weight[plus, c, centre, centre] = DEMO_PAIR_SCALE
            conv.weight[minus, c, centre, centre] = -DEMO_PAIR_SCALE
        vq.encoder.conv_out.weight[c, plus, centre, centre] = 1.0
        vq.encoder.conv_out.weight[c, minus, centre, centre] = -1.0
        vq.quant_conv.weight[c, c, 0, 0] = 1.0
        vq.post_quant_conv.weight[c, c, 0, 0] = 1.0
        for norm in (vq.encoder.norm_out, vq.decoder.norm_out):
            norm.weight[[plus, minus]] = gain
            norm.bias[[plus, minus]] = DEMO_SILU_SHIFT


@torch.no_grad()
def fit_decoder_readout(vq: VQGAN, pixels: torch.Tensor) -> None:
    """Least-squares fit of decoder.conv_out (centre tap + bias) so that decode(encode(x)) ~ x."""
    captured = {}
    hook = vq.decoder.conv_out.register_forward_hook(lambda module, args, out: captured.update(features=args[0]))
    vq.decode(vq.encode(pixels))
    hook.remove()
    features = captured["features"].permute(0, 2, 3, 1).reshape(-1, vq.decoder.conv_out.in_channels)  # [N*H*W, C]
    design = torch.cat([features, torch.ones(features.shape[0], 1)], dim=1)  # [rows, C + 1]
    target = pixels.permute(0, 2, 3, 1).reshape(-1, pixels.shape[1])  # [rows, 3]
    solution = torch.linalg.lstsq(design.double(), target.double()).solution.float()  # [C + 1, 3]
    conv = vq.decoder.conv_out
    conv.weight.zero_()
    centre = conv.kernel_size[0] // 2
    conv.weight[:, :, centre, centre] = solution[:-1].t()
    conv.bias.copy_(solution[-1])


def build_demo_vqgan(cfg: DemoDataConfig, seed: int, image_paths: list[Path]) -> VQGAN:
    vq = VQGAN(demo_vqgan_config(cfg))
    design_patch_vqgan(vq)
    vq.use_channels_last()
    preprocess = VQImagePreprocessor(ImagePreprocessConfig(target_size=cfg.image_size, crop="square"))
    pixels = torch.stack([preprocess(Image.open(p)) for p in image_paths[:CODEBOOK_FIT_IMAGES]])
    fit_codebook(vq, vq.latents(pixels).permute(0, 2, 3, 1), iterations=CODEBOOK_FIT_ITERATIONS, seed=seed)
    fit_decoder_readout(vq, pixels[:READOUT_FIT_IMAGES])
    return vq


@torch.no_grad()
def centre_feature_projection(encoder_dir: Path, image_paths: list[Path]) -> None:
    """Remove the demo images' mean [CLS] direction from the tiny open_clip encoder's projection.

    A random ViT's [CLS] output is dominated by one direction shared by all images (class and
    position embeddings), so its features are ~0.9 cosine-similar to each other and predicting
    their mean would already give a high alignment cosine. Projecting that direction out of
    ``visual.proj`` (a closed-form change of the random init, like the VQGAN fits) leaves the
    image-dependent part: pairwise cosines near 0, colours and layout still told apart.
    """
    from safetensors.torch import load_file, save_file

    encoder = load_encoder(EncoderSpec(DEMO_ENCODER, "open_clip", path=str(encoder_dir), aggregation="cls"))
    visual = encoder.visual
    pixels = torch.stack([encoder.preprocess(Image.open(p)) for p in image_paths])
    projection = visual.proj
    visual.proj = None  # the tower then returns the pooled [CLS] before the projection, [N, width]
    mean_direction = torch.nn.functional.normalize(visual(pixels).mean(dim=0), dim=0)  # [width]
    visual.proj = projection
    weights_file = encoder_dir / OPEN_CLIP_WEIGHTS[0]
    state = load_file(str(weights_file))
    proj = state["visual.proj"]  # [width, embed_dim]
    state["visual.proj"] = (proj - torch.outer(mean_direction, mean_direction @ proj)).contiguous()
    save_file(state, str(weights_file))


@dataclass
class DemoModels:
    tokenizer: Path
    vqgan_yaml: Path
    vqgan_ckpt: Path
    encoders: list[EncoderSpec]


def demo_model_paths(models_dir: Path) -> DemoModels:
    return DemoModels(
        tokenizer=models_dir / "text_tokenizer.json",
        vqgan_yaml=models_dir / "vqgan.yaml",
        vqgan_ckpt=models_dir / "vqgan.ckpt",
        encoders=[EncoderSpec(DEMO_ENCODER, "open_clip", path=str(models_dir / "clip"), aggregation="cls")],
    )


def build_demo_models(models_dir: Path, cfg: DemoDataConfig, seed: int, image_paths: list[Path]) -> DemoModels:
    paths = demo_model_paths(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    build_debug_tokenizer(num_image_codes=cfg.num_image_codes).save(str(paths.tokenizer))
    build_demo_vqgan(cfg, seed, image_paths).save_original(paths.vqgan_yaml, paths.vqgan_ckpt)
    build_tiny_open_clip_dir(paths.encoders[0].path, seed=seed, embed_dim=cfg.feature_dim)
    centre_feature_projection(Path(paths.encoders[0].path), image_paths[:FEATURE_CENTRING_IMAGES])
    return paths


# ------------------------------------------------------------------------------------------------
# The data set
# ------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("ARRA_DS_CACHE", Path.home() / ".cache" / "arra_ds"))


def demo_dir(cfg: DemoDataConfig, seed: int) -> Path:
    key = json.dumps({**asdict(cfg), "seed": seed, "version": DEMO_VERSION}, sort_keys=True)
    return cache_root() / "demo" / hashlib.sha256(key.encode()).hexdigest()[:12]


def check_captions_in_vocabulary(captions: list[str], tokenizer) -> None:
    unknown = tokenizer.token_to_id("<unk>")
    for caption in captions:
        ids = tokenizer.encode(caption, add_special_tokens=False).ids
        if unknown in ids:
            words = [w for w, i in zip(caption.split(), ids) if i == unknown]
            raise ValueError(f"demo caption {caption!r} has words {words} outside the debug tokenizer's vocabulary")


def write_demo_dataset(out_dir: str | Path, cfg: DemoDataConfig, seed: int = 0) -> Path:
    """Draw, pre-tokenise and write the demo MDS data set to ``out_dir`` (built aside, then renamed)."""
    from arra_ds.data.pretokenize import PretokenizeConfig, run_pretokenize

    out_dir = Path(out_dir)
    if (out_dir / "index.json").is_file():
        return out_dir
    cfg.validate()
    # Unique per writer: nodes of a multi-node job share the cache directory, and pids repeat across hosts.
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    json_path = write_demo_images(tmp / "source", cfg, seed)
    items = json.loads(json_path.read_text())
    models = build_demo_models(tmp / "models", cfg, seed, [tmp / "source" / it["image"][0] for it in items])
    from tokenizers import Tokenizer

    check_captions_in_vocabulary([it["conversations"][0]["value"] for it in items], Tokenizer.from_file(str(models.tokenizer)))
    summary = run_pretokenize(PretokenizeConfig(
        input=str(json_path), out_dir=str(tmp), tokenizer=str(models.tokenizer),
        vqgan_yaml=str(models.vqgan_yaml), vqgan_ckpt=str(models.vqgan_ckpt), encoders=models.encoders,
        image=ImagePreprocessConfig(target_size=cfg.image_size, crop="square"), min_image_size=cfg.image_size,
        # one part (= one shard) per samples_per_shard items: exact shard sizes, merged by merge_index
        batch_size=64, num_workers=0, items_per_part=cfg.samples_per_shard, channels_last=True, progress=False,
    ))
    if summary["skipped"]:
        raise RuntimeError(f"the demo data set lost {summary['skipped']} items: {summary['skipped_by_reason']}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"demo data: {summary['written']} drawn images pre-tokenised into {out_dir}", flush=True)
    return out_dir


def load_demo_vqgan(data_dir: str | Path) -> VQGAN:
    """The tiny VQGAN a demo data set was tokenised with (e.g. to decode generated demo images)."""
    paths = demo_model_paths(Path(data_dir) / "models")
    return VQGAN.from_original(paths.vqgan_yaml, paths.vqgan_ckpt)
