"""Reading a corpus as a stream of line-aligned text blocks, never whole.

A corpus is one or more `.txt` or `.jsonl` files (a path or a glob). Blocks never straddle the
split points (byte positions), so the train/val/test boundaries are exact without holding the
corpus in memory.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmkit.errors import LmkitError

BLOCK_BYTES = 1 << 20


@dataclass
class Corpus:
    files: list[Path]
    format: str = "auto"  # auto | txt | jsonl (auto: by file extension)
    text_field: str = "text"  # the field of each JSON line that holds the text
    errors: str = "strict"  # strict | replace: what to do with bytes that are not UTF-8
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        if self.errors not in ("strict", "replace"):
            raise LmkitError(f"data.errors={self.errors!r} is not one of strict, replace")
        if self.format not in ("auto", "txt", "jsonl"):
            raise LmkitError(f"data.format={self.format!r} is not one of auto, txt, jsonl")
        self.total_bytes = sum(f.stat().st_size for f in self.files)
        if self.total_bytes == 0:
            raise LmkitError(f"corpus is empty: {', '.join(map(str, self.files))}")

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

    def _is_jsonl(self, path: Path) -> bool:
        return self.format == "jsonl" or (self.format == "auto" and path.suffix == ".jsonl")

    def blocks(self, cuts: list[int] = ()) -> Iterator[tuple[str, int, int]]:
        """Yield `(text, segment, bytes_read)`: `segment` counts the cuts (absolute byte positions)
        passed before the block; each cut moves to the end of the line it falls in."""
        pending = sorted(cuts)
        base = 0  # absolute position of the current file's first byte
        segment = 0
        for path in self.files:
            jsonl = self._is_jsonl(path)
            for raw, offset in _line_blocks(path):
                start = base + offset
                while pending and pending[0] < start + len(raw):
                    cut = max(pending.pop(0) - start, 0)
                    if cut == 0:
                        segment += 1
                        continue
                    end = raw.find(b"\n", cut - 1) + 1 or len(raw)
                    yield self._decode(raw[:end], path, offset, jsonl), segment, start + end
                    raw, offset, start = raw[end:], offset + end, start + end
                    segment += 1
                if raw:
                    yield self._decode(raw, path, offset, jsonl), segment, start + len(raw)
            base += path.stat().st_size

    def _decode(self, raw: bytes, path: Path, offset: int, jsonl: bool) -> str:
        try:
            text = raw.decode("utf-8", errors=self.errors)
        except UnicodeDecodeError as e:
            raise LmkitError(f"{path}: bytes that are not UTF-8 at offset {offset + e.start} "
                             "(set data.errors=replace to substitute them)") from None
        if not jsonl:
            return text
        docs = []
        for line in text.split("\n"):  # not splitlines(): JSON strings may hold U+2028 and friends
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                docs.append(doc[self.text_field] + "\n\n")
            except (json.JSONDecodeError, TypeError, KeyError):
                raise LmkitError(f"{path}: a line near byte {offset} is not a JSON object with a "
                                 f"string field {self.text_field!r} (data.text_field): {line[:60]!r}") from None
        return "".join(docs)


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
    """The files a `data.path` names: a file, a directory's text files, or a glob (sorted)."""
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
            matches = sorted(m for m in Path(p).rglob("*") if m.suffix in (".txt", ".jsonl") and m.is_file())
            if not matches:
                raise LmkitError(f"data.path: the directory {p!r} holds no .txt or .jsonl files")
            files += matches
        elif Path(p).is_file():
            files.append(Path(p))
        else:
            raise LmkitError(f"data.path: no such file: {p}")
    return files
