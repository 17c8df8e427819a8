"""ONNX export: one graph interface for every lmkit model, written by torch's exporter and quantized by
onnxruntime's own tools (so the integer weights are ones onnxruntime's kernels run); a model lmkit already put
on a runtime grid (int4/int8 quant_type=sym|asym) keeps its own integers, in onnxruntime's MatMulNBits
(lmkit.deploy.onnx_grid: how, and what was measured).

The graph interface (config.json's `runtime` block names the inputs and outputs):

    inputs   input_ids  int64 [batch, seq]
             then the cache: a Transformer's past_key_values.{i}.key / .value [batch, heads, past_seq, head_dim]
             and past_mask float32 [batch, past_seq] (past_seq 0 is an empty cache); an LSTM's state.h /
             state.c, a GRU's state.h [layers, batch, hidden] (zeros are an empty state)
    outputs  logits [batch, seq, vocab], then present.*: output k+1 is input k+1 of the next call

A prompt runs in one call, then one token per call. The first 0 of each cache shape is its batch axis.
Dynamic batch, sequence and past lengths. The decoding loop needs numpy, onnxruntime and tokenizers only.

`past_mask` is what lets rows of different lengths decode in one batch: 1 where a past slot holds a
token, 0 where it is padding put before a shorter row's text (what a server does when it stacks rows
prefilled apart). Each row's positions count its own tokens only. It is part of the cache rather than an
input of its own, so the one decoding loop every export shares stays the same: a loop that never pads
threads it through as it threads the keys and values (the graph appends a 1 per new token).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmkit.deploy import require
from lmkit.deploy.onnx_grid import float_standin, grid_weights, write_grid
from lmkit.errors import LmkitError
from lmkit.files import atomic_directory
from lmkit.inference import InferenceModel
from lmkit.plugins import make, plugin_class

OPSET = 18
QUANTIZERS = ("int8", "dynamic_int8", "int4")  # recipe names whose step onnxruntime's quantizer does
GRID_PLUGINS, GRID_TYPES = ("int4", "int8"), ("sym", "asym")  # quant_type on a runtime grid: exported as it is
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits takes


class PastCache:
    """The KVCache protocol over explicit tensors, as ONNX passes them between calls: each layer's keys
    and values grow by concatenation and become outputs. The mask is always explicit, so one graph
    serves a whole prompt (past 0), a single new token, a chunk after a filled past, and rows padded apart."""

    def __init__(self, past: tuple[torch.Tensor, ...], past_mask: torch.Tensor) -> None:
        self.past = past  # key and value of layer 0, of layer 1, ...
        self.present: list[torch.Tensor] = []
        self.pos = past[0].size(2)
        self.past_mask = past_mask  # (batch, pos): 1 for a token, 0 for padding

    def present_mask(self, T: int) -> torch.Tensor:
        return torch.cat([self.past_mask, self.past_mask.new_ones(self.past_mask.size(0), T)], dim=1)

    def positions(self, T: int) -> torch.Tensor:
        """(batch, T): each row's tokens so far, then one more per new token."""
        held = self.past_mask.sum(dim=1, keepdim=True).to(torch.long)
        return held + torch.arange(T, device=held.device)

    def mask(self, T: int) -> torch.Tensor:
        """(batch, 1, T, pos + T): causal, and never a padding slot (a new token always sees itself)."""
        end = self.pos + T
        slots = torch.arange(end, device=self.past_mask.device)
        causal = slots <= torch.arange(self.pos, end, device=slots.device)[:, None]
        return causal & (self.present_mask(T) > 0)[:, None, None, :]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = torch.cat([self.past[2 * layer], k], dim=2), torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.present += [k, v]
        return k, v


