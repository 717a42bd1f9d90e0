"""Backbone loading, token vocabulary, the ARRA wrapper and its losses."""

from arra_ds.model.arra import AlignConfig, ARRAModel, ARRAOutput, build_model
from arra_ds.model.backbone import ModelConfig, load_backbone
from arra_ds.model.vocab import ChameleonVocab

__all__ = ["AlignConfig", "ARRAModel", "ARRAOutput", "ChameleonVocab", "ModelConfig", "build_model", "load_backbone"]
