"""Weights on the runtimes' block grids: the integers lmkit evaluates are the integers it ships.

A weight matrix (out, in) is cut along its input dimension into blocks of `blocksize` values; each
block keeps one fp16 scale `d` (and, asymmetric, one fp16 minimum `m`) and one small integer `q` per
value:

    int4 sym    q in -8..7     value q * d        llama.cpp Q4_0 (its byte is q + 8), MatMulNBits zero point 8
    int4 asym   q in 0..15     value q * d + m    llama.cpp Q4_1
    int8 sym    q in -127..127 value q * d        llama.cpp Q8_0

With blocks of 32 these are exactly llama.cpp's types, and (int4) onnxruntime's MatMulNBits, so an
export copies the codes and scales rather than quantizing again. How the codes are chosen (rounding
to nearest, GPTQ, activation-aware scales) is the plugins' business; this module holds the grid, the
layers that run it, and nothing of training. Exports (lmkit.deploy) read these layers' buffers.

Speed (bench/README.md, grids): int4 layers run torch's packed int4 CPU kernel
(`_weight_int4pack_mm_for_cpu`), which takes bf16 activations and bf16 scales; int8 layers keep a
dequantized fp32 copy (BlockQuantLinear says why). The `exact` path multiplies by the dequantized fp32
weight on each call, bit for bit the stored grid: what export checks compare with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

PACKED_BLOCKS = (32, 64, 128, 256)  # the block sizes torch's int4pack CPU kernel takes
# Narrower int4 layers multiply a kept fp32 copy: there the packed kernel generated slower than fp32 (whole models,
# batch 1: 0.72x at 4x128, 0.85x for the 128-wide Llama block, 1.23x at 6x384; bench/README.md, grids)
PACKED_MIN_INPUTS = 384


@dataclass(frozen=True)
class Grid:
    bits: int  # 4 or 8
    symmetric: bool
    blocksize: int = 32

    def __post_init__(self) -> None:
        if (self.bits, self.symmetric) not in ((4, True), (4, False), (8, True)):
            raise ValueError(f"no {self.bits}-bit {'sym' if self.symmetric else 'asym'} grid (int4 sym|asym, int8 sym)")

    @property
    def qmin(self) -> int:
        return {4: -8, 8: -127}[self.bits] if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return {4: 7, 8: 127}[self.bits] if self.symmetric else 15

    @property
    def gguf_type(self) -> str | None:
        """llama.cpp's name for this grid, or None where llama.cpp has no such tensor type."""
        if self.blocksize != 32:
            return None
        return {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}[(self.bits, self.symmetric)]

    def describe(self) -> str:
        return f"int{self.bits} g{self.blocksize} {'sym' if self.symmetric else 'asym'}"


