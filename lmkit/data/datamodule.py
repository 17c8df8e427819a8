"""LMDataModule: corpus -> tokenizer -> token cache -> train/val/test batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from lmkit.data.cache import TokenCache, build_or_open, wait_for
from lmkit.data.corpus import Corpus, resolve_files
from lmkit.data.shakespeare import shakespeare_text
from lmkit.data.tokenizer import Tokenizer
from lmkit.data.windows import EvalBatches, TrainBatches
from lmkit.distributed import data_parallel, local_rank
from lmkit.errors import LmkitError
from lmkit.files import atomic_write_text


def shakespeare_file(cache_dir: Path) -> Path:
    """The embedded corpus as one text file, written once (by a node's first rank; the others wait)."""
    path = cache_dir / "corpora" / "shakespeare.txt"
    if not path.exists() and local_rank() != 0:
        wait_for(path)
    if not path.exists():
        atomic_write_text(path, shakespeare_text())
    return path


class LMDataModule(L.LightningDataModule):
    """Built from the `data` config group (conf/data/), which holds every default: none is repeated here.

    `path`, `format`, `text_field` and `errors` describe files, so only `data=text` sets them."""

    def __init__(self, *, source: str, seq_len: int, batch_size: int, eval_batch_size: int | None,
                 val_windows: int | None, test_windows: int | None, split: tuple[float, float, float],
                 tokenizer: dict[str, Any], cache_dir: str, seed: int, path: str | list[str] | None = None,
                 format: str = "auto", text_field: str = "text", errors: str = "strict") -> None:
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise LmkitError(f"data.seq_len={seq_len} and data.batch_size={batch_size} must be positive")
        self.source, self.path = source, path
        self.corpus_options = dict(format=format, text_field=text_field, errors=errors)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_windows, self.test_windows = val_windows, test_windows
        self.split = list(split)
        self.tokenizer_spec = dict(tokenizer)
        self.cache_dir = Path(cache_dir).expanduser()
        self.seed = seed
        self.cache: TokenCache | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        self.prepare_data()
        return self.cache.tokenizer

    def corpus(self) -> Corpus:
        if self.source == "shakespeare":
            return Corpus([shakespeare_file(self.cache_dir)])
        if self.source == "text":
            if not self.path:
                raise LmkitError("data=text needs data.path=FILE, DIR or GLOB "
                                 "(.txt, .jsonl, .parquet or a datasets.save_to_disk folder)")
            return Corpus(resolve_files(self.path), **self.corpus_options)
        raise LmkitError(f"data.source={self.source!r} is not one of shakespeare, text")

    def prepare_data(self) -> None:
        # Idempotent, and safe on every rank: a node's first rank tokenizes, the others wait for its cache.
        if self.cache is None:
            self.cache = build_or_open(self.corpus(), self.tokenizer_spec, self.split, self.cache_dir,
                                       build=local_rank() == 0)
            for name in ("train", "val", "test"):
                n = len(self.cache.split(name))
                if n < self.seq_len + 1:
                    raise LmkitError(f"the {name} split has {n} tokens, fewer than data.seq_len+1={self.seq_len + 1}: "
                                     "use a larger corpus, a smaller data.seq_len or a larger data.split share")

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()

    def _rank(self) -> tuple[int, int]:
        return data_parallel(self.trainer)

    def train_dataloader(self) -> TrainBatches:
        rank, world = self._rank()
        # Batch i depends only on (seed, i): resuming at step s starts the stream at the batch s would see.
        start = self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer is not None else 0
        pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return TrainBatches(self.cache.split("train"), self.seq_len, self.batch_size, self.seed, rank, world, start,
                            pin_memory=pin)

    def val_dataloader(self) -> EvalBatches:
        return EvalBatches(self.cache.split("val"), self.seq_len, self.eval_batch_size, self.val_windows, *self._rank())

    def test_dataloader(self) -> EvalBatches:
        return EvalBatches(self.cache.split("test"), self.seq_len, self.eval_batch_size, self.test_windows, *self._rank())
