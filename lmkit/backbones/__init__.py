"""Backbones: plain `nn.Module`s with one interface, `forward(ids, state=None) -> (logits, state)`.

`init_state(batch_size)` gives the state that generation threads through calls (a KV cache or
the recurrent state); `max_seq_len` is the context limit, or None for recurrent models. The
registry maps the config's `kind` to a class, so a saved config never names code to import.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch.nn as nn

from lmkit.backbones.lstm import LSTM, LSTMConfig
from lmkit.backbones.transformer import KVCache, Transformer, TransformerConfig

BACKBONES: dict[str, tuple[type[nn.Module], type]] = {
    "transformer": (Transformer, TransformerConfig),
    "lstm": (LSTM, LSTMConfig),
}


def build_backbone(kind: str, vocab_size: int, **options: Any) -> nn.Module:
    """Build the backbone named `kind` from config keys; keys the backbone does not have are errors."""
    if kind not in BACKBONES:
        raise ValueError(f"model.kind={kind!r} is not one of {', '.join(BACKBONES)}")
    cls, config_cls = BACKBONES[kind]
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"model.kind={kind} has no option {', '.join(unknown)}")
    return cls(config_cls(vocab_size=vocab_size, **options))


__all__ = ["BACKBONES", "build_backbone", "KVCache", "LSTM", "LSTMConfig", "Transformer", "TransformerConfig"]