class TransformerGraph(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, *cache_inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = PastCache(cache_inputs[:-1], cache_inputs[-1])
        T = input_ids.size(1)
        # what the backbone checks in Python, said so the exporter keeps the graph's lengths symbolic
        torch._check(cache.pos + T <= self.backbone.config.max_seq_len)
        logits, _ = self.backbone(input_ids, cache)
        return logits, *cache.present, cache.present_mask(T)


class RecurrentGraph(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, new = self.backbone(input_ids, state if len(state) == 2 else state[0])
        return logits, *(new if isinstance(new, tuple) else (new,))


def interface(model: InferenceModel) -> dict[str, Any]:
    """The graph's input and output names, and an empty cache's shape per cache input (batch as 0)."""
    cfg = model.record.backbone
    if model.record.kind == "transformer":
        names = [f"{i}.{part}" for i in range(cfg.n_layer) for part in ("key", "value")]
        shapes = [[0, cfg.kv_heads(i), 0, cfg.head_size] for i in range(cfg.n_layer) for _ in ("key", "value")]
        inputs = [f"past_key_values.{n}" for n in names] + ["past_mask"]
        names, shapes = names + ["mask"], shapes + [[0, 0]]
    else:
        names = ["h", "c"] if cfg.cell == "lstm" else ["h"]
        shapes = [[cfg.n_layer, 0, cfg.hidden_size or cfg.n_embd]] * len(names)
        inputs = [f"state.{n}" for n in names]
    return {"inputs": ["input_ids", *inputs], "outputs": ["logits", *(f"present.{n}" for n in names)],
            "cache_shapes": shapes}


def split_recipe(model: InferenceModel, spec: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, dict] | None]:
    """A compression recipe for format=onnx: the steps that run in torch before export, and the quantizing
    last step (name, settings) that onnxruntime's quantizer does on the exported graph. A last step on a runtime
    grid (int4/int8 quant_type=sym|asym) runs in torch, calibrated as lmkit does it, and exports as it is."""
    from lmkit.plugins import check_chain

    names = list(spec)
    check_chain(names, already=[r["plugin"] for r in model.record.compression])
    last = {"plugin": names[-1], "settings": spec[names[-1]] or {}} if names else None
    on_onnx_quantizer = last is not None and last["plugin"] in QUANTIZERS and not on_grid(last)
    quantization = (last["plugin"], last["settings"]) if on_onnx_quantizer else None
    in_torch = {name: spec[name] for name in names if quantization is None or name != quantization[0]}
    for name in in_torch:
        if plugin_class(name).quantizes and not on_grid({"plugin": name, "settings": in_torch[name] or {}}):
            raise LmkitError(f"compression={name} has no ONNX form: onnxruntime quantizes ONNX exports "
                             f"(compression=int8 or int4 as the last step; quant_type=sym exports lmkit's grid)")
    check_exportable(model, quantization[0] if quantization else None)
    return in_torch, quantization


def on_grid(step: dict[str, Any]) -> bool:
    """Whether a compression step (as config.json records it) put the weights on a runtime grid (lmkit.blockquant)."""
    settings = {**plugin_class(step["plugin"]).defaults, **(step.get("settings") or {})}
    return step["plugin"] in GRID_PLUGINS and settings.get("quant_type") in GRID_TYPES


def no_onnx_form(step: dict[str, Any]) -> str:
    """Why a quantizing step other than a grid has no ONNX form, and the setting that has one."""
    name = step["plugin"]
    settings = {**plugin_class(name).defaults, **(step.get("settings") or {})}
    if name in GRID_PLUGINS:
        what = {"nf4": "bitsandbytes' NF4 codes", "fp4": "bitsandbytes' FP4 codes",
                "llm_int8": "bitsandbytes' LLM.int8 rows"}.get(settings.get("quant_type"), "its codes")
        return (f"compression.{name}.quant_type={settings.get('quant_type')} ({what}) has no ONNX form: quantize with "
                f"compression.{name}.quant_type=sym, which exports as it is (onnxruntime's MatMulNBits)")
    return (f"{name} has no ONNX form: quantize with compression.int8.quant_type=sym (or int4), which exports as it "
            f"is, or export the model before it was quantized with format=onnx compression=int8 (or int4): "
            f"onnxruntime's quantizer does it")


def check_exportable(model: InferenceModel, quantization: str | None = None) -> None:
    """Refuse, in one line, what the graph or onnxruntime's quantizers cannot express."""
    for step in model.record.compression:
        if plugin_class(step["plugin"]).quantizes and not on_grid(step):
            raise LmkitError(no_onnx_form(step))
        if on_grid(step) and quantization is not None:
            raise LmkitError(f"the model is already quantized ({step['plugin']} on a runtime grid) and exports as it "
                             f"is: drop compression={quantization}")
    if model.record.backbone.num_parameters() * 4 >= 2**31:  # the float stand-in of a grid model is written first
        raise LmkitError(f"{model.record.backbone.num_parameters():,} parameters make a float32 graph over ONNX's "
                         "2 GB protobuf limit, and lmkit does not write ONNX external data yet")
    if model.record.kind != "transformer" and quantization is not None:
        cell = model.record.backbone.cell
        if quantization == "int4":
            raise LmkitError(f"compression=int4 format=onnx: onnxruntime's 4-bit MatMulNBits does not cover the "
                             f"{cell.upper()} op, whose weights are most of this model: use compression=int8, or "
                             f"compression.int4.quant_type=sym (lmkit's grid, its recurrence exported as a Loop)")
        if cell == "gru":
            raise LmkitError(f"compression={quantization} format=onnx: onnxruntime has no int8 GRU op (it has one "
                             "for LSTMs): export the GRU in float32, or with compression.int8.quant_type=sym")


def export_graph(model: InferenceModel, path: Path, *, untie_head: bool = False) -> dict[str, Any]:
    """Write `model` as a float ONNX graph at `path`; returns its interface.

    `untie_head`: give a tied output head its own copy of the embedding. Tied, the head multiplies by the
    embedding's transpose, which no quantizer sees as a weight, so it would stay float32 (or be dequantized
    on every call); untied, both the embedding lookup and the head are quantized."""
    names = interface(model)
    # a copy (the caller's model stays where and as it was); a grid model's layers as float layers of their
    # dequantized weights, which onnx_grid.write_grid then rewrites into onnxruntime's block-quantized ops
    backbone = float_standin(copy.deepcopy(model.backbone)).float().eval().cpu()
    if untie_head and model.record.backbone.tie_weights:
        head = backbone.lm_head if model.record.kind == "transformer" else backbone.head
        head.weight = nn.Parameter(head.weight.detach().clone())
    ids = torch.zeros(2, 3, dtype=torch.long)  # batch and lengths above 1, so none is taken for a constant
    with warnings.catch_warnings(), _quiet("torch.onnx", "onnxscript"), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporters' progress lines, deprecation and shape-renaming chatter
        if model.record.kind == "transformer":
            require("onnxscript", "onnx")
            past = tuple(torch.zeros(2, s[1], 4, s[3]) for s in names["cache_shapes"][:-1])
            past_mask = torch.tensor([[0.0, 1, 1, 1], [1, 1, 1, 1]])  # a padded row, so no mask is taken for all ones
            batch, seq, past_len = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
            cache_axes = (*({0: batch, 2: past_len} for _ in past), {0: batch, 1: past_len})
            program = torch.onnx.export(TransformerGraph(backbone), (ids, *past, past_mask), dynamo=True,
                                        opset_version=OPSET, optimize=True, input_names=names["inputs"],
                                        output_names=names["outputs"], dynamic_shapes=({0: batch, 1: seq}, cache_axes))
            program.save(str(path), external_data=False)
            _tidy(path)
        else:
            # torch.export takes nn.LSTM's sequence length for a constant (a constraint violation at any sample
            # length), so recurrent models go through torch's TorchScript exporter, which keeps it dynamic
            state = tuple(torch.zeros(s[0], 2, s[2]) for s in names["cache_shapes"])
            axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"},
                    **{name: {1: "batch"} for name in names["inputs"][1:] + names["outputs"][1:]}}
            torch.onnx.export(RecurrentGraph(backbone), (ids, *state), str(path), dynamo=False, opset_version=OPSET,
                              input_names=names["inputs"], output_names=names["outputs"], dynamic_axes=axes)
    return names


