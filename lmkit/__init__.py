"""lmkit: train LSTM and Transformer language models with Lightning and Hydra, and ship them small.

`lmkit.load(path)` returns an exported model (or a checkpoint's) without importing Lightning or Hydra.
"""

from __future__ import annotations

from lmkit.version import __version__  # noqa: F401 (lmkit.__version__)


def load(path, device=None, dtype=None):
    """Load an lmkit artifact directory or a Lightning checkpoint as an `lmkit.inference.InferenceModel` in eval mode."""
    from lmkit.export import load as _load

    return _load(path, device=device, dtype=dtype)
