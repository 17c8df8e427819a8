"""`format=hf` of a model on lmkit's runtime grids, in compressed-tensors' `pack-quantized` layout.

transformers reads that layout on a CPU (with the `compressed-tensors` package installed): it builds each listed
layer with `weight_packed`, `weight_scale` and `weight_shape` parameters, loads the file's tensors into them, and
decompresses every layer to `q * scale` before the first forward: on a CPU it multiplies fp32 weights (the file is
small, the loaded model is not). Its other quantized layout, GPTQ, needs optimum and gptqmodel (a GPU, or
gptqmodel's native build); bitsandbytes' serializations hold NF4/LLM.int8, not lmkit's grids.

Symmetric group quantization with `group_size` = lmkit's block size is lmkit's `sym` grid value for value:

    int4 sym   q in -8..7       value q * d    num_bits 4
    int8 sym   q in -127..127   value q * d    num_bits 8 (its -128 is never used)

so the file holds lmkit's own integers and fp16 scales, nothing quantized again. Per quantized layer X:

    X.weight_packed   int32 (out, in * bits / 32)  32 / bits codes a word, the first in the lowest bits, each
                                                    stored as q + 2^(bits - 1)
    X.weight_scale    fp16 (out, in / blocksize)    lmkit's block scales (fp16 values already)
    X.weight_shape    int64 (2,)                    (out, in)

and config.json's `quantization_config` names the layers of each grid in one config group (a head on the int8 grid
beside int4 matrices is a second group). A token embedding on the grid is written as its dequantized values (fp32,
q * d exactly, so the function is lmkit's): compressed-tensors packs `nn.Embedding` too, but transformers (5.25)
cannot load one, as its generic `_init_weights` reads the `weight` a packed embedding no longer has (fixes were
proposed upstream), and SGLang skips a packed `embed_tokens`. A tied head is that embedding, as in the dense
export. Llama and Qwen2 only: GPT-2's `Conv1D` layers hold transposed weights, which compressed-tensors does not
quantize. lmkit writes the files itself; only the reader needs `compressed-tensors`.

What the layout cannot say is one LmkitError line naming the setting that can: asymmetric grids (a float minimum per
block, where compressed-tensors has integer zero points), NF4/FP4 and LLM.int8 codes, torch's dynamic int8, and
structured pruning (per-layer widths). Unstructured pruning is plain zeros (code 0 on the sym grids).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmkit.blockquant import BlockQuantEmbedding, BlockQuantLinear, BlockQuantWeight, Grid, dequantize
from lmkit.errors import LmkitError
from lmkit.hf.folder import write_folder
from lmkit.hf.llama import EMBEDDING, llama_config, llama_tensors
from lmkit.inference import InferenceModel
from lmkit.plugins import plugin_class

FORMAT = "pack-quantized"
DEQUANTIZED = (f"{EMBEDDING}.weight",)  # grid tensors written as their values: see the module's docstring
WORKS = "compression=int4 or int8 with quant_type=sym"
# What writes the layout instead, for each quantizer whose own weights it cannot hold
SYM_SETTING = {"int4": "compression.int4.quant_type=sym", "int8": "compression.int8.quant_type=sym",
               "dynamic_int8": "compression=int8 compression.int8.quant_type=sym"}
WHY = {"asym": "stores q * d + m with a float minimum per block, which compressed-tensors' integer zero points "
               "cannot hold",
       "nf4": "stores NF4 table codes, not integers on a scale", "fp4": "stores FP4 codes, not integers on a scale",
       "llm_int8": "keeps LLM.int8's outlier columns and row scales, not groups",
       "dynamic_int8": "quantizes activations at run time with per-row weight scales, not groups"}


@dataclass(frozen=True)
class GridRows:
    """A grid matrix's codes and scales, sliced by rows as `lmkit.hf.llama.llama_tensors` slices float tensors
    (whole rows move, so each row keeps its blocks)."""

    codes: torch.Tensor
    scales: torch.Tensor
    grid: Grid

    def __getitem__(self, rows: slice) -> GridRows:
        return GridRows(self.codes[rows], self.scales[rows], self.grid)

    def split(self, sizes: list[int]) -> list[GridRows]:
        return [GridRows(c, s, self.grid) for c, s in zip(self.codes.split(sizes), self.scales.split(sizes))]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, None, self.grid.blocksize)


def grid_steps(steps: list[dict[str, Any]]) -> bool:
    """Whether a compression record put weights on a grid format=hf writes; what it cannot write is one line.
    `prune` leaves plain tensors (zeros) and passes."""
    on_grid = False
    for step in steps:
        plugin, quant_type = step["plugin"], _settings(step).get("quant_type")
        if plugin == "prune":
            continue
        if plugin in ("int4", "int8") and quant_type == "sym":
            on_grid = True
            continue
        if plugin == "prune_structured":
            raise LmkitError("format=hf: compression=prune_structured leaves per-layer head counts and MLP widths, "
                             "which a Llama or Qwen2 config.json cannot state; export it with format=onnx or "
                             "format=lmkit")
        if plugin not in SYM_SETTING:
            raise LmkitError(f"format=hf: compression={plugin} is not one format=hf writes (it writes prune and "
                             f"{WORKS}); export it with format=lmkit")
        what = f"compression.{plugin}.quant_type={quant_type}" if quant_type else f"compression={plugin}"
        why = WHY.get(quant_type) or WHY.get(plugin, "has no compressed-tensors layout")
        # an asymmetric grid is llama.cpp's Q4_1 and MatMulNBits with zero points; bitsandbytes' codes have no export
        elsewhere = ("or export this model as it is with format=gguf or format=onnx" if quant_type == "asym" else
                     "quantizing the float model (this one exports as it is with format=lmkit only)")
        raise LmkitError(f"format=hf writes compressed-tensors' symmetric integer groups; {what} {why}: use "
                         f"{SYM_SETTING[plugin]}, {elsewhere}")
    return on_grid


def _settings(step: dict[str, Any]) -> dict[str, Any]:
    """A step's settings over its plugin's defaults (a record may leave a default out), for a known plugin."""
    try:
        defaults = plugin_class(step["plugin"]).defaults
    except LmkitError:  # a plugin not installed here: its record is all there is
        defaults = {}
    return {**defaults, **(step.get("settings") or {})}


def has_grid_layers(backbone: nn.Module) -> bool:
    return any(isinstance(m, (BlockQuantLinear, BlockQuantEmbedding)) for m in backbone.modules())


def grid_state(backbone: nn.Module) -> dict[str, torch.Tensor | GridRows]:
    """The backbone's state by lmkit name, each grid layer X as one GridRows under `X.weight` (a tied head's under
    its own name too: named_modules without deduplication)."""
    state: dict[str, torch.Tensor | GridRows] = {k: v.detach() for k, v in backbone.state_dict().items()
                                                 if ".quantized." not in k}
    for name, module in backbone.named_modules(remove_duplicate=False):
        if isinstance(module, (BlockQuantLinear, BlockQuantEmbedding)):
            state[f"{name}.weight"] = grid_rows(name, module.quantized)
    return state


def grid_rows(name: str, weight: BlockQuantWeight) -> GridRows:
    grid = weight.grid
    if not grid.symmetric or weight.mins is not None:
        raise LmkitError(f"format=hf: {name} is on the {grid.describe()} grid, whose float minimums compressed-tensors "
                         f"cannot hold; use {WORKS}")
    scales = weight.scales.detach().cpu()
    if not torch.equal(scales.half().float(), scales.float()):
        raise LmkitError(f"format=hf: {name}'s grid scales are not fp16 values, which lmkit's grids keep")
    return GridRows(weight.codes.detach().cpu(), scales, grid)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' `pack_to_int32` for widths that are a multiple of 32 / bits: each code as q + 2^(bits-1),
    32 / bits of them a word, the first in the lowest bits."""
    per_word = 32 // bits
    rows, cols = codes.shape
    if cols % per_word:
        raise ValueError(f"a width of {cols} does not fill whole int32 words of {per_word} codes")
    unsigned = (codes.long() + (1 << (bits - 1))).view(rows, cols // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.long) * bits
    words = (unsigned << shifts).sum(dim=-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # the same 32 bits, signed


def packed_tensors(module: str, rows: GridRows) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one layer (HF module name `module`)."""
    return {f"{module}.weight_packed": pack_int32(rows.codes, rows.grid.bits).contiguous(),
            f"{module}.weight_scale": rows.scales.half().contiguous(),
            f"{module}.weight_shape": torch.tensor(rows.codes.shape, dtype=torch.int64)}


def quantization_config(groups: dict[Grid, list[str]]) -> dict[str, Any]:
    """compressed-tensors' config: one group per grid, targeting its layers by exact module name."""
    config_groups = {
        f"group_{i}": {"targets": modules, "weights": {
            "num_bits": grid.bits, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": grid.blocksize, "dynamic": False}, "input_activations": None, "output_activations": None,
            "format": FORMAT}
        for i, (grid, modules) in enumerate(groups.items())}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None}


def export_quantized(model: InferenceModel, out: Path, overwrite: bool = False) -> Path:
    """Write a grid-quantized Llama-shaped lmkit model as a compressed-tensors `LlamaForCausalLM` (or Qwen2)."""
    cfg = model.backbone.config
    hf_config = llama_config(cfg)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[Grid, list[str]] = {}
    for name, value in llama_tensors(grid_state(model.backbone), cfg).items():
        if isinstance(value, GridRows) and name in DEQUANTIZED:
            tensors[name] = value.dequantize().contiguous()
        elif isinstance(value, GridRows):
            module = name.removesuffix(".weight")
            groups.setdefault(value.grid, []).append(module)
            tensors.update(packed_tensors(module, value))
        else:
            tensors[name] = value.contiguous().float()
    hf_config["quantization_config"] = quantization_config(groups)
    return write_folder(Path(out), tensors, hf_config, model, overwrite)
