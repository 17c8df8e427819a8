"""GPTQ (Frantar et al. 2022) onto a runtime's block grid (lmkit.blockquant).

Not a plugin: `int4` and `int8` share it. Columns are quantized one at a time, and each column's
rounding error is pushed onto the columns not yet quantized through the inverse Hessian H^-1 of the
layer's inputs (H = X^T X on calibration windows, damped by a fraction of its mean diagonal), in lazy
batches of 128 columns as the paper does. Scales are those of rounding to nearest, taken from each
block's current (already error-updated) values when the block's first column comes up. With
activation order the columns go by decreasing diag(H) (the inputs that matter most first); their
blocks stay the runtimes' contiguous blocks, so the scales are then fixed from the weights before
any update ("static groups", as llm-compressor does for grids that cannot reorder columns).
"""

from __future__ import annotations

import torch

from lmkit.blockquant import Grid, block_params, quantize_to
from lmkit.errors import first_line

LAZY_BATCH = 128


class Unfactorizable(ValueError):
    """The damped Hessian is not positive definite (or holds NaN/inf): the layer falls back to rounding."""


@torch.no_grad()
def gptq(weight: torch.Tensor, gram: torch.Tensor, grid: Grid, *, damp: float = 0.01, act_order: bool = False,
         keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes, scales, mins) of `weight` (rows, inputs) on `grid`, minimising the error of the layer's outputs
    on the inputs whose Gram matrix is `gram`. `keep`: a mask of weights that may be non-zero (pruned ones
    quantize to exactly zero, their error pushed on like any other). Raises Unfactorizable."""
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = gram.detach().float().clone()
    if not torch.isfinite(H).all():
        raise Unfactorizable("its Hessian holds NaN or infinite values")
    dead = H.diagonal() == 0  # inputs that were always zero: their weights do nothing
    H[dead, dead] = 1
    W[:, dead] = 0
    bs = grid.blocksize
    if act_order:
        scales, mins = block_params(W if keep is None else W * keep, grid)
        perm = torch.argsort(H.diagonal(), descending=True)
    else:
        scales = W.new_zeros(rows, cols // bs)
        mins = W.new_zeros(rows, cols // bs) if not grid.symmetric else None
        perm = torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    mask = keep[:, perm] if keep is not None else None
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError
        raise Unfactorizable(f"its damped Hessian is not positive definite ({first_line(e)})") from None
    codes = torch.zeros(rows, cols, dtype=torch.int8, device=W.device)
    step = max(LAZY_BATCH, bs)
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            block = col // bs
            if not act_order and col % bs == 0:  # the block starts here: its scale from its current values
                current = W1[:, i:i + bs] if mask is None else W1[:, i:i + bs] * mask[:, i1 + i:i1 + i + bs]
                s, m = block_params(current, Grid(grid.bits, grid.symmetric, bs))
                scales[:, block] = s[:, 0]
                if m is not None:
                    mins[:, block] = m[:, 0]
            w = W1[:, i]
            d, m = scales[:, block], mins[:, block] if mins is not None else None
            q = quantize_to(w.unsqueeze(1), d.unsqueeze(1), m.unsqueeze(1) if m is not None else None,
                            Grid(grid.bits, grid.symmetric, 1)).squeeze(1)
            if mask is not None:
                q = q * mask[:, i1 + i]
            codes[:, i1 + i] = q
            value = q.float() * d + (m if m is not None else 0)
            err = (w - value) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return codes[:, inverse].contiguous(), scales, mins
