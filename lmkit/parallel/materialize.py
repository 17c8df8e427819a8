"""A model built on the meta device, made real shard by shard: no rank ever holds the whole model.

torchtitan's shape: build on the meta device, parallelise (tensor parallel, compile, FSDP2), then materialise. Here
each parameter's whole value is made on the CPU one parameter at a time — the backbone's own initialisation, drawn
from the seed in the order one process draws it (lmkit.backbones.init), or a pretrained model's tensor read from its
file (`PretrainedTensors`) — and each rank keeps the slice its placement gives it. Beyond its shards a rank holds one
whole tensor at a time (the embedding, at most).

Every rank reads every tensor itself, rather than rank zero reading and broadcasting (torch's
`set_model_state_dict(..., broadcast_from_rank0=True)`, which takes the whole state dict on rank zero): no rank holds
the whole model and no collective runs per tensor; after the first rank, the reads are page-cache hits. Measured:
bench/README.md, "sharded_init".
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lmkit.errors import LmkitError, first_line
from lmkit.sharded_checkpoint import MODEL_PREFIX, checked_reader, is_sharded_checkpoint, read_sharded_checkpoint
from lmkit.record import ModelRecord

Fill = Callable[[str, torch.Tensor], None]  # (parameter name, its whole tensor to fill in place)


def is_on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def shared_parameters(module: nn.Module) -> dict[str, str]:
    """Each alias of a shared parameter (a tied head) -> the name `named_parameters` lists it under."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def materialize(model: nn.Module, device: torch.device | str, fill: Fill) -> None:
    """Allocate `model`'s parameters (its shards, when parallelised) on `device` and fill them from `fill`, then
    rebuild its computed buffers (`model.reset_buffers()`)."""
    aliases = shared_parameters(model)
    model.to_empty(device=device)
    for alias, name in aliases.items():  # plain `to_empty` gives each alias its own tensor (FSDP2's keeps them)
        owner, _, leaf = alias.rpartition(".")
        if model.get_parameter(alias) is not model.get_parameter(name):
            setattr(model.get_submodule(owner), leaf, model.get_parameter(name))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            whole = torch.empty(parameter.shape, dtype=parameter.dtype)  # on the CPU: the draws one process makes
            fill(name, whole)
            if isinstance(parameter, DTensor):  # this rank's slice, cut from its own copy (no communication)
                piece = distribute_tensor(whole.to(parameter.device), parameter.device_mesh, parameter.placements,
                                          src_data_rank=None)
                parameter.to_local().copy_(piece.to_local())
            else:
                parameter.copy_(whole)
            del whole
    if hasattr(model, "reset_buffers"):  # (a part of a model: its model rebuilds them, `reset_meta_buffers`)
        model.reset_buffers()


def fill_part(part: nn.Module, pretrained: PretrainedTensors, prefix: str | Callable[[str], str] = "") -> None:
    """A meta-built part of a model (a block; a ModuleDict of some of its modules) made real on the CPU, each parameter
    read from `pretrained` under its name in the whole model (`prefix` + its name in `part`, or what `prefix` maps it
    to), one at a time: QLoRA quantizes each part as soon as it is filled (lmkit.lora.quantized_base)."""
    name_of = prefix if callable(prefix) else lambda name: prefix + name
    materialize(part, "cpu", lambda name, value: value.copy_(pretrained[name_of(name)]))


def reset_meta_buffers(model: nn.Module) -> None:
    """A model whose parts are real but whose own computed buffers (RoPE, sinusoid tables) are still on the meta
    device: allocated on the CPU and computed (`model.reset_buffers()`)."""
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = torch.empty_like(buffer, device="cpu")
    model.reset_buffers()


def initial_values(model: nn.Module, pretrained: PretrainedTensors | None = None) -> Fill:
    """What each parameter of `model` starts as: the pretrained model's tensor of that name (a LoRA-wrapped layer's
    `base.` left out of the name), or else what the nearest module that knows (`init_parameter`) draws for it: the
    backbone's init, a LoRA adapter's."""

    def fill(name: str, value: torch.Tensor) -> None:
        stored = name.replace(".base.", ".")
        if pretrained is not None and stored in pretrained:
            value.copy_(pretrained[stored])
            return
        parts = name.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            owner = model.get_submodule(".".join(parts[:cut]))
            if hasattr(owner, "init_parameter"):
                owner.init_parameter(".".join(parts[cut:]), value)
                return
        raise LookupError(f"no initial value for {name}")

    return fill


