"""A recurrent language model (LSTM or GRU) in plain torch.

`forward(ids, state)` returns `(logits, state)`: feed the state back in to continue a text
where the last call stopped, which is how generation stays O(1) per token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal

import math

import torch
import torch.nn as nn

from lmkit.backbones.init import init_weights, rng_untouched

RecurrentState = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

# torch runs a float32 nn.LSTM on the CPU through oneDNN (mkldnn) by default, which on one-token steps of
# small batches costs 2-6x what torch's own kernel does: batch 1 of the default 1x256 model took 0.4-1.5 ms
# against 0.07-0.1 ms (2x512: 3.3 against 1.6 ms). Inference steps of at most this many rows take torch's
# kernel; larger batches and every prefill (from 8 tokens oneDNN was as fast or faster) keep oneDNN.
# Measured by bench/lstm_cpu.py: bench/README.md, "lstm_cpu", and bench/results/lstm_cpu.json. The two
# paths' logits differ by float32 rounding only: at most 2e-6 there, over a 64-token prefill and 16 steps.
ONEDNN_OFF_MAX_BATCH = 16
ONEDNN_OFF_MAX_TOKENS = 1


@contextmanager
def onednn_off() -> Iterator[None]:
    """Run the block with oneDNN off, then on again (callers enter only while it is on).

    Not `torch.backends.mkldnn.flags(enabled=False)`: in torch 2.13 that also resets the deterministic,
    TF32 and fp32-precision settings for the block, warns about TF32 on every CPU build at each use and
    costs ~11 us against ~0.3 us for the flag alone. The flag is process-wide, not per thread: that is
    acceptable because each decoding loop (lmkit generate, InferenceModel.generate, the serve engine's
    decoding thread) is one thread, and training, which must keep oneDNN, does not run beside it. Two
    inference threads overlapping still leave it on: each restores the value it found, which was on.
    """
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True


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
        with rng_untouched():
            self.embedding = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.drop = nn.Dropout(cfg.dropout)
            self.rnn = rnn(cfg.n_embd, hidden, cfg.n_layer, batch_first=True,
                           dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
            # Tying needs the head's input width to equal the embedding width.
            self.proj = nn.Linear(hidden, cfg.n_embd, bias=False) if cfg.tie_weights and hidden != cfg.n_embd else None
            self.head = nn.Linear(cfg.n_embd if self.proj is not None else hidden, cfg.vocab_size)
        if cfg.tie_weights:
            self.head.weight = self.embedding.weight
        if not self.head.weight.is_meta:  # (on the meta device, whoever materialises it initialises it)
            init_weights(self)

    def init_parameter(self, name: str, value: torch.Tensor) -> None:
        """The initial value of parameter `name` into `value` (its whole tensor): torch's own for the recurrent
        matrices and the untied head, a wide embedding, a zero head bias."""
        if name == "embedding.weight":
            # A wide embedding init: with GPT's 0.02 the tied head starts nearly silent and a char LSTM
            # spends its first few hundred steps near unigram loss (bench/README.md, LSTM embedding init).
            nn.init.normal_(value, std=0.5)
        elif name == "head.bias":
            nn.init.zeros_(value)
        elif name.startswith("rnn."):  # as nn.LSTM/nn.GRU's reset_parameters
            bound = 1 / math.sqrt(self.rnn.hidden_size)
            nn.init.uniform_(value, -bound, bound)
        else:  # proj.weight, an untied head.weight: as nn.Linear's reset_parameters
            nn.init.kaiming_uniform_(value, a=math.sqrt(5))

    def reset_buffers(self) -> None:
        """(nothing is computed: the recurrent model has no buffers)"""

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

    def skips_onednn(self, x: torch.Tensor) -> bool:
        """Whether this call of the rnn on `x` (B, T, C) should run torch's own kernel (ONEDNN_OFF_MAX_BATCH).

        Inference only: training (train mode with grad) keeps oneDNN's path and its numerics, and so does
        validation, whose calls are whole windows, not one-token steps. GRUs have no oneDNN kernel; the
        measurement is of float32 on the CPU (CPU autocast would run the LSTM in bf16); under torch.compile
        the backbone keeps torch's default.
        """
        return (isinstance(self.rnn, nn.LSTM) and not torch.compiler.is_compiling()
                and not (self.training and torch.is_grad_enabled())
                and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and x.size(0) <= ONEDNN_OFF_MAX_BATCH and x.size(1) <= ONEDNN_OFF_MAX_TOKENS
                and torch.backends.mkldnn.enabled)

    def forward(self, ids: torch.Tensor, state: RecurrentState | None = None) -> tuple[torch.Tensor, RecurrentState]:
        x = self.drop(self.embedding(ids))
        if self.skips_onednn(x):
            with onednn_off():
                out, state = self.rnn(x, state)
        else:
            out, state = self.rnn(x, state)
        out = self.drop(out)
        if self.proj is not None:
            out = self.proj(out)
        return self.head(out), state
