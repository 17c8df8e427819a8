"""Writing files and folders so that an interrupted write leaves nothing half-done."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from lmkit.errors import LmkitError

# Errors that only a write gives: a full disk or quota, a file over the size limit, a read-only mount.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def cannot_write(path: Path | str, e: OSError) -> LmkitError:
    """The one-line error for a write the file system refused (`cannot write PATH: No space left on device`)."""
    return LmkitError(f"cannot write {path}: {e.strerror or e}")


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and write (and remove) a file in it: an unwritable folder fails before
    long work rather than after it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except FileExistsError:  # a file where the folder should be
        raise LmkitError(f"cannot write {folder}: {os.strerror(errno.ENOTDIR)}") from None
    except OSError as e:
        raise cannot_write(folder, e) from None


def _os_error(e: BaseException) -> OSError | None:
    """`e` as an OSError: itself, or what a Rust-backed writer (safetensors) reports as `... (os error 28)`."""
    if isinstance(e, OSError):
        return e
    if isinstance(e, LmkitError):
        return None
    found = re.search(r"\(os error (\d+)\)", str(e))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def _refused_write(e: BaseException, *inside: Path) -> OSError | None:
    """The OSError behind `e` if it is a refused write (into one of `inside`), else None (a read error stays itself)."""
    err = _os_error(e)
    if err is None:
        return None
    if err.errno in WRITE_ERRNOS:
        return err
    names = [Path(os.fsdecode(n)) for n in (err.filename, err.filename2) if n is not None]
    return err if any(n == p or p in n.parents for n in names for p in inside) else None


def check_free(out: Path, overwrite: bool = False) -> None:
    """Refuse to replace a non-empty folder unless asked (checked before long work, and again on write)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LmkitError(f"out={out} exists and is not empty: choose another folder or pass overwrite=true")


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; when the block succeeds it is renamed to `out`.

    Nothing half-written is ever at `out`; replacing an existing folder removes it first, so a crash
    between the two steps leaves no folder rather than a mixed one.

    A full disk or an unwritable place is one `LmkitError` naming `out` (`cannot write OUT: ...`), with
    the temporary folder removed."""
    check_free(out, overwrite)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise cannot_write(out, e) from None
    try:
        yield tmp
        if out.is_dir():  # overwrite=true: the old folder goes just before the new one lands
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(tmp, out)
    except Exception as e:
        refused = _refused_write(e, tmp, out)
        if refused is None:
            raise
        raise cannot_write(out, refused) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through `write(file)`: into a temporary sibling, synced, then renamed over `path`.

    Readers see the old file or the whole new one, never half of it; a full disk or an unwritable
    folder is one `LmkitError` naming `path`, with the temporary file removed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # a full disk may only say so when the data reach it
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise cannot_write(path, e) from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
