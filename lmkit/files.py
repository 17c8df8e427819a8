"""Writing files and folders so that an interrupted write leaves nothing half-done."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmkit.errors import LmkitError


def check_free(out: Path, overwrite: bool = False) -> None:
    """Refuse to replace a non-empty folder unless asked (checked before long work, and again on write)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LmkitError(f"out={out} exists and is not empty: choose another folder or pass overwrite=true")


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; when the block succeeds it is renamed to `out`.

    Nothing half-written is ever at `out`; replacing an existing folder removes it first, so a crash
    between the two steps leaves no folder rather than a mixed one."""
    check_free(out, overwrite)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.is_dir():  # overwrite=true: the old folder goes just before the new one lands
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
