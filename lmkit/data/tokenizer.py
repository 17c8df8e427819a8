"""Tokenizers: characters (the default) and byte-level BPE (trained with the `tokenizers` library).

Both serialise to one JSON string, saved as `tokenizer.json`: a BPE tokenizer in the `tokenizers`
library's own format (so `tokenizers.Tokenizer.from_file` reads it), a character tokenizer as
`{"lmkit_tokenizer": "char", "chars": ...}`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from lmkit.errors import LmkitError

END_OF_TEXT = "<|endoftext|>"  # the special token a trained BPE tokenizer reserves to end each document (GPT-2's)
BLANK_LINE = "\n\n"  # what separates documents for a tokenizer without END_OF_TEXT


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    end_of_text_id: int | None  # the END_OF_TEXT special token's id, when the vocabulary has one

    def encode(self, text: str) -> list[int]: ...
    def encode_array(self, text: str) -> np.ndarray: ...
    def encode_documents(self, documents: Sequence[str], lead: bool) -> np.ndarray: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def to_json(self) -> str: ...


class CharTokenizer:
    """One token per Unicode character; encoding is a table lookup over code points."""

    kind = "char"
    end_of_text_id = None  # documents are separated by a blank line, which it encodes as text

    def __init__(self, chars: str) -> None:
        if not chars:
            raise LmkitError("a character tokenizer needs at least one character")
        self.chars = chars
        self.vocab_size = len(chars)
        codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
        self._table = np.full(int(codes.max()) + 2, -1, dtype=np.int64)  # last slot: out of range
        self._table[codes] = np.arange(len(chars))

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = self._table[np.minimum(codes, len(self._table) - 1)]
        if (ids < 0).any():
            unknown = sorted({text[i] for i in np.flatnonzero(ids < 0)[:1000]})
            raise LmkitError(f"characters not in the tokenizer's vocabulary: {''.join(unknown)!r}")
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_documents(self, documents: Sequence[str], lead: bool) -> np.ndarray:
        """The documents joined by a blank line, with one before the first when `lead` (more came before)."""
        return self.encode_array((BLANK_LINE if lead else "") + BLANK_LINE.join(documents))

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"lmkit_tokenizer": "char", "version": 1, "chars": self.chars}, ensure_ascii=False)

    def to_tokenizers_json(self) -> str:
        """The same vocabulary as a `tokenizers` file, for runtimes without lmkit: a BPE model with no
        merges splits text into characters (one id each, as here), and its decoder joins them. Unlike
        `encode`, it drops characters outside the vocabulary rather than refusing them."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models

        tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(self.chars)}, merges=[]))
        tok.decoder = decoders.Fuse()
        return tok.to_str()

    @classmethod
    def from_tokenizers_json(cls, text: str) -> CharTokenizer:
        vocab = json.loads(text)["model"]["vocab"]
        return cls("".join(sorted(vocab, key=vocab.get)))


def byte_level(tok):
    """GPT-2's byte-level pre-tokenizer and decoder on a `tokenizers.Tokenizer`."""
    from tokenizers import decoders, pre_tokenizers

    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class BPETokenizer:
    """Byte-level BPE (GPT-2 style): any text encodes, nothing is unknown."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:  # a tokenizers.Tokenizer
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @property
    def end_of_text_id(self) -> int | None:
        return self.tokenizer.token_to_id(END_OF_TEXT)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Merges learned from `texts`, with END_OF_TEXT reserved as a special token (id 0): one id, never
        split, dropped by `decode`."""
        from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

        tok = byte_level(HFTokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[END_OF_TEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_documents(self, documents: Sequence[str], lead: bool) -> np.ndarray:
        """The documents, each after an END_OF_TEXT id when the vocabulary has one (the first only when `lead`:
        more came before); otherwise joined by a blank line, as text."""
        eot = self.end_of_text_id
        if eot is None:
            return self.encode_array((BLANK_LINE if lead else "") + BLANK_LINE.join(documents))
        self.tokenizer.encode_special_tokens = True  # a document that quotes "<|endoftext|>" is text, not an end
        try:
            encodings = self.tokenizer.encode_batch(list(documents))
        finally:
            self.tokenizer.encode_special_tokens = False
        ids: list[int] = []
        for i, encoding in enumerate(encodings):
            if i or lead:
                ids.append(eot)
            ids += encoding.ids
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def to_json(self) -> str:
        return self.tokenizer.to_str()


def tokenizer_from_json(text: str) -> Tokenizer:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise LmkitError(f"tokenizer JSON is not valid: {e}") from None
    if spec.get("lmkit_tokenizer") == "char":
        return CharTokenizer(spec["chars"])
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return BPETokenizer(HFTokenizer.from_str(text))
    except Exception as e:  # the Rust side raises plain Exceptions with a useful message
        raise LmkitError(f"not a tokenizer the `tokenizers` library can read: {e}") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise LmkitError(f"tokenizer file not found: {path}")
    return tokenizer_from_json(path.read_text(encoding="utf-8"))
