"""ARRA-Base's backbone: LlamaGen's class-conditional GPT (``model.source=llamagen``), split by concern:
``config`` (sizes), ``layers`` (2D RoPE, KV cache, blocks), ``gpt`` (the network), ``checkpoint`` (released
weights), ``backbone`` (the registry entry: training adapter, sampling hooks, VQ decoder, export)."""