class SafetensorsFile:
    """A safetensors file read one tensor at a time with plain reads, into memory this process frees once the tensor
    is copied into its shard. (safetensors' own `safe_open` memory-maps the file, and every page a read touches stays
    in the process's resident set until the file is closed: by the last tensor, the whole model on every rank. The
    format is an 8-byte header length, a JSON header of dtypes, shapes and offsets, then the bytes.)"""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                self.header = json.loads(fh.read(size))
        except (OSError, ValueError) as e:
            raise LmkitError(f"{path} is not a readable safetensors file ({first_line(e)})") from None
        self.header.pop("__metadata__", None)
        self.data_start = 8 + size

    def read(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        value = torch.empty(entry["shape"], dtype=self.DTYPES[entry["dtype"]])
        raw = value.reshape(-1).view(torch.uint8).numpy()
        if raw.nbytes != end - begin:
            raise ValueError(f"{name}: {end - begin} bytes stored for {raw.nbytes}")
        with open(self.path, "rb") as fh:
            fh.seek(self.data_start + begin)
            if fh.readinto(memoryview(raw)) != raw.nbytes:
                raise ValueError(f"{name} is truncated")
        return value


class PretrainedTensors:
    """The backbone tensors of an lmkit model folder, a checkpoint file or a sharded checkpoint folder, by parameter
    name, each read when asked for (a checkpoint file is memory-mapped: its pages stay resident in each rank as it
    reads them; the other two are read into memory freed tensor by tensor). A tied alias (a head stored once, as
    the embedding) reads as the tensor it shares."""

    def __init__(self, path: Path, aliases: dict[str, str]) -> None:
        self.path, self.aliases = path, aliases
        if (path / "config.json").is_file():
            self._file = SafetensorsFile(path / "model.safetensors")
            self._names = set(self._file.header)
            self._read = self._file.read
            self._shape = lambda name: tuple(self._file.header[name]["shape"])
        elif is_sharded_checkpoint(path):
            from torch.distributed.checkpoint.metadata import TensorStorageMetadata

            self._reader = checked_reader(path)
            meta = self._reader.read_metadata().state_dict_metadata
            prefix = MODEL_PREFIX + "backbone."
            self._shapes = {k.removeprefix(prefix): item for k, item in meta.items()
                            if k.startswith(prefix) and isinstance(item, TensorStorageMetadata)}
            self._names = set(self._shapes)
            self._read = self._read_from_folder
            self._shape = lambda name: tuple(self._shapes[name].size)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
            self._state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
            self._names = set(self._state)
            self._read = self._state.__getitem__
            self._shape = lambda name: tuple(self._state[name].shape)

    def _read_from_folder(self, name: str) -> torch.Tensor:
        from torch.distributed.checkpoint import load

        item = self._shapes[name]
        value = torch.empty(item.size, dtype=item.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            load({"state_dict": {f"backbone.{name}": value}}, storage_reader=self._reader, no_dist=True)
        return value

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self._names

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._read(self.aliases.get(name, name))
        except Exception as e:
            raise LmkitError(f"init_from={self.path}: cannot read {name} ({first_line(e)})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape(self.aliases.get(name, name))

    def items(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return ((name, self[name]) for name in names)


def describe_pretrained(path: str | Path) -> tuple[ModelRecord, Any, bool]:
    """(record, tokenizer or None, whether it holds LoRA adapters alone) of an `init_from` model, read without its
    weights."""
    from lmkit.checkpoint import read_checkpoint
    from lmkit.data.tokenizer import tokenizer_from_json

    path = Path(path)
    if (path / "config.json").is_file():
        record = ModelRecord.from_file(path / "config.json")
        if not (path / "model.safetensors").is_file():
            raise LmkitError(f"init_from={path} has no model.safetensors")
        tok = path / "tokenizer.json"
        return record, tokenizer_from_json(tok.read_text(encoding="utf-8")) if tok.is_file() else None, False
    checkpoint = read_sharded_checkpoint(path, weights=False) if is_sharded_checkpoint(path) else \
        read_checkpoint(path, weights=False)
    record = ModelRecord.from_checkpoint(checkpoint, path)
    tok_json = checkpoint.get("lmkit", {}).get("tokenizer")
    return record, tokenizer_from_json(tok_json) if tok_json else None, bool(checkpoint.get("lmkit", {}).get("lora_base"))


def read_pretrained(path: str | Path, backbone: nn.Module) -> PretrainedTensors:
    """The tensors of `path` for `backbone` (a meta-device model of the same settings), checked name by name and
    shape by shape before any rank allocates anything."""
    tensors = PretrainedTensors(Path(path), shared_parameters(backbone))
    for name, parameter in backbone.named_parameters():
        if name not in tensors:
            raise LmkitError(f"init_from={path} has no tensor {name} for this model")
        if tensors.shape(name) != tuple(parameter.shape):
            raise LmkitError(f"init_from={path}: {name} is {list(tensors.shape(name))}, this model's is "
                             f"{list(parameter.shape)}")
    return tensors


__all__ = ["PretrainedTensors", "describe_pretrained", "fill_part", "initial_values", "is_on_meta",
           "materialize", "read_pretrained", "reset_meta_buffers", "shared_parameters"]
