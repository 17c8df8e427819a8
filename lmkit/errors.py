"""User-facing errors: one line that names the problem and the value, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class LmkitError(Exception):
    """A problem with the user's input (a path, a config value, a file); its message is the whole story."""


def first_line(e: BaseException, limit: int | None = 160) -> str:
    """An exception's first line, cut to `limit` characters (its type's name when it has no message): the
    reason part of a one-line error about a file some library could not read."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


@contextmanager
def exit_on_user_error(code: int = 2) -> Iterator[None]:
    """Turn an `LmkitError` into `error: <message>` on stderr and a non-zero exit; Ctrl-C into exit 130."""
    try:
        yield
    except LmkitError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None
    except KeyboardInterrupt:  # Ctrl-C outside training (which handles its own): no traceback, the shell's code
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
