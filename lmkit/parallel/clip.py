"""Gradient clipping by the global norm when parameters are DTensors sharded over one or two meshes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients so their global 2-norm is at most `max_norm`; return that norm (before clipping) as a
    plain tensor, the same number on every rank.

    `torch.nn.utils.clip_grad_norm_` needs every gradient on one mesh. Under 2D parallelism the blocks' matrices
    live on the (data, tensor) mesh and the embedding and norms on the data mesh alone, so each mesh's norm is
    reduced over its own shards (`full_tensor`) and the squares are summed."""
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            groups[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p)
    squares = []
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2)
    if not squares:
        return torch.zeros(())
    total = torch.stack(squares).sum().sqrt()
    for params in groups.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
