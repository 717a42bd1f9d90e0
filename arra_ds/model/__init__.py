"""Backbones and the ARRA wrapper (alignment projector and the combined loss)."""
