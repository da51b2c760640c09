"""The blocksparse kernel family (see patterncc/families/__init__.py)."""

__all__: list[str] = []
