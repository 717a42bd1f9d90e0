"""The built-in demo data set (scenes drawn in code, pre-tokenised for real) and its tiny models."""
