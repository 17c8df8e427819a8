"""`dynamic_int8`: int8 weights with one scale per row, for fast CPU inference.

Each linear layer (and each input/recurrent projection of an unrolled `nn.LSTM`/`nn.GRU`) runs
torch's weight-only int8 CPU kernel (`torch._weight_int8pack_mm`) on bf16 activations: the int8 rows are
multiplied as they are and rescaled per row. Weights are stored as int8 with one absmax per row
(`SCB`, as bitsandbytes names it), so the artifact holds plain tensors; scales, biases and norms are
rounded to fp16 and stored so, as `int8` does. A tied embedding gathers from the head's int8 rows.

Until lmkit 0.1 (issue 30) these layers ran fbgemm's dynamically quantized linears (activations quantized
per call too), built from torch's quantized tensors, which torch deprecates (pytorch #184982) and warned
about on every use; the stored weights are the same, so earlier artifacts load and run on the new kernel,
now without rounding the activations to int8. Measured (2 threads, this machine's Xeon with AMX, one
1536x384 layer): batch 1 fbgemm 23.5 us, int8pack 21.6 us, fp32 110 us; batch 32 fbgemm 62 us, int8pack
287 us, fp32 194 us. The kernel that ships a calibrated int8 model to llama.cpp and ONNX is `int8`'s
`quant_type=sym` (blocks of 32); this plugin's per-row scales are no runtime's format.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from lmkit.backbones.unrolled import UnrolledRNN
from lmkit.errors import LmkitError
from lmkit.plugins import CompressContext, Plugin
from lmkit.tensors import half_where_lossless, once_per_tensor, round_to_half, swap_modules
from lmkit.builtin_plugins.int8 import Int8Embedding


def row_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and each row's absmax (symmetric: q = round(127 w / absmax))."""
    absmax = weight.detach().abs().amax(dim=1).float().clamp(min=1e-8)
    q = torch.round(weight.detach().float() * (127 / absmax[:, None])).clamp(-127, 127).to(torch.int8)
    return q, absmax


class DynamicInt8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # int8 (out, in)
        self.register_buffer("SCB", SCB)  # absmax of each row
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> DynamicInt8Linear:
        q, absmax = row_quantize(linear.weight)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        return cls(q, absmax, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.weight, (self.SCB.float() / 127).to(torch.bfloat16))
        y = y.float().view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def quantize(backbone: nn.Module) -> nn.Module:
    """Swap every Linear and LSTM/GRU for int8 rows and every Embedding for int8 rows, keeping ties."""
    int8_rows = once_per_tensor(row_quantize)  # tied layers share one set of int8 rows and scales

    def linear(module: nn.Linear) -> DynamicInt8Linear:
        bias = module.bias.detach().float().clone() if module.bias is not None else None
        return DynamicInt8Linear(*int8_rows(module.weight), bias)

    def convert(module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Linear):
            return linear(module)
        if isinstance(module, (nn.LSTM, nn.GRU)):
            return UnrolledRNN(module, linear)
        if isinstance(module, nn.Embedding):
            return Int8Embedding(*int8_rows(module.weight))
        return None

    backbone = swap_modules(backbone, convert).train(backbone.training)
    round_to_half(backbone)  # scales, biases and norms: stored as fp16, exactly what runs
    return backbone


class DynamicInt8(Plugin):
    name = "dynamic_int8"
    summary = "int8 weights with per-row scales on torch's int8 CPU kernel (bf16 activations); ~0.26x bytes"
    quantizes = True

    def check_model(self, model: Any) -> None:
        if model.device.type != "cpu":
            raise LmkitError(f"compression=dynamic_int8 runs on CPU (torch's int8pack kernel); the model is on {model.device}")

    def apply(self, model: Any, context: CompressContext) -> dict[str, Any]:
        model.backbone = quantize(model.backbone)
        return {}

    def restore(self, backbone: nn.Module, record: dict[str, Any]) -> nn.Module:
        return quantize(backbone)  # the stored int8 tensors then overwrite these

    def pack(self, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, torch.Tensor]:
        return half_where_lossless(tensors)
