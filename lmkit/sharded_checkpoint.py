"""Sharded checkpoint folders (torch.distributed.checkpoint, as Lightning's ModelParallelStrategy writes them).

A folder holds `.metadata` (which tensor pieces are in which file), one `__<rank>_0.distcp` per rank and
Lightning's `meta.pt` (loops, hyper-parameters, lmkit's tokenizer). It is read here without the training
processes: the model's tensors are consolidated in memory (optimizer state is left on disk), for export,
eval, generate and init_from. `.metadata` is a pickle, so it is read with an unpickler that rebuilds only
torch's checkpoint-metadata classes: loading never runs code named by a file.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from lmkit.errors import LmkitError, first_line

METADATA, META = ".metadata", "meta.pt"  # torch's index of the shards; Lightning's loop state and hyper-parameters
MODEL_PREFIX = "state_dict."  # how torch.distributed.checkpoint flattens Lightning's {"state_dict": {...}}


def is_sharded_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / METADATA).is_file()


def save_siblings(path: Path) -> tuple[Path, Path]:
    """Where a save of the folder `path` is written before it is renamed into place, and where the previous
    checkpoint steps aside meanwhile (lmkit.parallel.strategy.ShardedStrategy.save_checkpoint)."""
    return path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")


def recover_interrupted_save(path: Path) -> None:
    """Put a checkpoint back at `path` if a save was killed (SIGKILL, a lost node) between its two renames.

    A save writes every rank's shards into the temporary sibling; only once all have written does rank zero move
    the previous checkpoint aside and the new one into place. Killed while writing, `path` still holds the previous
    checkpoint; killed between the renames, `path` is missing, the previous one is the `.old` sibling and the new
    one, complete, the `.tmp` sibling: the new one goes back (the previous one if the new one is not whole).
    """
    tmp, old = save_siblings(path)
    if path.exists() or not old.exists():
        return
    try:
        os.replace(tmp if is_sharded_checkpoint(tmp) and (tmp / META).is_file() else old, path)
    except OSError:  # (gone, or `path` a folder again: another rank of the same launch put it back first)
        if not path.exists():
            raise


_DCP = "torch.distributed.checkpoint"


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds `.metadata`'s classes and nothing else: an exact list of names (a module-wide rule would let a
    dotted name such as `filesystem.pickle.Unpickler` reach an unrestricted unpickler), and torch's dtypes."""

    ALLOWED = {(f"{_DCP}.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
        (f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
        ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath")}  # (the module pathlib uses from 3.13)
    DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED or (module == "torch" and name in self.DTYPES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")


def read_metadata(path: Path) -> Any:
    """`.metadata` of the folder at `path`, rebuilt by `_MetadataUnpickler` (one line if it is not metadata)."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _MetadataUnpickler(io.BytesIO((path / METADATA).read_bytes())).load()
    except Exception as e:
        raise LmkitError(f"sharded checkpoint {path}: {METADATA} is not checkpoint metadata "
                         f"({first_line(e)})") from None
    if not isinstance(metadata, Metadata) or metadata.storage_data is None:
        raise LmkitError(f"sharded checkpoint {path}: {METADATA} is not checkpoint metadata")
    return metadata


def checked_reader(path: str | Path) -> Any:
    """torch's reader of the folder at `path`, reading `.metadata` with `_MetadataUnpickler`; made once every
    file the metadata names is there (one line if one is not). (torch.distributed.checkpoint is imported here,
    not at the top: it takes about a second, which `lmkit.load` of an artifact should not pay.)"""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata(Path(self.path))
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    path = Path(path)
    reader = SafeFileSystemReader(path)
    files = sorted({info.relative_path for info in reader.read_metadata().storage_data.values()})
    missing = [name for name in files if not (path / name).is_file()] + ([META] if not (path / META).is_file() else [])
    if missing:
        raise LmkitError(f"sharded checkpoint {path} is incomplete: {', '.join(missing)} missing "
                         f"(it has {len(files)} shard files, one per rank that wrote it)")
    return reader


def read_sharded_checkpoint(path: str | Path, *, weights: bool = True) -> dict[str, Any]:
    """The folder as one checkpoint dict, like `torch.load` of a full `.ckpt`: Lightning's `meta.pt` plus
    `state_dict`, the whole model's tensors (empty with `weights=False`; optimizer state is never read)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    path = Path(path)
    reader = checked_reader(path)
    try:
        checkpoint = torch.load(path / META, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LmkitError(f"sharded checkpoint {path}: {META} is corrupt or truncated ({first_line(e)})") from None
    model: dict[str, torch.Tensor] = {}
    if weights:
        metadata = reader.read_metadata()
        for key, item in metadata.state_dict_metadata.items():
            if key.startswith(MODEL_PREFIX) and isinstance(item, TensorStorageMetadata):
                model[key.removeprefix(MODEL_PREFIX)] = torch.empty(item.size, dtype=item.properties.dtype)
            elif key.startswith(MODEL_PREFIX) and isinstance(item, BytesStorageMetadata):
                raise LmkitError(f"sharded checkpoint {path}: {key} is not a tensor")
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                load({"state_dict": model}, storage_reader=reader, no_dist=True)
        except Exception as e:
            raise LmkitError(f"sharded checkpoint {path} is corrupt or truncated ({first_line(e)})") from None
    return {**checkpoint, "state_dict": model}
