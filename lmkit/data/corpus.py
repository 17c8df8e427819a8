"""Reading a corpus as a stream of blocks of documents, never whole.

A corpus is one or more files (a path, a directory or a glob): `.txt` (each file one document),
`.jsonl` (each line one), Parquet or Arrow (each row one; lmkit/data/columnar.py). Blocks never straddle
the split points (byte positions), so the train/val/test boundaries are exact without holding the
corpus in memory. How documents are joined is the tokenizer's business (`encode_documents`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmkit.data.columnar import COLUMNAR_FORMATS, check_columnar, dataset_folder_files, documents
from lmkit.errors import LmkitError

BLOCK_BYTES = 1 << 20
FORMATS = ("auto", "txt", "jsonl", "parquet", "arrow")
DIRECTORY_SUFFIXES = (".txt", ".jsonl", ".parquet")  # what a directory given as data.path contributes


@dataclass
class Block:
    """A piece of the corpus, always inside one split: whole documents, except that a `.txt` file is one
    document read in several blocks, so the first document of a block may carry on the previous one's last."""
    documents: list[str]
    segment: int  # how many cuts (split points) lie before it
    bytes_read: int  # the absolute position in the corpus where the block ends
    continues: bool = False  # its first document is the rest of the previous block's last


@dataclass
class _Cuts:
    """The split points ahead (absolute byte positions), and the segment the text read next belongs to."""
    pending: list[int]
    segment: int = 0

    def before(self, position: int) -> bool:
        return bool(self.pending) and self.pending[0] < position

    def take(self) -> int:
        return self.pending.pop(0)


