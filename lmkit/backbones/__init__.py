"""Backbones: plain `nn.Module`s with one interface, `forward(ids, state=None) -> (logits, state)`.

`init_state(batch_size)` gives the state that generation threads through calls (a KV cache or
the recurrent state); `stack_states(states)` merges the states of texts run apart (any lengths)
into one batch that continues together, and `select_states(state, rows)` keeps some rows: how a
server batches requests. `max_seq_len` is the context limit, or None for recurrent models. Each
backbone has a config dataclass whose `kind` names it; the registry maps a saved config's `kind`
to a class, so a saved config never names code to import.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch.nn as nn

from lmkit.backbones.lstm import LSTM, LSTMConfig
from lmkit.backbones.transformer import KVCache, Transformer, TransformerConfig

BackboneConfig = TransformerConfig | LSTMConfig
BACKBONES: dict[str, tuple[type[nn.Module], type[BackboneConfig]]] = {
    TransformerConfig.kind: (Transformer, TransformerConfig),
    LSTMConfig.kind: (LSTM, LSTMConfig),
}


def backbone_config(kind: str, vocab_size: int, **options: Any) -> BackboneConfig:
    """The config of the backbone named `kind`, from config keys; keys it does not have are errors."""
    if kind not in BACKBONES:
        raise ValueError(f"model.kind={kind!r} is not one of {', '.join(BACKBONES)}")
    config_cls = BACKBONES[kind][1]
    unknown = sorted(set(options) - {f.name for f in fields(config_cls)})
    if unknown:
        raise ValueError(f"model.kind={kind} has no option {', '.join(unknown)}")
    return config_cls(vocab_size=vocab_size, **options)


def build_backbone(config: BackboneConfig) -> nn.Module:
    return BACKBONES[config.kind][0](config)


__all__ = ["BACKBONES", "BackboneConfig", "backbone_config", "build_backbone", "KVCache", "LSTM", "LSTMConfig",
           "Transformer", "TransformerConfig"]
