"""LlamaGen's class-conditional GPT (c2i), trainable from scratch and loadable from the released weights.

Parameter names, shapes, initialisation, 2D RoPE and dropout placement follow upstream
``autoregressive/models/gpt.py`` (FoundationVision/LlamaGen), so a released ``c2i_B_256.pt`` loads
with ``strict=True`` through ``model/llamagen/checkpoint.py``:

    cls_embedding.embedding_table.weight     [num_classes + 1, dim]   (+1: the null class of CFG)
    tok_embeddings.weight                    [vocab_size, dim]
    layers.{i}.attention.wqkv.weight         [3 * dim, dim]
    layers.{i}.attention.wo.weight           [dim, dim]
    layers.{i}.feed_forward.w1 / w3.weight   [ffn_dim, dim]
    layers.{i}.feed_forward.w2.weight        [dim, ffn_dim]
    layers.{i}.attention_norm / ffn_norm.weight, norm.weight   [dim]
    output.weight                            [vocab_size, dim]

The sequence is ``[class token, code_0, ..., code_{T-1}]`` (codes in raster order over the
``grid x grid`` latent map); the hidden state at sequence index ``t`` predicts ``code_t``.

    model = LlamaGenGPT(LlamaGenConfig(size="B"))
    hidden = model.forward_hidden(class_ids, codes[:, :-1])   # [B, T, dim]: teacher forcing as upstream
    logits = model.logits(hidden)                             # [B, T, vocab] fp32; targets = codes

    logits, cache = model.prefill(class_ids)                  # sampling: logits for code_0
    logits, cache = model.decode_step(code_0, cache, position=0)   # logits for code_1, ...
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from arra_ds.model.interface import GatherContext, no_gather
from arra_ds.model.llamagen.config import LlamaGenConfig
from arra_ds.model.llamagen.layers import (
    ClassEmbedding,
    LlamaGenKVCache,
    RMSNorm,
    TransformerBlock,
    build_2d_rope_table,
)


class LlamaGenGPT(nn.Module):
    """LlamaGen c2i GPT. ``layers[i]``'s forward output is the hidden state after block i + 1."""

    def __init__(self, config: LlamaGenConfig, initialize: bool = True):
        """``initialize=False`` leaves the weights as the layers create them: for a caller that runs
        ``initialize_weights(gather)`` itself (parameters partitioned at creation under ZeRO-3) or loads
        a checkpoint next."""
        super().__init__()
        config.validate()
        self.config = config
        dim = config.resolved_dim
        self.cls_embedding = ClassEmbedding(config.num_classes, dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.resolved_n_layer))
        self.norm = RMSNorm(dim, eps=config.norm_eps)
        self.output = nn.Linear(dim, config.vocab_size, bias=False)
        # A plain fp32 attribute, not a buffer (as upstream): it stays out of the state dict and is not
        # cast by model.to(bf16) / DeepSpeed's bf16 engine, so rotations are computed from fp32 cos / sin.
        self.rope_table = build_2d_rope_table(config.grid_size, config.head_dim, config.rope_base, config.cls_token_num)
        if initialize:
            self.initialize_weights()

    def initialize_weights(self, gather: GatherContext = no_gather) -> None:
        """Upstream init: Linear / Embedding weights ~ N(0, initializer_range), biases 0, LM head all zeros.

        Each layer's weights are drawn inside ``gather`` (under ZeRO-3 they are partitioned as soon as
        the layer exists, whole only inside the gather; rank 0's draw is kept).
        """
        std = self.config.initializer_range
        with torch.no_grad():
            for module in self.modules():
                if not isinstance(module, (nn.Linear, nn.Embedding)):
                    continue
                with gather(list(module.parameters(recurse=False))):
                    if module is self.output:
                        nn.init.zeros_(module.weight)
                    else:
                        nn.init.normal_(module.weight, mean=0.0, std=std)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)

    @property
    def null_class_id(self) -> int:
        return self.config.null_class_id

    def _rope(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        """Rows [start, start + length) of the RoPE table on `device`: [length, head_dim // 2, 2]."""
        if self.rope_table.device != device or self.rope_table.dtype != torch.float32:
            # (zero.Init casts floating tensors created while the model is built to the training dtype)
            self.rope_table = self.rope_table.to(device=device, dtype=torch.float32)
        return self.rope_table[start : start + length]

    def _check_inputs(self, class_ids: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        if class_ids.dim() != 1:
            raise ValueError(f"class_ids must be [B], got shape {tuple(class_ids.shape)}")
        if codes is None:
            return
        if codes.dim() != 2 or codes.shape[0] != class_ids.shape[0]:
            raise ValueError(f"codes must be [B={class_ids.shape[0]}, T], got shape {tuple(codes.shape)}")
        if codes.shape[1] > self.config.block_size:
            raise ValueError(f"{codes.shape[1]} codes exceed block_size={self.config.block_size}")

    # ---- training / teacher forcing --------------------------------------------------------------
    def forward_hidden(self, class_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """class_ids [B] int64, codes [B, T] int64 (T <= block_size) -> hidden [B, 1 + T, dim] after the final norm.

        Sequence index 0 is the class token; index t predicts codes[:, t]. Upstream trains on
        ``codes[:, :-1]`` so that the T outputs predict all T codes. In training mode labels go to the
        null class with probability class_dropout_prob; in eval mode never.
        """
        self._check_inputs(class_ids, codes)
        class_token = self.cls_embedding(class_ids, drop_labels=self.training)  # [B, 1, dim]
        tokens = torch.cat([class_token, self.tok_embeddings(codes)], dim=1)  # [B, 1 + T, dim]
        h = self.tok_dropout(tokens)
        rope = self._rope(0, h.shape[1], h.device)
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            # A hook on a block fires once per forward even when it is recomputed: torch's non-reentrant
            # recompute stops early, after the block's last saved tensor and before the block returns.
            # Hooks on modules inside a block (attention, feed_forward) do fire again in backward.
            h = checkpoint(layer, h, rope, use_reentrant=False) if recompute else layer(h, rope)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., dim] -> logits [..., vocab_size] in fp32 (as upstream, for the cross-entropy)."""
        return self.output(hidden).float()

    def forward(self, class_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """class_ids [B], codes [B, T] -> logits [B, 1 + T, vocab_size] (fp32)."""
        return self.logits(self.forward_hidden(class_ids, codes))

    # ---- sampling --------------------------------------------------------------------------------
    def _cached_step(self, tokens: torch.Tensor, cache: LlamaGenKVCache) -> torch.Tensor:
        """tokens [B, S, dim] at sequence indices [cache.length, + S) -> logits of the last one [B, vocab]."""
        h = self.tok_dropout(tokens)
        rope = self._rope(cache.length, h.shape[1], h.device)
        for index, layer in enumerate(self.layers):
            h = layer(h, rope, cache, index)
        cache.length += h.shape[1]
        return self.logits(self.norm(h[:, -1]))

    def prefill(self, class_ids: torch.Tensor) -> tuple[torch.Tensor, LlamaGenKVCache]:
        """class_ids [B] -> (logits for code 0 [B, vocab_size] fp32, a new cache holding the class token).

        Labels are never dropped here. For classifier-free guidance pass conditional and
        unconditional rows in one batch, e.g. ``torch.cat([labels, torch.full_like(labels,
        model.null_class_id)])``, feed every sampled code to both halves, and combine the logits as
        ``uncond + scale * (cond - uncond)`` (upstream generate.py).
        """
        self._check_inputs(class_ids)
        capacity = self.config.cls_token_num + self.config.block_size
        cache = LlamaGenKVCache(capacity, [None] * len(self.layers), [None] * len(self.layers))
        class_token = self.cls_embedding(class_ids, drop_labels=False)
        return self._cached_step(class_token, cache), cache

    def decode_step(
        self, codes: torch.Tensor, cache: LlamaGenKVCache, position: int
    ) -> tuple[torch.Tensor, LlamaGenKVCache]:
        """Feed code number `position` (codes [B] int64) -> (logits for code position + 1 [B, vocab_size], cache).

        ``position`` counts codes from 0 in raster order; the cache must hold exactly the class token
        and codes 0 .. position - 1. The cache is updated in place and returned.
        """
        expected = cache.length - self.config.cls_token_num
        if position != expected:
            raise ValueError(f"decode_step(position={position}) but the cache holds codes up to {expected - 1}")
        if codes.dim() != 1:
            raise ValueError(f"codes must be [B], got shape {tuple(codes.shape)}")
        return self._cached_step(self.tok_embeddings(codes)[:, None], cache), cache