@dataclass
class Corpus:
    files: list[Path]
    format: str = "auto"  # auto | txt | jsonl | parquet | arrow (auto: by file extension)
    text_field: str = "text"  # the field of each JSON line, or the column, that holds the text
    errors: str = "strict"  # strict | replace: what to do with bytes that are not UTF-8
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        if self.errors not in ("strict", "replace"):
            raise LmkitError(f"data.errors={self.errors!r} is not one of strict, replace")
        if self.format not in FORMATS:
            raise LmkitError(f"data.format={self.format!r} is not one of {', '.join(FORMATS)}")
        self.total_bytes = sum(f.stat().st_size for f in self.files)
        if self.total_bytes == 0:
            raise LmkitError(f"corpus is empty: {', '.join(map(str, self.files))}")
        for path in self.files:  # a missing column or a broken file fails now, before any tokenizing
            if self.kind_of(path) in COLUMNAR_FORMATS.values():
                check_columnar(path, self.kind_of(path), self.text_field)

    def fingerprint(self) -> str:
        """A hash of the contents and of the settings that change what text they yield."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([self.format, self.text_field, self.errors]).encode())
        for f in self.files:
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(BLOCK_BYTES * 8):
                    h.update(chunk)
        return h.hexdigest()

    def kind_of(self, path: Path) -> str:
        if self.format != "auto":
            return self.format
        return "jsonl" if path.suffix == ".jsonl" else COLUMNAR_FORMATS.get(path.suffix, "txt")

    def blocks(self, cuts: list[int] = ()) -> Iterator[Block]:
        """The corpus in blocks of documents, file by file. Each cut (an absolute byte position) moves to the
        end of the line (.txt, .jsonl) or the document (Parquet, Arrow) it falls in."""
        state = _Cuts(sorted(cuts))
        base = 0  # absolute position of the current file's first byte
        for path in self.files:
            kind = self.kind_of(path)
            if kind in COLUMNAR_FORMATS.values():
                yield from self._columnar_blocks(path, kind, base, state)
            else:
                yield from self._line_file_blocks(path, kind, base, state)
            base += path.stat().st_size

    def _line_file_blocks(self, path: Path, kind: str, base: int, cuts: _Cuts) -> Iterator[Block]:
        for raw, offset in _line_blocks(path):
            start = base + offset
            continues = kind == "txt" and offset > 0  # a .txt file is one document; a JSON line is one
            while cuts.before(start + len(raw)):
                cut = max(cuts.take() - start, 0)
                if cut == 0:
                    cuts.segment += 1
                    continue
                end = raw.find(b"\n", cut - 1) + 1 or len(raw)
                yield Block(self._decode(raw[:end], path, offset, kind), cuts.segment, start + end, continues)
                raw, offset, start = raw[end:], offset + end, start + end
                continues = kind == "txt"
                cuts.segment += 1
            if raw:
                yield Block(self._decode(raw, path, offset, kind), cuts.segment, start + len(raw), continues)

    def _columnar_blocks(self, path: Path, kind: str, base: int, cuts: _Cuts) -> Iterator[Block]:
        start = base
        for docs, position in documents(path, kind, self.text_field):
            end = base + position
            while cuts.before(end):
                # the documents share the batch's bytes evenly: the cut falls after the first k of them
                cut, n = cuts.take(), len(docs)
                k = n if end <= start else min(n, max(0, math.ceil((cut - start) * n / (end - start))))
                if k:
                    at = start + (end - start) * k // n
                    yield Block(docs[:k], cuts.segment, at)
                    docs, start = docs[k:], at
                cuts.segment += 1
            if docs:
                yield Block(docs, cuts.segment, end)
            start = end

    def _decode(self, raw: bytes, path: Path, offset: int, kind: str) -> list[str]:
        try:
            text = raw.decode("utf-8", errors=self.errors)
        except UnicodeDecodeError as e:
            raise LmkitError(f"{path}: bytes that are not UTF-8 at offset {offset + e.start} "
                             "(set data.errors=replace to substitute them)") from None
        if kind != "jsonl":
            return [text]
        docs = []
        for line in text.split("\n"):  # not splitlines(): JSON strings may hold U+2028 and friends
            if not line.strip():
                continue
            try:
                doc = json.loads(line)[self.text_field]
            except (json.JSONDecodeError, TypeError, KeyError):
                doc = None
            if not isinstance(doc, str):
                raise LmkitError(f"{path}: a line near byte {offset} is not a JSON object with a "
                                 f"string field {self.text_field!r} (data.text_field): {line[:60]!r}")
            if doc:
                docs.append(doc)
        return docs


def _line_blocks(path: Path) -> Iterator[tuple[bytes, int]]:
    """Blocks of about BLOCK_BYTES that end at a newline (or the file's end), with their offsets."""
    offset, carry = 0, b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(BLOCK_BYTES)
            data = carry + chunk
            if not chunk:
                if data:
                    yield data, offset
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # a line longer than a block: keep reading
                carry = data
                continue
            yield data[:cut], offset
            offset += cut
            carry = data[cut:]


def resolve_files(pattern: str | list[str]) -> list[Path]:
    """The files a `data.path` names: a file, a glob (sorted), a `datasets.save_to_disk` folder's Arrow files,
    or the .txt, .jsonl and .parquet files under a directory."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    files: list[Path] = []
    for p in patterns:
        p = str(Path(p).expanduser())
        if glob.has_magic(p):
            matches = sorted(Path(m) for m in glob.glob(p, recursive=True) if Path(m).is_file())
            if not matches:
                raise LmkitError(f"data.path: the glob {p!r} matches no files")
            files += matches
        elif Path(p).is_dir():
            files += dataset_folder_files(Path(p)) or _directory_files(Path(p))
        elif Path(p).is_file():
            files.append(Path(p))
        else:
            raise LmkitError(f"data.path: no such file: {p}")
    return files


def _directory_files(folder: Path) -> list[Path]:
    matches = sorted(m for m in folder.rglob("*") if m.suffix in DIRECTORY_SUFFIXES and m.is_file())
    if not matches:
        raise LmkitError(f"data.path: the directory {str(folder)!r} holds no {', '.join(DIRECTORY_SUFFIXES)} files")
    return matches
