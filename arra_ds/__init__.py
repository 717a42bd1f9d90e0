"""arra_ds: ARRA (Autoregressive Representation Alignment) training on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
