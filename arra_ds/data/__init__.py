"""Sequence layout, MDS schema, pre-tokenization, feature encoders, loader and demo data."""
