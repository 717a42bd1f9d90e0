"""Image generation: batched CFG sampling with the image-structure constraint, VQGAN decoding, PNGs."""
