"""Tokens: the text vocabulary, the VQ image tokenizers, and the sequence layout with its grid geometry."""
