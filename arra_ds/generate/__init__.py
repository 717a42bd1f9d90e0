"""Image generation for every backbone: the one sampling loop (CFG, top-k / top-p, per-sample seeds), the engine
(prompts or class labels -> PNGs, sharded over ranks, resumable) and decoding with the data's image tokenizer."""
