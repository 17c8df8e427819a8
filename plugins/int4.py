"""`int4`: 4-bit weights, on a runtime's grid (`quant_type=sym|asym`: llama.cpp's Q4_0/Q4_1, onnxruntime's
MatMulNBits; plugins/gridquant.py, calibrated with GPTQ and activation-aware scales) or through
bitsandbytes' NF4 or FP4 blockwise quantization (`quant_type=nf4|fp4`, described below).

Every weight matrix (linear layers, the LSTM's input and recurrent matrices, and with `embeddings`
the token and position embeddings, which a tied head shares) is split into blocks of `blocksize`
consecutive values, each stored as 4-bit codes (two per byte) and one absmax scale: NF4's 16 codes
are the quantiles of a normal distribution (QLoRA, Dettmers et al. 2023), FP4's a 4-bit float.
About an eighth of the fp32 bytes plus the scales. The scales, biases and norm gains are rounded to
fp16 when quantizing and stored as fp16, so the model in memory is exactly the model on disk.

Layers dequantize their weight on each call (as bitsandbytes' `matmul_4bit` does on a CPU) and
multiply in fp32: 4-bit buys size, not speed, here. An `nn.LSTM`/`nn.GRU` is
unrolled into per-layer linears as `int8` does it; an embedding dequantizes only the rows it gathers.

Both NF4 and FP4 have an exact zero, which pruned weights keep; in memory the codes are shifted so
that it is byte 0, so `[prune,int4]` stores `prune`'s bitmask plus the non-zero codes, two per byte.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmkit.backbones.unrolled import UnrolledRNN
from lmkit.errors import LmkitError
from lmkit.plugins import CompressContext, Plugin
from lmkit.tensors import half_where_lossless, once_per_tensor, round_to_half, swap_modules
from lmkit.builtin_plugins import gridquant
from lmkit.builtin_plugins.prune import VALUES as PRUNED_VALUES

NIBBLES, SHAPE = ".__nibbles", ".__nibble_shape"


@cache
def code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16 values of NF4's or FP4's codes, as bitsandbytes defines them."""
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type(quant_type, device)


def zero_code(quant_type: str) -> int:
    """The 4-bit code of 0.0 (NF4: 7, FP4: 0): what a pruned weight quantizes to."""
    return int((code_table(quant_type, torch.device("cpu")) == 0).nonzero()[0])


def nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes (any shape, one per byte) two per byte, the first in the high half (bitsandbytes' layout)."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4) | flat[1::2]


def unnibble(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:numel]


class Int4Weight(nn.Module):
    """A matrix as 4-bit codes and one absmax per block of `blocksize` consecutive values.

    In memory the codes are one per byte and shifted so that 0 is the code of 0.0 (XOR with it): a
    weight that is zero (pruned) has a zero byte, so parameter and sparsity counts read true, and
    `prune`'s bitmask packing works on them; on disk `pack` puts two in a byte. A tied head and its
    embedding hold the same buffers."""

    def __init__(self, weight: torch.Tensor, quant_type: str, blocksize: int) -> None:
        super().__init__()
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(weight.detach().float().contiguous(), blocksize=blocksize,
                                           quant_type=quant_type)
        self.shape, self.quant_type, self.blocksize = tuple(weight.shape), quant_type, blocksize
        self.zero = zero_code(quant_type)
        self.register_buffer("codes", unnibble(packed.reshape(-1), weight.numel()).view(weight.shape) ^ self.zero)
        # rounded to fp16 now: stored as fp16, so what runs is what is stored
        self.register_buffer("absmax", state.absmax.half().float())

    def dequantize(self, codes: torch.Tensor | None = None, absmax: torch.Tensor | None = None) -> torch.Tensor:
        """code value * its block's absmax: bitsandbytes' dequantize_4bit, done by a table lookup on the
        unpacked codes (4x faster on a CPU than repacking them for bitsandbytes; a test checks they agree)."""
        codes = self.codes if codes is None else codes
        absmax = self.absmax if absmax is None else absmax
        values = code_table(self.quant_type, absmax.device)[(codes ^ self.zero).long()].reshape(-1)
        pad = -values.numel() % self.blocksize  # the last block may be partial
        blocks = F.pad(values, (0, pad)).view(-1, self.blocksize) * absmax.unsqueeze(1)
        return blocks.reshape(-1)[: values.numel()].view(codes.shape)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (any shape) dequantized: only those, when rows fill whole blocks."""
        n_rows, dim = self.shape
        if dim % self.blocksize:
            return F.embedding(index, self.dequantize())
        flat = index.reshape(-1)
        rows = self.dequantize(self.codes[flat], self.absmax.view(n_rows, -1)[flat].reshape(-1))
        return rows.view(*index.shape, dim)


class Int4Linear(nn.Module):
    def __init__(self, quantized: Int4Weight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.quantized = quantized
        self.out_features, self.in_features = quantized.shape
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if torch.is_grad_enabled() and x.requires_grad:  # under LoRA adapters (QLoRA): see Int4MatMul
            return Int4MatMul.apply(x, self.quantized, self.bias)
        return F.linear(x, self.quantized.dequantize(), self.bias)


class Int4MatMul(torch.autograd.Function):
    """`x @ W.T + bias` for a frozen 4-bit W that is dequantized in the forward and again in the backward, never
    kept in between: autograd would otherwise save every layer's float weight until the backward pass, a full fp32
    copy of the model (measured: 431 MB against the float base's 108 MB at GPT-2 small's shape), which is what a
    4-bit base is there to avoid. bitsandbytes' MatMul4Bit does the same."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, quantized: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.quantized = quantized
        return F.linear(x, quantized.dequantize(), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad @ ctx.quantized.dequantize(), None, None  # the weight and bias are frozen


class Int4Embedding(nn.Module):
    def __init__(self, quantized: Int4Weight) -> None:
        super().__init__()
        self.quantized = quantized
        self.num_embeddings, self.embedding_dim = quantized.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.quantized.rows(ids)


def quantize(backbone: nn.Module, quant_type: str, blocksize: int, embeddings: bool) -> nn.Module:
    """Swap every Linear and LSTM/GRU (and with `embeddings` every Embedding) for its 4-bit form, keeping ties."""

    @once_per_tensor  # tied layers share one Int4Weight (its buffers appear under both names)
    def int4(weight: torch.Tensor) -> Int4Weight:
        return Int4Weight(weight, quant_type, blocksize)

    def linear(module: nn.Linear) -> nn.Module:
        if not embeddings and id(module.weight) in embedding_weights:  # a head tied to a float embedding
            return module
        return Int4Linear(int4(module.weight), module.bias)

    def convert(module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Linear):
            return linear(module)
        if isinstance(module, nn.Embedding):
            return Int4Embedding(int4(module.weight)) if embeddings else module
        if isinstance(module, (nn.LSTM, nn.GRU)):
            return UnrolledRNN(module, linear)
        return None

    embedding_weights = {id(m.weight) for m in backbone.modules() if isinstance(m, nn.Embedding)}
    backbone = swap_modules(backbone, convert)
    round_to_half(backbone)
    return backbone


class Int4(gridquant.OnGrid, Plugin):
    name = "int4"
    summary = ("4-bit weights in blocks: llama.cpp/ONNX grids (sym, asym; rtn, gptq, awq) or bitsandbytes NF4/FP4; "
               "~0.15x bytes")
    defaults = {"quant_type": "nf4", "blocksize": None, "embeddings": True, "method": "rtn", "awq": False,
                "act_order": False, "damp": 0.01, "calibration_windows": 128, "head_bits": 8}
    quantizes = True
    bits = 4

    @property
    def blocksize(self) -> int:
        return self.settings["blocksize"] or (32 if self.on_grid else 64)

    def check(self) -> None:
        s = self.settings
        if s["quant_type"] not in ("nf4", "fp4", *gridquant.GRID_TYPES):
            raise LmkitError(f"compression.int4.quant_type={s['quant_type']!r} is not one of nf4, fp4, sym, asym")
        if self.on_grid:
            self.plan  # noqa: B018 (checks the grid's settings)
            return
        self.check_off_grid(f"{s['quant_type']} is bitsandbytes' own code")
        bs = self.blocksize
        if bs < 32 or bs > 4096 or bs & (bs - 1):
            raise LmkitError(f"compression.int4.blocksize={bs} must be a power of two from 32 to 4096")

    def describe(self) -> str:
        s = self.settings
        if self.on_grid:
            return f"int4 {self.plan.describe()}" + ("" if s["embeddings"] else ", float embeddings")
        return f"{s['quant_type']}, blocks of {self.blocksize}" + ("" if s["embeddings"] else ", float embeddings")

    def _quantize(self, backbone: nn.Module) -> nn.Module:
        if self.on_grid:
            return self.grid_structure(backbone)
        backbone = quantize(backbone, self.settings["quant_type"], self.blocksize, self.settings["embeddings"])
        round_to_half(backbone)
        return backbone

    def apply(self, model: Any, context: CompressContext) -> dict[str, Any]:
        if not self.on_grid:
            model.backbone = self._quantize(model.backbone)
            return {}
        return self.put_on_grid(model, context)

    def restore(self, backbone: nn.Module, record: dict[str, Any]) -> nn.Module:
        return self._quantize(backbone)  # the stored codes and scales then overwrite these

    def quantize_part(self, part: nn.Module) -> nn.Module:
        if self.on_grid:  # (a grid's calibration runs the whole model)
            return super().quantize_part(part)
        return self._quantize(part)  # each weight by itself: a part comes out as it would in the whole

    def pack(self, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Codes two per byte, also where an earlier step's pack moved them (prune: `codes.__values`,
        the non-zero ones); scales, biases and norms as fp16. A grid's 8-bit head stays one code per byte."""
        out = {}
        for name, tensor in half_where_lossless(tensors).items():
            if name.endswith((".quantized.codes", ".quantized.codes" + PRUNED_VALUES)) and self._four_bit(name, tensors):
                codes = gridquant.nibbles_of(tensor, self.plan.grid.symmetric) if self.on_grid else tensor
                out[name + NIBBLES] = nibbles(codes)
                out[name + SHAPE] = torch.tensor(tensor.shape, dtype=torch.int64)
            else:
                out[name] = tensor
        return out

    def _four_bit(self, name: str, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether the codes `name` fit in 4 bits: always for NF4/FP4; on a grid, all but (almost always) the
        8-bit head's. Packing is lossless either way, and the loaded layer knows its own grid."""
        if not self.on_grid:
            return True
        grid = self.plan.grid
        codes = tensors[name]
        return codes.numel() == 0 or (int(codes.min()) >= grid.qmin and int(codes.max()) <= grid.qmax)

    def unpack(self, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {name: t for name, t in tensors.items() if not name.endswith((NIBBLES, SHAPE))}
        for name in tensors:
            if name.endswith(NIBBLES):
                base = name.removesuffix(NIBBLES)
                shape = tuple(tensors[base + SHAPE].tolist())
                if tensors[name].numel() != math.ceil(math.prod(shape) / 2):  # before allocating what a file claims
                    raise ValueError(f"{tensors[name].numel()} bytes of 4-bit codes do not fit the shape {shape}")
                codes = unnibble(tensors[name], math.prod(shape)).view(shape)
                out[base] = gridquant.codes_of(codes, self.plan.grid.symmetric) if self.on_grid else codes
        return out
