"""`int8`: bitsandbytes LLM.int8 for every weight matrix, embeddings and recurrent weights included; or, with
`quant_type=sym`, llama.cpp's Q8_0 grid (blocks of 32, one fp16 scale each: plugins/gridquant.py), calibrated
with GPTQ and activation-aware scales and exported as it is (GGUF, ONNX). The rest of this text is LLM.int8's.

Each matrix is stored as int8 with one absmax scale per row (bitsandbytes' `SCB`): about a
quarter of the fp32 bytes. What stays in float (the scales, biases and norm gains) is rounded to
fp16 precision when quantizing and stored as fp16: LLM.int8 computes in fp16 anyway, and the
model in memory is exactly the model on disk. Linear layers become `bnb.nn.Linear8bitLt` (activation columns above
`threshold` take a higher-precision path: LLM.int8's outlier decomposition); an `nn.LSTM`/`nn.GRU`
is unrolled so that its input projection of all time steps is one int8 matmul and its recurrent
weights are int8 per step; an embedding gathers int8 rows and rescales them, sharing the int8
weight and scales with a tied output head. This buys memory, not speed: bitsandbytes' int8
matmul is slower than fp32 on a CPU at the default widths, and reported slower than fp16 on an
H100 at these sizes (bench/README.md, compression). Artifacts
load on CPU; the GPU path is bitsandbytes' own and untested here.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmkit.backbones.unrolled import UnrolledRNN
from lmkit.errors import LmkitError
from lmkit.plugins import CompressContext, Plugin
from lmkit.tensors import half_where_lossless, once_per_tensor, round_to_half, swap_modules
from lmkit.builtin_plugins import gridquant


# bitsandbytes logs "inputs will be cast from float32 to float16" on every int8 matmul of float32
# inputs: that cast is how LLM.int8 quantizes activations, not news worth a line per layer per step.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


class Int8Embedding(nn.Module):
    """An embedding whose rows are int8 with one scale each (shared with a tied int8 head)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        if isinstance(weight, nn.Parameter):  # shared with a bitsandbytes head
            self.weight = weight  # int8 (num_embeddings, dim)
        else:
            self.register_buffer("weight", weight)
        self.register_buffer("SCB", scales)  # absmax of each row, as bitsandbytes names it
        self.num_embeddings, self.embedding_dim = weight.shape  # (nn.Embedding's, which LoRA's token rows read)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float() * (self.SCB[ids].float() / 127).unsqueeze(-1)


def rows_follow_weight(layer: nn.Module, args: Any) -> None:
    """A Linear8bitLt's forward pre-hook. bitsandbytes keeps the int8 rows and scales (CB, SCB) as plain attributes
    of the weight and of the layer's state, which Module.to leaves where they were when the model moves (lmkit.load
    with device=cuda, Lightning moving a QLoRA base to the GPU): before a call, point them at the weight."""
    weight, state = layer.weight, layer.state
    scales = state.SCB if state.SCB is not None else weight.SCB
    if scales is not None and scales.device != weight.device:
        weight.CB, weight.SCB = weight.data, scales.to(weight.device)
        state.CB = state.SCB = None  # (the call takes them from the weight again: init_8bit_state)


def quantize(backbone: nn.Module, threshold: float) -> nn.Module:
    """Swap every Linear, Embedding and LSTM/GRU of `backbone` for its int8 form, keeping ties."""
    import bitsandbytes as bnb

    @once_per_tensor  # tied layers share one Int8Params
    def int8_weight(weight: torch.Tensor) -> nn.Parameter:
        # Quantized here rather than by Int8Params.to(), which does it only on a move from CPU.
        rows, scales, _ = bnb.functional.int8_vectorwise_quant(weight.detach().half())
        return bnb.nn.Int8Params(rows, requires_grad=False, has_fp16_weights=False, CB=rows, SCB=scales)

    def linear(module: nn.Linear) -> nn.Module:
        layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                    has_fp16_weights=False, threshold=threshold, device=module.weight.device)
        layer.weight = int8_weight(module.weight)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().float().clone(), requires_grad=False)
        layer.register_forward_pre_hook(rows_follow_weight)
        return layer

    def convert(module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Linear):
            return linear(module)
        if isinstance(module, nn.Embedding):
            weight = int8_weight(module.weight)
            return Int8Embedding(weight, weight.SCB)
        if isinstance(module, (nn.LSTM, nn.GRU)):
            return UnrolledRNN(module, linear)
        return None

    # New modules start in training mode, where Linear8bitLt re-quantizes its (already int8) weight.
    backbone = swap_modules(backbone, convert).train(backbone.training)
    round_to_half(backbone)
    return backbone


class Int8(gridquant.OnGrid, Plugin):
    name = "int8"
    summary = ("int8 weights everywhere (embeddings, LSTM too): bitsandbytes LLM.int8 rows, or llama.cpp's Q8_0 grid "
               "(rtn, gptq, awq); ~0.27x bytes")
    # threshold: LLM.int8's outlier threshold (activation columns above it stay in float; 0: none)
    defaults = {"quant_type": "llm_int8", "threshold": 6.0, "blocksize": 32, "embeddings": True, "method": "rtn",
                "awq": False, "act_order": False, "damp": 0.01, "calibration_windows": 128, "head_bits": 8}
    quantizes = True
    bits = 8

    def check(self) -> None:
        s = self.settings
        if s["quant_type"] not in ("llm_int8", *gridquant.GRID_TYPES):
            raise LmkitError(f"compression.int8.quant_type={s['quant_type']!r} is not one of llm_int8, sym")
        if self.on_grid:
            self.plan  # noqa: B018 (checks the grid's settings)
            return
        self.check_off_grid("llm_int8 is bitsandbytes' own rows")
        if s["threshold"] < 0:
            raise LmkitError(f"compression.int8.threshold={s['threshold']} must be >= 0")

    def describe(self) -> str:
        return f"int8 {self.plan.describe()}" if self.on_grid else ""

    def apply(self, model: Any, context: CompressContext) -> dict[str, Any]:
        if not self.on_grid:
            model.backbone = quantize(model.backbone, self.settings["threshold"])
            return {}
        return self.put_on_grid(model, context)

    def restore(self, backbone: nn.Module, record: dict[str, Any]) -> nn.Module:
        if self.on_grid:
            return self.grid_structure(backbone)
        return quantize(backbone, self.settings["threshold"])  # the stored int8 tensors then overwrite these

    def quantize_part(self, part: nn.Module) -> nn.Module:
        if self.on_grid:  # (a grid's calibration runs the whole model)
            return super().quantize_part(part)
        return quantize(part, self.settings["threshold"])  # each row by itself: a part comes out as in the whole

    def pack(self, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, torch.Tensor]:
        # bitsandbytes' `weight_format` flag is always row-major (0) now, and its loader assumes that
        # when the flag is absent: a tied head, stored as the embedding, has no weight for it to go with.
        return half_where_lossless({name: t for name, t in tensors.items() if not name.endswith(".weight_format")})
