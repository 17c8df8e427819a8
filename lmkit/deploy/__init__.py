"""Exports for runtimes other than lmkit: ONNX Runtime (onnx.py) and llama.cpp's GGUF (gguf.py, with gguf_vocab.py
and gguf_card.py).

Each runtime is an optional extra, imported only when asked for. This package imports nothing heavy.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lmkit.errors import LmkitError


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or say in one line which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LmkitError(f"this needs {module}, which is not installed: pip install 'lmkit[{extra}]'") from None
