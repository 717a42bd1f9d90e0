"""Image generation: batched CFG sampling with the image-structure constraint, VQGAN decoding."""

from arra_ds.generate.sampler import ImageLayout, ImageSampler, SampleBatch
from arra_ds.generate.sampling import SamplingConfig, seed_for_sample

__all__ = ["ImageLayout", "ImageSampler", "SampleBatch", "SamplingConfig", "seed_for_sample"]
