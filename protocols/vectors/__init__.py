"""Deterministic test vectors for the protocols (JSON files) and their generator (generate.py)."""

__all__: list[str] = []