def _tidy(path: Path) -> None:
    """What the dynamo exporter leaves that a deployed file need not carry: the sample's sequence length in
    the logits' declared shape (onnxruntime would warn on every call) and each node's Python stack and
    module path (a third of a small model's file)."""
    import onnx

    model = onnx.load(str(path))
    logits = model.graph.output[0].type.tensor_type.shape.dim
    logits[1].ClearField("dim_value")
    logits[1].dim_param = "seq"
    for node in model.graph.node:
        del node.metadata_props[:]
        node.ClearField("doc_string")
    onnx.save(model, str(path))


def quantize(src: Path, dst: Path, method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime's own quantizer on the float graph `src`; returns what config.json records."""
    require("onnxruntime", "onnx")
    if method in ("int8", "dynamic_int8"):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # weights int8 per output channel, activations quantized on the fly: the MatMulInteger kernels
        with _quiet("root"):
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gather", "LSTM"])
        return {"method": "dynamic_int8", "tool": "onnxruntime.quantization.quantize_dynamic", "per_channel": True}
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    block_size = make("int4", settings).blocksize  # the int4 recipe's setting, its default (null: 64) resolved
    if block_size not in INT4_BLOCK_SIZES:
        raise LmkitError(f"compression.int4.blocksize={block_size}: onnxruntime's MatMulNBits takes "
                         f"{', '.join(map(str, INT4_BLOCK_SIZES))}")
    with _quiet("root"):
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=True,
                                         op_types_to_quantize=("MatMul", "Gather"),
                                         quant_axes=(("MatMul", 0), ("Gather", 1)))
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    return {"method": "int4", "tool": "onnxruntime MatMulNBitsQuantizer", "block_size": block_size,
            "symmetric": True}


