"""A recurrent language model (LSTM or GRU) in plain torch.

`forward(ids, state)` returns `(logits, state)`: feed the state back in to continue a text
where the last call stopped, which is how generation stays O(1) per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn

RecurrentState = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class LSTMConfig:
    kind: ClassVar[str] = "lstm"  # the name configs and config.json use

    vocab_size: int
    n_layer: int = 1
    n_embd: int = 256
    hidden_size: int | None = None  # None: same as n_embd
    dropout: float = 0.0
    cell: Literal["lstm", "gru"] = "lstm"
    tie_weights: bool = True

    def num_parameters(self) -> int:
        """Parameters of the model this config builds, by arithmetic (known before anything is allocated)."""
        hidden, gates = self.hidden_size or self.n_embd, 4 if self.cell == "lstm" else 3
        total = self.vocab_size * self.n_embd  # the embedding (and the tied head)
        for layer in range(self.n_layer):
            inputs = self.n_embd if layer == 0 else hidden
            total += gates * hidden * (inputs + hidden + 2)  # weight_ih, weight_hh, two biases
        projected = self.tie_weights and hidden != self.n_embd
        total += hidden * self.n_embd if projected else 0
        head_inputs = self.n_embd if projected else hidden
        return total + (0 if self.tie_weights else self.vocab_size * head_inputs) + self.vocab_size  # head bias

    def __post_init__(self) -> None:
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"model.cell={self.cell!r} is not one of lstm, gru")


class LSTM(nn.Module):
    max_seq_len: int | None = None  # a recurrent model has no context limit

    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        self.config = cfg
        hidden = cfg.hidden_size or cfg.n_embd
        rnn = nn.LSTM if cfg.cell == "lstm" else nn.GRU
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.rnn = rnn(cfg.n_embd, hidden, cfg.n_layer, batch_first=True,
                       dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        # Tying needs the head's input width to equal the embedding width.
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=False) if cfg.tie_weights and hidden != cfg.n_embd else None
        self.head = nn.Linear(cfg.n_embd if self.proj is not None else hidden, cfg.vocab_size)
        if cfg.tie_weights:
            self.head.weight = self.embedding.weight
        # A wide embedding init: with GPT's 0.02 the tied head starts nearly silent and a char LSTM
        # spends its first few hundred steps near unigram loss (bench/README.md, LSTM embedding init).
        nn.init.normal_(self.embedding.weight, std=0.5)
        nn.init.zeros_(self.head.bias)

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> None:
        return None  # nn.LSTM starts from zeros when given no state

    def stack_states(self, states: list[RecurrentState]) -> RecurrentState:
        """One state for the rows of `states` (texts run apart, of any lengths), so they continue together."""
        if isinstance(states[0], tuple):
            return tuple(torch.cat(parts, dim=1) for parts in zip(*states))  # (h, c), each (layers, batch, hidden)
        return torch.cat(states, dim=1)

    def select_states(self, state: RecurrentState, rows: list[int]) -> RecurrentState:
        """The state of `rows` of `state` only (finished rows leave a batch)."""
        index = torch.tensor(rows, device=(state[0] if isinstance(state, tuple) else state).device)
        if isinstance(state, tuple):
            return tuple(part.index_select(1, index) for part in state)
        return state.index_select(1, index)

    def forward(self, ids: torch.Tensor, state: RecurrentState | None = None) -> tuple[torch.Tensor, RecurrentState]:
        out, state = self.rnn(self.drop(self.embedding(ids)), state)
        out = self.drop(out)
        if self.proj is not None:
            out = self.proj(out)
        return self.head(out), state
