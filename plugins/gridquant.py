"""Quantizing a whole model onto a runtime grid (lmkit.blockquant): what `int4` and `int8` run for
`quant_type=sym|asym`.

Every weight matrix (linear layers, an LSTM/GRU's input and recurrent matrices) goes onto the grid in
forward order, each measured on the model whose earlier matrices are already quantized (GPTQ's
layer-sequential recipe); `method=rtn` rounds to nearest (what llama.cpp's and onnxruntime's own
quantizers do: the baseline), `gptq` (plugins/gptq.py) calibrates. `awq` folds activation-aware scales
in first (plugins/awq.py). The output head goes on an 8-bit grid by default (llama.cpp's quantizer keeps
it above the rest); with `embeddings`, the token embedding is rounded onto the grid too (a tied one is
the head's tensor, on the head's grid, and rounded even under GPTQ, whose objective would see only the head's
outputs and move the rows the embedding looks up). Pruned zeros (a `prune` step before) stay exactly zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from lmkit.backbones.unrolled import UnrolledRNN
from lmkit.blockquant import BlockQuantEmbedding, BlockQuantLinear, BlockQuantWeight, Grid, dequantize, round_to_nearest
from lmkit.errors import LmkitError
from lmkit.plugins import CompressContext
from lmkit.tensors import once_per_tensor, round_to_half, swap_modules
from lmkit.builtin_plugins.awq import apply_awq
from lmkit.builtin_plugins.calibrate import collect
from lmkit.builtin_plugins.gptq import Unfactorizable, gptq

Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
GRID_TYPES = ("sym", "asym")
METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class Plan:
    """How one plugin step puts a model on a grid."""

    grid: Grid
    head_grid: Grid
    method: str = "rtn"
    awq: bool = False
    damp: float = 0.01
    act_order: bool = False
    windows: int = 128
    embeddings: bool = True

    def describe(self) -> str:
        text = f"{self.method} g{self.grid.blocksize} {'sym' if self.grid.symmetric else 'asym'}"
        if self.head_grid != self.grid:
            text += f", head int{self.head_grid.bits}"
        return text + (", awq scales" if self.awq else "") + (", act order" if self.act_order and self.gptq else "")

    @property
    def gptq(self) -> bool:
        return self.method == "gptq"

    def calibrates(self) -> bool:
        return self.method == "gptq" or self.awq


def plan(plugin: str, bits: int, settings: dict[str, Any]) -> Plan:
    """The plan of `compression.<plugin>` settings, checked: one line per mistake, naming what works."""
    key = f"compression.{plugin}"
    if settings["method"] not in METHODS:
        raise LmkitError(f"{key}.method={settings['method']!r} is not one of {', '.join(METHODS)}")
    blocksize = settings["blocksize"] or 32
    if blocksize < 16 or blocksize & (blocksize - 1):
        raise LmkitError(f"{key}.blocksize={blocksize}: the runtimes' grids take a power of two from 16 "
                         f"(llama.cpp and ONNX: 32)")
    if settings["head_bits"] not in (4, 8) or settings["head_bits"] < bits:
        raise LmkitError(f"{key}.head_bits={settings['head_bits']} must be " + ("4 or 8" if bits == 4 else "8"))
    if settings["act_order"] and settings["method"] != "gptq":
        raise LmkitError(f"{key}.act_order=true orders GPTQ's columns: set {key}.method=gptq (or act_order=false)")
    if not 0 < settings["damp"] < 1:
        raise LmkitError(f"{key}.damp={settings['damp']} must be in (0, 1) (a fraction of the Hessian's mean diagonal)")
    if settings["calibration_windows"] < 1:
        raise LmkitError(f"{key}.calibration_windows={settings['calibration_windows']} must be >= 1")
    symmetric = settings["quant_type"] == "sym"
    if bits == 8 and not symmetric:
        raise LmkitError(f"{key}.quant_type=asym: llama.cpp has no asymmetric 8-bit weight type; use quant_type=sym")
    grid = Grid(bits, symmetric, blocksize)
    head_grid = grid if settings["head_bits"] == bits else Grid(8, True, blocksize)
    return Plan(grid, head_grid, settings["method"], settings["awq"], settings["damp"], settings["act_order"],
                settings["calibration_windows"], settings.get("embeddings", True))


class OnGrid:
    """What `int4` and `int8` share for their grid quant types (a mixin of lmkit.plugins.Plugin: `name`, `settings`)."""

    bits: int
    name: str
    settings: dict[str, Any]

    @property
    def on_grid(self) -> bool:
        return self.settings["quant_type"] in GRID_TYPES

    @property
    def plan(self) -> Plan:
        return plan(self.name, self.bits, self.settings)

    def check_off_grid(self, own: str) -> None:
        """The grid-only settings keep their plain values for `own` codes (bitsandbytes')."""
        for key, plain in (("method", "rtn"), ("awq", False), ("act_order", False)):
            if self.settings[key] != plain:
                raise LmkitError(f"compression.{self.name}.{key}={self.settings[key]!r} needs a runtime grid: "
                                 f"quant_type={' or '.join(t for t in GRID_TYPES if self.bits == 4 or t == 'sym')} "
                                 f"({own})")

    def needs_corpus(self) -> tuple[str, str] | None:
        if self.on_grid and self.plan.calibrates():
            return (f"calibrates (method={self.settings['method']}, awq={str(self.settings['awq']).lower()})",
                    "method=rtn awq=false")
        return None

    def check_model(self, model: Any) -> None:
        if self.on_grid:
            check_widths(model.backbone, self.plan, self.name)

    def check_after(self, earlier: list[str]) -> None:
        if self.on_grid:
            check_sparsity(self.plan, earlier, self.name)

    def put_on_grid(self, model: Any, context: CompressContext) -> dict[str, Any]:
        details = calibrate(model, self.plan, context, self.name, keep_zeros=self.plan.grid.symmetric)
        round_to_half(model.backbone)
        return details

    def grid_structure(self, backbone: nn.Module) -> nn.Module:
        """On load: the grid layers, filled next by the stored codes and scales."""
        backbone = swap(backbone, self.plan)
        round_to_half(backbone)
        return backbone


def heads(backbone: nn.Module) -> set[int]:
    """ids of the output head's weight (the last Linear, lm_head or head)."""
    head = getattr(backbone, "lm_head", None) or getattr(backbone, "head", None)
    return {id(head.weight)} if isinstance(head, nn.Linear) else set()


def matrices(backbone: nn.Module) -> dict[str, nn.Parameter]:
    """Every weight matrix that multiplies activations, by name, each shared one once, in forward order."""
    found: dict[int, tuple[str, nn.Parameter]] = {}
    for module_name, module in backbone.named_modules():
        if isinstance(module, (nn.Linear, nn.LSTM, nn.GRU)):
            for name, param in module.named_parameters(recurse=False):
                if name.startswith("weight"):
                    found.setdefault(id(param), (f"{module_name}.{name}".lstrip("."), param))
    return dict(found.values())


def check_widths(backbone: nn.Module, plan_: Plan, plugin: str) -> None:
    for name, p in matrices(backbone).items():
        if p.shape[1] % plan_.grid.blocksize:
            widths = {q.shape[1] for q in matrices(backbone).values()}
            fits = [b for b in (256, 128, 64, 32, 16) if all(w % b == 0 for w in widths)]
            works = f"blocksize={fits[0]} divides them all" if fits else "no block size from 16 divides them all"
            raise LmkitError(f"compression.{plugin}: {name} is {p.shape[1]} wide, not a multiple of blocksize="
                             f"{plan_.grid.blocksize} ({works})")


def check_sparsity(plan_: Plan, earlier: list[str], plugin: str) -> None:
    """Pruned zeros must stay zero: only the symmetric grids have an exact zero."""
    from lmkit.plugins import plugin_class

    pruning = [name for name in earlier if plugin_class(name).sparsifies]
    if pruning and not plan_.grid.symmetric:
        raise LmkitError(f"compression.{plugin}.quant_type=asym has no exact zero for {pruning[0]}'s pruned weights; "
                         "use quant_type=sym after prune")


@torch.no_grad()
def calibrate(model: Any, plan_: Plan, context: CompressContext, plugin: str, keep_zeros: bool) -> dict[str, Any]:
    """Put `model.backbone` on the plan's grid; returns the record's details (layers that fell back, awq)."""
    backbone = model.backbone
    check_widths(backbone, plan_, plugin)  # again: an earlier step of the recipe (prune_structured) may cut widths
    ids = context.calibration(model, plan_.windows).to(model.device) if plan_.calibrates() else None
    details: dict[str, Any] = {}
    if plan_.awq:
        details.update(apply_awq(backbone, ids, plan_.grid, context.log))
    head_ids, results, fallbacks = heads(backbone), {}, []
    tied = token_embedding_ids(backbone)
    float_tied = tied if not plan_.embeddings else set()
    for name, p in matrices(backbone).items():
        if id(p) in float_tied:
            continue  # a head tied to an embedding kept in float
        grid = plan_.head_grid if id(p) in head_ids else plan_.grid
        keep = p != 0 if keep_zeros else None
        quantized = None
        # a head tied to the token embedding is rounded: GPTQ would trade the embedding's rows for the head's outputs
        if plan_.method == "gptq" and id(p) not in tied:
            try:
                quantized = gptq(p, collect(backbone, name, ids, "gram"), grid, damp=plan_.damp,
                                 act_order=plan_.act_order, keep=keep)
            except Unfactorizable as e:
                context.log(f"{plugin}: {name}: {e}; rounded to nearest instead")
                fallbacks.append(name)
        if quantized is None:
            quantized = round_to_nearest(p * keep if keep is not None else p, grid)
        p.copy_(dequantize(*quantized, grid.blocksize))  # later layers are measured on this one's output
        results[id(p)] = quantized
    model.backbone = swap(backbone, plan_, results)
    return {**details, "fallback_to_rtn": fallbacks}


def swap(backbone: nn.Module, plan_: Plan, results: dict[int, Quantized] | None = None) -> nn.Module:
    """Replace every matrix (and with `embeddings` the token embedding) by its grid layer; `results`: codes
    chosen by calibration, by weight id (otherwise rounded to nearest: the structure that loading fills)."""
    head_ids = heads(backbone)
    results = results or {}

    @once_per_tensor  # a tied head and embedding share one BlockQuantWeight
    def on_grid(weight: torch.Tensor) -> BlockQuantWeight:
        grid = plan_.head_grid if id(weight) in head_ids else plan_.grid
        quantized = results.get(id(weight)) or round_to_nearest(weight.detach(), grid)
        return BlockQuantWeight(*quantized, grid)

    def linear(module: nn.Linear, weight: torch.Tensor | None = None) -> BlockQuantLinear:
        return BlockQuantLinear(on_grid(module.weight if weight is None else weight), module.bias)

    def recurrent(module: nn.LSTM | nn.GRU) -> UnrolledRNN:
        # UnrolledRNN copies each matrix into a new Linear, layer by layer, ih before hh: hand it the originals
        originals: Iterator[torch.Tensor] = iter(getattr(module, f"weight_{kind}_l{layer}")
                                                 for layer in range(module.num_layers) for kind in ("ih", "hh"))
        return UnrolledRNN(module, lambda lin: linear(lin, next(originals)))

    token_embeddings = token_embedding_ids(backbone)

    def convert(module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Linear):
            if id(module.weight) in token_embeddings and not plan_.embeddings:
                return module  # a head tied to an embedding kept in float
            return linear(module)
        if isinstance(module, nn.Embedding):
            if id(module.weight) in token_embeddings and plan_.embeddings:
                return BlockQuantEmbedding(on_grid(module.weight))
            return module
        if isinstance(module, (nn.LSTM, nn.GRU)):
            return recurrent(module)
        return None

    return swap_modules(backbone, convert)


def token_embedding_ids(backbone: nn.Module) -> set[int]:
    embedding = getattr(getattr(backbone, "transformer", None), "wte", None) or getattr(backbone, "embedding", None)
    return {id(embedding.weight)} if isinstance(embedding, nn.Embedding) else set()


def nibbles_of(codes: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """4-bit codes as unsigned nibbles (two's complement for the signed grid), one per byte."""
    return codes.view(torch.uint8) & 15 if symmetric else codes.view(torch.uint8)


def codes_of(nibbles: torch.Tensor, symmetric: bool) -> torch.Tensor:
    unsigned = nibbles.to(torch.int16)
    return ((unsigned ^ 8) - 8 if symmetric else unsigned).to(torch.int8)