def export_onnx(model: InferenceModel, out: str | Path, *, quantization: tuple[str, dict[str, Any]] | None = None,
                overwrite: bool = False, files: dict[str, bytes] | None = None) -> Path:
    """Write `model` to `out` as model.onnx (quantized by onnxruntime when `quantization` names int8 or int4; a
    model on a runtime grid with its own integers, lmkit.deploy.onnx_grid),
    tokenizer.json (the `tokenizers` library's format), config.json and README.md, in one atomic step;
    `files` (report.json of the steps run in torch) go beside them."""
    check_exportable(model, quantization[0] if quantization else None)
    record = model.record
    with atomic_directory(Path(out), overwrite) as tmp:
        float_graph = tmp / "float.onnx"  # beside its destination: renaming it never crosses file systems
        names = export_graph(model, float_graph, untie_head=quantization is not None)
        runtime = {"name": "onnx", "file": "model.onnx", "opset": OPSET,
                   **{k: names[k] for k in ("inputs", "outputs", "cache_shapes")}, "quantization": None}
        if quantization is not None:
            runtime["quantization"] = quantize(float_graph, tmp / "model.onnx", *quantization)
            float_graph.unlink()
        elif grid_weights(model.backbone):
            runtime["quantization"] = write_grid(float_graph, tmp / "model.onnx", model.backbone)
            float_graph.unlink()
        else:
            float_graph.replace(tmp / "model.onnx")
        if model.has_tokenizer:
            tokenizer = model.tokenizer
            text = tokenizer.to_tokenizers_json() if tokenizer.kind == "char" else tokenizer.to_json()
            (tmp / "tokenizer.json").write_text(text, encoding="utf-8")
        config = {**record.replace(tokenizer=model.tokenizer.kind if model.has_tokenizer else None).to_dict(),
                  "runtime": runtime}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(config, (tmp / "model.onnx").stat().st_size))
        for name, content in (files or {}).items():
            (tmp / name).write_bytes(content)
    return Path(out)


def model_card(config: dict[str, Any], size: int) -> str:
    runtime = config["runtime"]
    quant = runtime["quantization"]
    steps = " -> ".join(r["plugin"] for r in config["compression"]) or "none"
    return (f"# lmkit {config['model']['kind']} language model, ONNX\n\n"
            f"- model.onnx: {size:,} bytes, opset {runtime['opset']}, weights "
            f"{quant['method'] + ' (' + quant['tool'] + ')' if quant else 'float32'}\n"
            f"- compression before export: {steps}\n- tokenizer.json: {config['tokenizer'] or 'none'} "
            "(the `tokenizers` library's format)\n"
            f"- inputs: {', '.join(runtime['inputs'])}\n- outputs: {', '.join(runtime['outputs'])}\n\n"
            "Output k+1 feeds input k+1 on the next call; an empty cache (past length 0, or zero state) starts.\n\n"
            "## Use\n\n```python\nimport lmkit\n\nmodel = lmkit.load(\"PATH\")  # onnxruntime underneath\n"
            "print(model.generate(\"ROMEO:\", max_new_tokens=200, temperature=0.8, top_k=50))\n```\n\n"
            "or with onnxruntime, numpy and tokenizers alone: see lmkit's docs/deployment.md, \"ONNX Runtime\".\n")


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence the named loggers below ERROR for a block (the quantizers log every node they touch)."""
    loggers = [logging.getLogger(n if n != "root" else None) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
