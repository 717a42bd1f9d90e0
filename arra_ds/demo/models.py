"""The tiny models of the demo data set: a VQGAN designed in closed form and a centred tiny CLIP.

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

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from arra_ds.data.features import OPEN_CLIP_WEIGHTS, EncoderSpec, build_tiny_open_clip_dir, load_encoder
from arra_ds.data.images import ImagePreprocessConfig, VQImagePreprocessor
from arra_ds.demo.config import DEMO_ENCODER, DemoDataConfig
from arra_ds.tokens.taming import NORM_EPS
from arra_ds.tokens.vocab import build_debug_tokenizer
from arra_ds.tokens.vqgan import VQGAN, VQGANConfig, fit_codebook

CODEBOOK_FIT_IMAGES = 64  # images whose latents (code_size^2 each) the k-means codebook is fitted on
CODEBOOK_FIT_ITERATIONS = 10
# Demo VQGAN design (see design_patch_vqgan): colour pairs scaled so a GroupNorm group's variance
# (<= 1e-10) stays far below its eps (1e-6); SiLU(3 + 0.1 x) is near-linear for colours x in [-1, 1].
DEMO_PAIR_SCALE = 1e-5
DEMO_SILU_SLOPE, DEMO_SILU_SHIFT = 0.1, 3.0
READOUT_FIT_IMAGES = 4  # images whose pixels (16k each) the decoder read-out is fitted to
FEATURE_CENTRING_IMAGES = 64  # images whose mean [CLS] direction is removed from the encoder's projection
# The encoder's text tower takes open_clip's default tokenizer (CLIP BPE, 49408 tokens), so CLIP-Score
# can run with it; its context holds the longest caption (MAX_CAPTION_WORDS words, <= 19 BPE tokens) and
# the start / end tokens. The text tower is random: a score with it checks the pipeline, not fidelity.
CLIP_BPE_VOCAB_SIZE = 49408
DEMO_TEXT_CONTEXT = 32




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
    build_tiny_open_clip_dir(paths.encoders[0].path, seed=seed, embed_dim=cfg.feature_dim,
                             text_context_length=DEMO_TEXT_CONTEXT, text_vocab_size=CLIP_BPE_VOCAB_SIZE)
    centre_feature_projection(Path(paths.encoders[0].path), image_paths[:FEATURE_CENTRING_IMAGES])
    return paths
