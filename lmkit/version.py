"""lmkit's version: the one place it is written (pyproject.toml reads it from here). This module imports nothing,
so whatever records the version (lmkit.record, in every artifact's config.json) imports it without a loop through
the package's other modules."""

__version__ = "0.1.0"
