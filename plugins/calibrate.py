"""What a layer reads, measured on calibration windows: the statistics activation-aware pruning needs.

Not a plugin: `prune` and `prune_structured` share it. For a weight named like a parameter of the
backbone (`transformer.h.0.mlp.c_fc.weight`, `rnn.weight_hh_l0`) it collects, over the tokens of
the calibration windows, the squared norm of each input column (Wanda's `||X_j||^2`), the Gram matrix
`X^T X` (SparseGPT's Hessian, up to a factor) or the Gram matrix of `[X, 1]` (what refitting a
weight together with its bias needs). The input of a Linear is what its
forward gets; an LSTM/GRU's input-to-hidden matrix of layer k reads that layer's input sequence,
and its hidden-to-hidden matrix reads the layer's own previous hidden state (zeros at t = 0, as a
calibration window starts from no state). nn.LSTM's fused kernel hides both, so the layers up to k
are re-run one at a time.

Each collection runs the model only as far as the layer in question (a hook stops the forward), so
pruning layer by layer on the already-pruned model (as Wanda and SparseGPT do) costs about half a
forward pass of the calibration set per weight matrix.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
import torch.nn as nn

Stat = Literal["norm", "gram", "affine_gram"]


class _Collected(Exception):
    """Raised by the hook once it has what it came for: the rest of the forward is not needed."""


def owner(backbone: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding parameter `name`, and the parameter's name in it."""
    module_name, _, attr = name.rpartition(".")
    return backbone.get_submodule(module_name), attr


def shifted(h: torch.Tensor) -> torch.Tensor:
    """h_{t-1} for each t of a (B, T, H) output sequence, zeros at t = 0."""
    return torch.cat([h.new_zeros(h.size(0), 1, h.size(2)), h[:, :-1]], dim=1)


@torch.no_grad()
def rnn_input(rnn: nn.LSTM | nn.GRU, x: torch.Tensor, attr: str) -> torch.Tensor:
    """What `rnn`'s weight `attr` (weight_ih_lK / weight_hh_lK) multiplies, for the input sequence `x`."""
    match = re.fullmatch(r"weight_(ih|hh)_l(\d+)", attr)
    if not match:
        raise ValueError(f"{attr} is not a recurrent weight matrix")
    kind, target = match.group(1), int(match.group(2))
    for layer in range(target + 1):
        if layer == target and kind == "ih":
            return x
        single = type(rnn)(x.size(-1), rnn.hidden_size, 1, batch_first=True, bias=rnn.bias).to(x.device)
        for part in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if rnn.bias else ()):
            getattr(single, f"{part}_l0").copy_(getattr(rnn, f"{part}_l{layer}"))
        x = single(x)[0]
    return shifted(x)


@torch.no_grad()
def collect(backbone: nn.Module, name: str, ids: torch.Tensor, stat: Stat, batch_size: int = 32) -> torch.Tensor:
    """`stat` of the input of weight `name` over the windows `ids` (N, T), summed over every token:
    per-column squared norms (a vector), the Gram matrix X^T X, or that of X with a column of ones
    appended (its last row and column hold the column sums and the token count)."""
    module, attr = owner(backbone, name)
    total: list[torch.Tensor] = []

    def add(x: torch.Tensor) -> None:
        x = x.reshape(-1, x.size(-1)).float()
        if stat == "affine_gram":
            x = torch.cat([x, x.new_ones(x.size(0), 1)], dim=1)
        value = x.pow(2).sum(0) if stat == "norm" else x.t() @ x
        total.append(value if not total else total.pop() + value)

    def hook(mod: nn.Module, args: tuple) -> None:
        x = args[0]
        add(x if isinstance(mod, nn.Linear) else rnn_input(mod, x, attr))
        raise _Collected

    handle = module.register_forward_pre_hook(hook)
    try:
        for chunk in ids.split(batch_size):
            try:
                backbone(chunk)
            except _Collected:
                pass
    finally:
        handle.remove()
    return total[0]
