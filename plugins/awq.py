"""Activation-aware scales (AWQ, Lin et al. 2023), folded into the model so no export needs an extra op.

Not a plugin: `int4` and `int8` run it before rounding or GPTQ. For each group of linears that read
one input and the layer that writes it (a block's norm before q/k/v, the norm before the MLP, SwiGLU's
up projection before the down projection), each input channel j gets a scale s_j = rms(x_j)^alpha
(normalised so that max * min = 1): the linears' columns are multiplied by s and the writer's output
divided by it, which leaves the float model's function unchanged and gives the channels that carry
large activations finer steps on the grid. alpha is searched on a grid of 20 values per group by the
groups' output error after rounding to nearest, measured exactly from the Gram matrix G = X^T X of the
calibration inputs: ||X (W - W')^T||^2 = sum((W - W') G (W - W')^T). alpha = 0 is plain rounding, so
the search never chooses worse than rounding on the calibration windows.

AWQ measures mean |x|; the Gram matrix has the mean square, so lmkit uses rms(x). The attention output
projection is left unscaled (folding into v would need equal scales across the query heads a kv head
serves). An LSTM has no writer to fold into: it is left as it is, said in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from lmkit.backbones.transformer import Block, SwiGLU
from lmkit.blockquant import Grid, dequantize, round_to_nearest
from lmkit.builtin_plugins.calibrate import collect

ALPHAS = [i / 20 for i in range(20)]


def scaled_groups(backbone: nn.Module) -> list[tuple[nn.Module, list[nn.Linear], str]]:
    """(writer, readers, the first reader's weight name) for every foldable group, in forward order."""
    groups = []
    for name, block in backbone.named_modules():
        if not isinstance(block, Block):
            continue
        groups.append((block.ln_1, [block.attn.c_attn], f"{name}.attn.c_attn.weight"))
        if isinstance(block.mlp, SwiGLU):
            groups.append((block.ln_2, [block.mlp.gate, block.mlp.up], f"{name}.mlp.gate.weight"))
            groups.append((block.mlp.up, [block.mlp.c_proj], f"{name}.mlp.c_proj.weight"))
        else:
            groups.append((block.ln_2, [block.mlp.c_fc], f"{name}.mlp.c_fc.weight"))
    return groups


def output_error(weight: torch.Tensor, scales: torch.Tensor, gram: torch.Tensor, grid: Grid) -> float:
    """sum((W - W') G (W - W')^T) for W' = round(W diag(s)) diag(s)^-1 on `grid`."""
    codes, d, m = round_to_nearest(weight * scales, grid)
    delta = weight - dequantize(codes, d, m, grid.blocksize) / scales
    return float(((delta @ gram) * delta).sum())


def search(weights: list[torch.Tensor], gram: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, float, float]:
    """(scales, alpha, error relative to rounding's) minimising the group's output error."""
    rms = gram.diagonal().clamp(min=0).sqrt().clamp(min=1e-6)
    best: tuple[float, float, torch.Tensor] | None = None
    for alpha in ALPHAS:
        s = rms ** alpha
        s = s / (s.max() * s.min()).sqrt()
        error = sum(output_error(w, s, gram, grid) for w in weights)
        if best is None or error < best[0]:
            best = (error, alpha, s)
        if alpha == 0:
            plain = error
    error, alpha, s = best
    return s, alpha, error / plain if plain else 1.0


@torch.no_grad()
def fold(writer: nn.Module, readers: list[nn.Linear], scales: torch.Tensor) -> None:
    """Multiply the readers' input columns by `scales` and divide the writer's outputs by them."""
    for reader in readers:
        reader.weight.mul_(scales)
    if isinstance(writer, nn.Linear):
        writer.weight.div_(scales.unsqueeze(1))
    else:
        writer.weight.div_(scales)
    if getattr(writer, "bias", None) is not None:
        writer.bias.div_(scales)


def apply_awq(backbone: nn.Module, ids: torch.Tensor, grid: Grid, log: Callable[[str], Any]) -> dict[str, Any]:
    """Search and fold the scales of every group, in forward order (each measured with the earlier ones folded)."""
    groups = scaled_groups(backbone)
    if not groups:
        log("awq: this model has no layer to fold scales into (an LSTM's matrices read the state directly): "
            "no scales applied")
        return {"awq_groups": 0}
    gains = []
    for writer, readers, name in groups:
        gram = collect(backbone, name, ids, "gram")
        scales, alpha, ratio = search([r.weight.detach().float() for r in readers], gram, grid)
        fold(writer, readers, scales)
        gains.append(ratio)
    mean = sum(gains) / len(gains)
    log(f"awq: scales folded into {len(groups)} groups; output error on the calibration windows "
        f"{mean:.3f}x rounding's (mean over groups)")
    return {"awq_groups": len(groups), "awq_error_ratio": round(mean, 4)}
