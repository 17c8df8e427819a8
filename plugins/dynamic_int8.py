"""`dynamic_int8`: int8 weights with activations quantized on the fly, for fast CPU inference.

Each linear layer (and each input/recurrent projection of an unrolled `nn.LSTM`/`nn.GRU`) runs
PyTorch's fbgemm int8 kernel (`torch.ops.quantized.linear_dynamic`): the activations are quantized
per call, multiplied in int8 and rescaled. Weights are stored as int8 with one absmax per row
(`SCB`, as bitsandbytes names it) and prepacked for the kernel on first use, so the artifact holds
plain tensors; scales, biases and norms are rounded to fp16 and stored so, as `int8` does. A tied
embedding gathers from the head's int8 rows.

Why these kernels: torchao's int8 path (`quantize_` with `Int8DynamicActivationInt8WeightConfig`)
has no fast CPU kernel, and torch.ao's quantized LSTM (`quantize_dynamic`) is no faster than fp32,
so both layer types go through fbgemm linears, the LSTM unrolled over them. int8 pays on wide
layers only: on narrow ones fp32 generates faster. Per-kernel timings and the width where
whole-model generation crosses over: bench/README.md (compression: kernels, widths).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from lmkit.backbones.unrolled import UnrolledRNN
from lmkit.errors import LmkitError
from lmkit.plugins import CompressContext, Plugin
from lmkit.tensors import once_per_tensor, swap_modules
from lmkit.builtin_plugins.int8 import Int8Embedding, half_where_lossless, round_to_half


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
        self._packed: Any = None  # fbgemm's prepacked weight, built on first use

    @classmethod
    def from_float(cls, linear: nn.Linear) -> DynamicInt8Linear:
        q, absmax = row_quantize(linear.weight)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        return cls(q, absmax, bias)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None  # new weights: pack again on the next call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:  # packed once: per call, the kernel is all that runs
            scales = (self.SCB.float() / 127).double()
            qweight = torch._make_per_channel_quantized_tensor(
                self.weight, scales, torch.zeros_like(scales, dtype=torch.int64), 0)
            self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
        # reduce_range: 7-bit activations, as quantize_dynamic uses on x86 (no int16 overflow in fbgemm)
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)


def quantize(backbone: nn.Module) -> nn.Module:
    """Swap every Linear and LSTM/GRU for fbgemm int8 and every Embedding for int8 rows, keeping ties."""
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
    summary = "int8 weights, activations quantized per call (fbgemm): CPU inference, faster from ~256-384 wide; ~0.26x bytes"
    quantizes = True

    def check_model(self, model: Any) -> None:
        if model.device.type != "cpu":
            raise LmkitError(f"compression=dynamic_int8 runs on CPU (fbgemm); the model is on {model.device}")

    def apply(self, model: Any, context: CompressContext) -> dict[str, Any]:
        model.backbone = quantize(model.backbone)
        return {}

    def restore(self, backbone: nn.Module, record: dict[str, Any]) -> nn.Module:
        return quantize(backbone)  # the stored int8 tensors then overwrite these

    def pack(self, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, torch.Tensor]:
        return half_where_lossless(tensors)