def _blocks(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    rows, cols = weight.shape
    if cols % blocksize:
        raise ValueError(f"a width of {cols} is not a multiple of the block size {blocksize}")
    return weight.float().reshape(rows, cols // blocksize, blocksize)


def block_params(weight: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest scales (and minimums) of each block, already rounded to fp16 (held in fp32).

    Symmetric int4 follows llama.cpp's Q4_0: d = (the block's value of largest magnitude) / -8, so that
    value lands exactly on the grid's one-sided end; int8, d = absmax / 127; asymmetric, d = (max - min)
    / 15 and m = min. Shapes: (rows, blocks)."""
    b = _blocks(weight, grid.blocksize)
    if grid.symmetric and grid.bits == 4:
        index = b.abs().argmax(dim=-1, keepdim=True)
        scales = b.gather(-1, index).squeeze(-1) / -8
    elif grid.symmetric:
        scales = b.abs().amax(dim=-1) / 127
    else:
        low, high = b.amin(dim=-1), b.amax(dim=-1)
        return ((high - low) / 15).half().float(), low.half().float()
    return scales.half().float(), None


def quantize_to(weight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, grid: Grid) -> torch.Tensor:
    """The codes (int8) of `weight` on the grid of these block scales: round to nearest, clamped."""
    b = _blocks(weight, grid.blocksize)
    d = scales.unsqueeze(-1)
    shifted = b if mins is None else b - mins.unsqueeze(-1)
    q = torch.where(d != 0, shifted / torch.where(d != 0, d, 1), 0).round().clamp(grid.qmin, grid.qmax)
    return q.reshape(weight.shape).to(torch.int8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, blocksize: int) -> torch.Tensor:
    """q * d (+ m), in fp32: the values every runtime computes from these integers."""
    rows, cols = codes.shape
    values = codes.float().view(rows, cols // blocksize, blocksize) * scales.float().unsqueeze(-1)
    if mins is not None:
        values = values + mins.float().unsqueeze(-1)
    return values.view(rows, cols)


def round_to_nearest(weight: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes, scales, mins): what the runtimes' own quantizers do with a float weight."""
    scales, mins = block_params(weight, grid)
    return quantize_to(weight, scales, mins, grid), scales, mins


class BlockQuantWeight(nn.Module):
    """One matrix on a grid: codes (int8, one per value), scales and mins (fp16 values held in fp32).

    A tied head and its embedding hold the same BlockQuantWeight. Zero weights (pruned) are code 0 on the
    symmetric grids, so `prune`'s bitmask packing and the sparsity counts read true."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, grid: Grid) -> None:
        super().__init__()
        self.grid, self.shape = grid, tuple(codes.shape)
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("mins", mins.float().contiguous() if mins is not None else None)
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._dense: torch.Tensor | None = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = self._dense = None  # new codes: pack again on the next call

    def _apply(self, fn: Any, recurse: bool = True) -> BlockQuantWeight:
        self._packed = self._dense = None  # moved or cast: pack again where the codes now live
        return super()._apply(fn, recurse)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.mins, self.grid.blocksize)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (any shape) dequantized, only those."""
        flat = index.reshape(-1)
        mins = self.mins[flat] if self.mins is not None else None
        rows = dequantize(self.codes[flat], self.scales[flat], mins, self.grid.blocksize)
        return rows.view(*index.shape, self.shape[1])

    def dense(self) -> torch.Tensor:
        """The dequantized fp32 weight, built once: what an 8-bit layer multiplies at inference (see BlockQuantLinear)."""
        if self._dense is None:
            self._dense = self.dequantize()
        return self._dense

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """torch's int4pack layout: unsigned codes (value (u - 8) * scale + zero) and (blocks, rows, 2) bf16
        scales and zeros. Q4_0 is u = q + 8, zero 0; Q4_1 is u = q, zero = m + 8 d."""
        if self._packed is None:
            unsigned = self.codes.int() + (8 if self.grid.symmetric else 0)
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.contiguous(), 1)
            zeros = torch.zeros_like(self.scales) if self.mins is None else self.mins + 8 * self.scales
            scale_zeros = torch.stack([self.scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
            self._packed = (weight, scale_zeros)
        return self._packed


class BlockQuantLinear(nn.Module):
    """A Linear whose weight is on a grid. `kernel`:

    packed  int4 from 384 inputs wide: torch's int4 CPU kernel on bf16 activations (scales rounded to bf16 too);
            int8, and narrower int4 layers: the dequantized fp32 weight, built on first use and kept. torch has no CPU kernel for int8 blocks (its
            `_weight_int8pack_mm` takes one scale per row, which Q8_0's 32-value blocks are not), and dequantizing
            on each call ran at 0.41x fp32 (bench/README.md, grids): an int8 model is small on disk and in every
            export, and as fast as fp32, not smaller, in lmkit's own runtime.
    exact   the dequantized fp32 weight on each call, bit for bit the stored grid: what export checks compare with.

    int4 blocks the kernel does not take (16) or output widths that are not a multiple of 16, training (QLoRA's
    gradients) and non-CPU tensors run exact."""

    kernel = "packed"

    def __init__(self, quantized: BlockQuantWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.quantized = quantized
        self.out_features, self.in_features = quantized.shape
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None

    def path(self, x: torch.Tensor) -> str:
        """How this call multiplies: int4pack (torch's int4 kernel), dense (the kept fp32 copy) or exact."""
        grid = self.quantized.grid
        if self.kernel != "packed" or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return "exact"
        if grid.bits == 8 or self.in_features < PACKED_MIN_INPUTS:
            return "dense"
        # the int4 kernel packs rows 16 at a time (a 65-token head is not) and takes blocks of 32 to 256
        return "int4pack" if grid.blocksize in PACKED_BLOCKS and self.out_features % 16 == 0 else "exact"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.path(x)
        if path != "int4pack":
            weight = self.quantized.dense() if path == "dense" else self.quantized.dequantize()
            return F.linear(x.float(), weight, self.bias)
        weight, scale_zeros = self.quantized.packed()
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, weight, self.quantized.grid.blocksize, scale_zeros)
        y = y.float().view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class BlockQuantEmbedding(nn.Module):
    def __init__(self, quantized: BlockQuantWeight) -> None:
        super().__init__()
        self.quantized = quantized
        self.num_embeddings, self.embedding_dim = quantized.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.quantized.rows(ids)


def set_kernel(module: nn.Module, kernel: str) -> None:
    """Run every grid layer of `module` with `kernel` (packed | exact)."""
    if kernel not in ("packed", "exact"):
        raise ValueError(f"kernel={kernel!r} is not packed or exact")
    for layer in module.modules():
        if isinstance(layer, BlockQuantLinear):
            layer.kernel = kernel
