"""Model definitions, one file per generation (layers.py holds the shared building blocks)."""
