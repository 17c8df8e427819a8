"""Parquet files and Arrow IPC streams (a `datasets.save_to_disk` folder): one text column, a batch at a time.

Memory holds one row group's compressed text column and one batch of documents, never a whole file
(bench/README.md, scale: flat from 10 MB to 1 GB). pyarrow is an extra
(`pip install 'lmkit[parquet]'`), imported only when such a file is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmkit.errors import LmkitError, first_line

COLUMNAR_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}
BATCH_ROWS = 1024  # documents decoded at a time


def pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401  (the submodules are what the readers below use)
    except ImportError:
        raise LmkitError("reading Parquet or Arrow files needs pyarrow, which is not installed: "
                         "pip install 'lmkit[parquet]'") from None
    return pyarrow


def check_columnar(path: Path, kind: str, text_field: str) -> None:
    """Refuse, before anything is tokenized, a file that cannot be read or has no text column `text_field`."""
    if kind == "parquet":
        with _open_parquet(path) as parquet:
            _text_column(parquet.schema_arrow, path, text_field)
    else:
        with _open_stream(path) as (reader, _):
            _text_column(reader.schema, path, text_field)


def documents(path: Path, kind: str, text_field: str) -> Iterator[tuple[list[str], int]]:
    """`(documents, position)` for each batch of `path`: its non-empty texts (nulls skipped), and the byte
    position in the file the batch ends at (the last batch ends at the file's size)."""
    batches = _parquet_batches(path, text_field) if kind == "parquet" else _stream_batches(path, text_field)
    try:
        yield from batches
    except _arrow_errors() as e:
        raise LmkitError(f"{path}: cannot read it as {kind} ({first_line(e)})") from None


def dataset_folder_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a `datasets.save_to_disk` folder in their order, or None when `folder` is not one."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise LmkitError(f"data.path: {folder} holds several splits ({', '.join(splits)}): "
                         f"name one of them, e.g. data.path={folder / (splits[0] if splits else 'train')}")
    state = folder / "state.json"
    if not state.is_file():
        return None
    try:
        names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LmkitError(f"{state}: not a `datasets` state file (no _data_files list)") from None
    missing = [n for n in names if not (folder / n).is_file()]
    if missing or not names:
        raise LmkitError(f"{folder}: its state.json names Arrow files that are not there: "
                         f"{', '.join(missing) or 'none'}")
    return [folder / n for n in names]


def _arrow_errors() -> tuple[type[BaseException], ...]:
    return (pyarrow().ArrowException, OSError)


def _open_parquet(path: Path) -> Any:
    try:
        return pyarrow().parquet.ParquetFile(path)
    except _arrow_errors() as e:
        raise LmkitError(f"{path}: not a readable Parquet file ({first_line(e)})") from None


@contextmanager
def _open_stream(path: Path) -> Iterator[tuple[Any, Any]]:
    """An Arrow IPC stream reader, and the file under it, whose position tells how far the reading has come."""
    pa = pyarrow()
    with pa.OSFile(str(path)) as file:
        try:
            reader = pa.ipc.open_stream(file)
        except _arrow_errors() as e:
            raise LmkitError(f"{path}: not a readable Arrow IPC stream ({first_line(e)})") from None
        yield reader, file


def _text_column(schema: Any, path: Path, text_field: str) -> None:
    pa = pyarrow()
    if text_field not in schema.names:
        raise LmkitError(f"{path}: no column {text_field!r} (data.text_field); its columns: {', '.join(schema.names)}")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise LmkitError(f"{path}: column {text_field!r} (data.text_field) holds {kind}, not strings")


def _texts(column: Any) -> list[str]:
    return [text for text in column.to_pylist() if text]


def _parquet_batches(path: Path, text_field: str) -> Iterator[tuple[list[str], int]]:
    with _open_parquet(path) as parquet:
        _text_column(parquet.schema_arrow, path, text_field)
        start = 0
        for group, end in enumerate(_row_group_ends(parquet.metadata, text_field, path.stat().st_size)):
            rows, done = parquet.metadata.row_group(group).num_rows, 0
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=[text_field]):
                done += batch.num_rows
                yield _texts(batch.column(0)), start + (end - start) * done // max(rows, 1)
            start = end


def _row_group_ends(metadata: Any, text_field: str, file_size: int) -> list[int]:
    """Where each row group ends, as a byte position: the file's size shared out in proportion to the
    compressed size of each group's text column (the bytes that turn into tokens)."""
    sizes = []
    for group in range(metadata.num_row_groups):
        chunks = metadata.row_group(group)
        sizes.append(sum(chunks.column(i).total_compressed_size for i in range(chunks.num_columns)
                         if chunks.column(i).path_in_schema == text_field))
    total, ends, acc = sum(sizes) or 1, [], 0
    for size in sizes:
        acc += size
        ends.append(file_size * acc // total)
    if ends:
        ends[-1] = file_size
    return ends


def _stream_batches(path: Path, text_field: str) -> Iterator[tuple[list[str], int]]:
    with _open_stream(path) as (reader, file):
        _text_column(reader.schema, path, text_field)
        previous = None  # one batch held back: the last one ends at the file's end (after the end-of-stream mark)
        for batch in reader:
            if previous:
                yield previous
            previous = _texts(batch.column(text_field)), file.tell()
        if previous:
            yield previous[0], path.stat().st_size
