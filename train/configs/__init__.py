"""Hydra configs of `python -m train` (a package so the Compose API finds them when installed)."""
