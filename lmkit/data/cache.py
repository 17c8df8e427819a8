"""The token cache: a corpus tokenized once into a flat uint16/uint32 file, read back as a memmap.

A cache entry is a directory named by a hash of the corpus contents, the tokenizer settings and
the split; it holds `tokens.bin`, `tokenizer.json` and `meta.json` (token count, dtype, split
offsets). It is built in a temporary directory and renamed into place under a file lock, so
concurrent ranks and interrupted runs never see half a cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lmkit.data.corpus import Block, Corpus
from lmkit.data.tokenizer import (BLANK_LINE, BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer,
                                  tokenizer_from_json)
from lmkit.errors import LmkitError
from lmkit.files import atomic_directory, cannot_write

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
# How documents are joined in the cache, part of its key so a cache built another way is never reused:
# 1 (before issue 23): a blank line after each JSON line, .txt files run together; 2: a separator between documents
# (files, JSON lines, rows), END_OF_TEXT where the tokenizer has it, else a blank line (Tokenizer.encode_documents).
DOCUMENT_JOIN = 2
SPLITS = ("train", "val", "test")


@dataclass
class TokenCache:
    path: Path
    tokenizer: Tokenizer
    n_tokens: int
    dtype: str
    bounds: list[int]  # token offsets: train = [b0, b1), val = [b1, b2), test = [b2, b3)

    def tokens(self) -> np.memmap:
        return np.memmap(self.path / "tokens.bin", dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    def split(self, name: str) -> np.ndarray:
        i = SPLITS.index(name)
        return self.tokens()[self.bounds[i]:self.bounds[i + 1]]

    @classmethod
    def open(cls, path: Path) -> TokenCache:
        meta = json.loads((path / "meta.json").read_text())
        tokenizer = tokenizer_from_json((path / "tokenizer.json").read_text(encoding="utf-8"))
        return cls(path, tokenizer, meta["n_tokens"], meta["dtype"], meta["bounds"])


def _validate_split(split: list[float]) -> list[float]:
    if len(split) != 3 or any(f < 0 for f in split) or split[0] <= 0 or abs(sum(split) - 1) > 1e-6:
        raise LmkitError(f"data.split={list(split)} must be three non-negative fractions (train, val, test) summing to 1")
    return list(split)


def cache_key(corpus_hash: str, tokenizer: dict, split: list[float]) -> str:
    spec = {"v": FORMAT_VERSION, "join": DOCUMENT_JOIN, "corpus": corpus_hash, "tokenizer": tokenizer, "split": split}
    if tokenizer.get("path"):  # a saved tokenizer: its contents matter, not its name
        if not Path(tokenizer["path"]).is_file():
            raise LmkitError(f"tokenizer.path: no such file: {tokenizer['path']}")
        spec["tokenizer"] = dict(tokenizer, path=hashlib.blake2b(Path(tokenizer["path"]).read_bytes()).hexdigest())
    return hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=12).hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "w")
    except OSError as e:
        raise cannot_write(path.parent, e) from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_tokenizer(spec: dict, texts: Callable[[bool, str | None], Iterator[str]]) -> Tokenizer:
    """`texts(train_only, separator)` streams the corpus's documents, with `separator` between them when given;
    BPE learns from the training split alone, and its END_OF_TEXT separator is a special token, not text."""
    kind = spec.get("kind")
    if kind == "char":  # the whole corpus, so val/test never meet an unknown char; and the blank line that joins
        return CharTokenizer.from_texts(texts(False, BLANK_LINE))
    if kind == "bpe":
        if spec.get("path"):
            return load_tokenizer(spec["path"])
        return BPETokenizer.train(texts(True, None), vocab_size=int(spec["vocab_size"]))
    if kind == "json":  # a tokenizer handed over inline (fine-tuning from an exported model)
        return tokenizer_from_json(spec["json"])
    if kind == "file":
        if not spec.get("path"):
            raise LmkitError("tokenizer=file needs tokenizer.path=PATH/tokenizer.json")
        return load_tokenizer(spec["path"])
    raise LmkitError(f"tokenizer.kind={kind!r} is not one of char, bpe, file, json")


def wait_for(path: Path, timeout_s: float = 24 * 3600) -> None:
    """Block until another process (local rank 0) has written `path`."""
    started = time.monotonic()
    while not path.exists():
        if time.monotonic() - started > timeout_s:
            raise LmkitError(f"gave up after {timeout_s:.0f} s waiting for local rank 0 to write {path}")
        time.sleep(0.5)


def build_or_open(corpus: Corpus, tokenizer: dict, split: list[float], cache_dir: str | Path,
                  build: bool = True) -> TokenCache:
    """Return the cache for this corpus and tokenizer, tokenizing only if no run has done it yet.

    With `build=False` (ranks other than a node's first) wait for the cache instead of writing it.
    """
    split = _validate_split(split)
    corpus_hash = corpus.fingerprint()
    path = Path(cache_dir).expanduser() / "tokens" / cache_key(corpus_hash, tokenizer, split)
    if (path / "meta.json").exists():
        log.info("Reusing token cache %s", path)
        return TokenCache.open(path)
    if not build:
        wait_for(path / "meta.json")
        return TokenCache.open(path)
    with _locked(path.with_suffix(".lock")):
        if (path / "meta.json").exists():  # another rank built it while we waited
            return TokenCache.open(path)
        with atomic_directory(path, overwrite=True) as tmp:
            _build(corpus, corpus_hash, tokenizer, split, tmp)
    cache = TokenCache.open(path)
    log.info("Tokenized %s bytes into %s tokens (vocab %d) at %s", f"{corpus.total_bytes:,}", f"{cache.n_tokens:,}",
             cache.tokenizer.vocab_size, path)
    return cache


def _build(corpus: Corpus, corpus_hash: str, spec: dict, split: list[float], out: Path) -> None:
    cuts = [int(corpus.total_bytes * split[0]), int(corpus.total_bytes * (split[0] + split[1]))]

    def texts(train_only: bool, separator: str | None) -> Iterator[str]:
        for block, lead in _with_leads(corpus.blocks(cuts)):
            if train_only and block.segment > 0:
                return
            for i, doc in enumerate(block.documents):
                if separator and (i or lead):
                    yield separator
                yield doc

    tokenizer = build_tokenizer(spec, texts)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    bounds, n = [0], 0
    show = corpus.total_bytes > 4 * (1 << 20)
    with open(out / "tokens.bin", "wb") as fh, tqdm(total=corpus.total_bytes, unit="B", unit_scale=True,
                                                   desc="Tokenizing", disable=not show) as bar:
        done = 0
        for block, lead in _with_leads(corpus.blocks(cuts)):
            while len(bounds) <= block.segment:
                bounds.append(n)
            ids = tokenizer.encode_documents(block.documents, lead).astype(dtype)
            fh.write(ids.data)  # (ndarray.tofile reports a full disk without its errno)
            n += len(ids)
            bar.update(block.bytes_read - done)
            done = block.bytes_read
    while len(bounds) < 4:
        bounds.append(n)
    if n == 0:
        raise LmkitError(f"corpus is empty after reading: {', '.join(map(str, corpus.files))}")
    (out / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    meta = {"version": FORMAT_VERSION, "n_tokens": n, "dtype": np.dtype(dtype).name, "bounds": bounds,
            "corpus": corpus_hash, "files": [str(f) for f in corpus.files], "tokenizer": spec, "split": split}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


def _with_leads(blocks: Iterator[Block]) -> Iterator[tuple[Block, bool]]:
    """Each block with whether a separator goes before its first document: one did come before, and the
    block does not carry it on."""
    seen = False
    for block in blocks:
        yield block, seen and bool(block.documents) and not block.continues
        seen = seen or bool(block.documents)
