"""Settings of the built-in demo data set (the ``demo`` section of a run config, used with data.path=demo)."""

from __future__ import annotations

from dataclasses import dataclass

from arra_ds.demo.scenes import MAX_CAPTION_WORDS
from arra_ds.errors import ConfigError
from arra_ds.model.arra import AlignConfig
from arra_ds.model.config import ModelConfig
from arra_ds.tokens.layout import CODE_PATCH_PX, GRID_CELL_PX, ImageGrid
from arra_ds.tokens.vocab import DEBUG_MAX_GRID, build_debug_vocab

DEMO_VERSION = 7  # part of the cache key: bump when the drawn data or the models change
# the feature columns feat_demo (a tiny open_clip ViT's [CLS] embedding) and patch_demo (its 4 x 4 patch
# features through the same projection, for align.feature=patch)
DEMO_ENCODER = "demo"


@dataclass
class DemoDataConfig:
    num_samples: int = 512
    code_size: int = 8  # image side in VQ codes; the images are 16 * code_size pixels square
    feature_dim: int = 32  # width of feat_demo (the tiny open_clip encoder's embedding)
    num_image_codes: int = 256  # VQ codebook size; must equal model.debug.num_image_codes
    samples_per_shard: int = 128
    num_heldout: int = 64  # held-out scenes (captions not in the training split) for evaluation; 0 = none

    @property
    def image_size(self) -> int:
        return CODE_PATCH_PX * self.code_size

    def validate(self) -> None:
        if self.code_size < 2 or self.code_size % 2 or self.code_size > 2 * DEBUG_MAX_GRID:
            raise ConfigError(
                f"demo.code_size={self.code_size} must be even and in [2, {2 * DEBUG_MAX_GRID}]: a grid token "
                f"counts 2 x 2 codes ({GRID_CELL_PX} px) and the debug vocabulary has grid tokens up to {DEBUG_MAX_GRID}"
            )
        if self.num_image_codes < 2:
            raise ConfigError(f"demo.num_image_codes={self.num_image_codes} must be >= 2")
        if min(self.num_samples, self.feature_dim, self.samples_per_shard) < 1:
            raise ConfigError("demo.num_samples, feature_dim and samples_per_shard must be >= 1")
        if self.num_heldout < 0:
            raise ConfigError(f"demo.num_heldout={self.num_heldout} must be >= 0 (0 = no held-out split)")

    def max_sequence_length(self) -> int:
        """Tokens of the longest demo sample: <s> caption <eot> image <eot>."""
        return 1 + MAX_CAPTION_WORDS + 1 + ImageGrid(self.code_size, self.code_size).part_length + 1

    def check_run(self, model: ModelConfig, align: AlignConfig, max_seq_len: int) -> None:
        """Cross-checks against the run config (called by RunConfig.validate when data.path=demo)."""
        vocab = model.backbone.vocab(model)
        if vocab is None or vocab.token_to_id != build_debug_vocab(model.debug.num_image_codes).token_to_id:
            raise ConfigError(
                f"data.path=demo is tokenised with the debug vocabulary, which model.source={model.source} does not "
                f"have (use model.source=debug); pre-tokenise real data with launch/pretokenize.py instead"
            )
        if model.debug.num_image_codes != self.num_image_codes:
            raise ConfigError(
                f"demo.num_image_codes={self.num_image_codes} (the demo VQGAN's codebook) must equal "
                f"model.debug.num_image_codes={model.debug.num_image_codes} (the model's image vocabulary)"
            )
        if align.enabled and align.encoder != DEMO_ENCODER:
            raise ConfigError(
                f"align.encoder={align.encoder}: the demo data set has one encoder's features, feat_{DEMO_ENCODER} "
                f"and patch_{DEMO_ENCODER}; set align.encoder={DEMO_ENCODER}"
            )
        if max_seq_len < self.max_sequence_length():
            raise ConfigError(
                f"data.max_seq_len={max_seq_len} is shorter than the longest demo sample "
                f"({self.max_sequence_length()} tokens); raise it or lower demo.code_size"
            )
