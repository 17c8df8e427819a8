"""Tensor helpers shared by the artifact format, the reports and the plugins. Imports torch only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

# quantization scales (int8's per row, int4's and the grids' per block) and format flags: not parameters of the model
BOOKKEEPING = ("SCB", "absmax", "weight_format", "scales", "mins")


def unique_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (a tied head is the embedding: stored once)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    tensors = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.nbytes, tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.contiguous()
    return tensors


def load_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into `module` in place; names it lacks must be aliases of ones it has (tied)."""
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    own = module.state_dict()
    loaded = {(t.data_ptr(), t.nbytes) for name, t in own.items() if name in tensors}
    untied = [name for name in missing if (own[name].data_ptr(), own[name].nbytes) not in loaded]
    if untied or unexpected:
        raise ValueError(f"missing {untied[:3]}, unexpected {unexpected[:3]}")


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters): each shared tensor once, quantization scales excluded.

    Counted from the state dict, so int8 weights held as buffers count too."""
    tensors = [t for name, t in unique_tensors(module).items() if name.rsplit(".", 1)[-1] not in BOOKKEEPING]
    return sum(t.numel() for t in tensors), sum(int((t != 0).sum()) for t in tensors)


def swap_modules(root: nn.Module, convert: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace each submodule for which `convert` returns a module; recurse into the others."""
    replaced = convert(root)
    if replaced is not None:
        return replaced
    for name, child in list(root.named_children()):
        setattr(root, name, swap_modules(child, convert))
    return root


def once_per_tensor(make: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    """`make(tensor)`, computed once per tensor object: layers that share (tie) a weight share the result.

    Each tensor is held alongside its result, so its id cannot be reused by a temporary (UnrolledRNN
    builds a Linear per projection) and hand another weight's result back."""
    made: dict[int, tuple[torch.Tensor, Any]] = {}

    def get(tensor: torch.Tensor) -> Any:
        if id(tensor) not in made:
            made[id(tensor)] = (tensor, make(tensor))
        return made[id(tensor)][1]

    return get


@torch.no_grad()
def round_to_half(backbone: nn.Module) -> None:
    """Round every float32 tensor (scales, biases, norms) to the nearest fp16 value, in place."""
    for tensor in backbone.state_dict().values():  # detached views: copy_ writes the module's storage
        if tensor.dtype == torch.float32 and tensor.numel() and tensor.abs().max() < torch.finfo(torch.float16).max:
            tensor.copy_(tensor.half().float())


def half_where_lossless(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 tensors whose values fp16 holds exactly, as fp16 (loading copies them back into float32)."""
    out = {}
    for name, t in tensors.items():
        half = t.half() if t.dtype == torch.float32 else None
        out[name] = half if half is not None and torch.equal(half.float(), t) else t
    return out
