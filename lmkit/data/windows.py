"""Batches of token windows drawn from a memmapped split, for training and evaluation.

Training batches are random windows, like nanoGPT's `get_batch`: batch `i` is a pure function of
`(seed, i)`, so a resumed run sees exactly the batches an uninterrupted one would, and rank `r`
of `W` takes its slice of the global batch, so W processes of batch B draw the same windows as
one process of batch W*B. Evaluation reads fixed, non-overlapping windows, each rank its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int, pin: bool = False) -> Batch:
    rows = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    if pin:  # page-locked, so the copy to the GPU is asynchronous and overlaps the previous step
        rows = rows.pin_memory()
    return rows[:, :-1], rows[:, 1:]


class TrainBatches:
    """An endless stream of random `(inputs, targets)` windows."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start: int = 0, pin_memory: bool = False) -> None:
        if len(tokens) < seq_len + 1:
            raise ValueError(f"the training split has {len(tokens)} tokens, fewer than data.seq_len+1={seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.start = seed, rank, world_size, start
        self.pin_memory = pin_memory

    def __iter__(self) -> Iterator[Batch]:
        i = self.start
        high = len(self.tokens) - self.seq_len
        while True:
            starts = np.random.default_rng((self.seed, i)).integers(0, high, size=self.world_size * self.batch_size)
            mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            yield _gather(self.tokens, mine, self.seq_len, self.pin_memory)
            i += 1


class EvalBatches:
    """Non-overlapping windows, at most `max_windows` spread evenly over the split, sharded by rank."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, max_windows: int | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        n = (len(tokens) - 1) // seq_len
        if n == 0:
            raise ValueError(f"an evaluation split has {len(tokens)} tokens, fewer than data.seq_len+1={seq_len + 1}")
        windows = np.arange(n)
        if max_windows and n > max_windows:
            windows = np.unique(np.linspace(0, n - 1, max_windows).round().astype(np.int64))
        self.starts = windows[rank::world_size] * seq_len
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.starts) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for i in range(0, len(self.starts), self.batch_size):
            yield _gather(self.tokens, self.starts[i:i + self.batch_size], self.seq_len)
