"""Pieces every kernel family uses, written once."""

__all__: list[str] = []
