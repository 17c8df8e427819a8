"""A model on a runtime grid (lmkit.blockquant) in ONNX, as it is: lmkit's own integers and scales in
onnxruntime's block-quantized ops, so the model onnxruntime runs is the model lmkit evaluated.

How: the exporter (lmkit.deploy.onnx) writes a float stand-in whose weights are the grid's dequantized values
(`float_standin`); `write_grid` then finds each of those weights among the graph's initializers by value and
rewrites its consumers:

    MatMul(x, W^T)   -> com.microsoft::MatMulNBits(x, B, scales[, zero_points]), bits 4 or 8, block_size the grid's:
                        B uint8 [N, blocks, blocksize * bits / 8], 4-bit two per byte, the low nibble first
    Gather(E, ids)   -> com.microsoft::GatherBlockQuantized on the same B (a tied head and its embedding share
                        one copy of the codes), then a Reshape of its [.., blocks, blocksize] rows to [.., width]

    int4 sym    B holds u = q + 8, MatMulNBits' default zero point 8: (u - 8) * d = q * d, exactly lmkit's value
    int8 sym    u = q + 128 (default zero point 128): exactly lmkit's value
    int4 asym   u = q and float zero points z = -m / d, in the scales' type: (q - z) * d = q * d + m up to the
                float32 rounding of -m / d (a relative 1e-7 of the weight, measured below). A block whose d is 0
                (all of its values m) is written as codes 0, z = -1 and scale m: exactly m.
                GatherBlockQuantized takes integer zero points only, so an asymmetric embedding (an untied one,
                or a tied one with head_bits=4) is a Gather of its dequantized rows in float32: exact values,
                four bytes each.

The scales are lmkit's fp16 values, held as float32 (the graph is float32). No accuracy_level is set, so
onnxruntime multiplies float32 activations by the dequantized weights (int8 activations, accuracy_level=4,
would be faster and round more).

Recurrent models: an `nn.LSTM`/`nn.GRU` on a grid is lmkit's UnrolledRNN (per-layer input and recurrent
linears); the input projection of all steps is one MatMulNBits and the recurrent one runs in an ONNX Loop over
the steps (`LoopRNN`, a TorchScript loop that torch's TorchScript exporter writes as a Loop), its MatMulNBits
reading the codes from the main graph. The ONNX LSTM/GRU ops take float weights only.

Measured (onnxruntime 1.32 CPU; tests/test_onnx.py's small models, whose largest logits are 6 to 27):
onnxruntime's logits against lmkit's run with `set_kernel(model, "exact")` differ by 4e-6 to 1.1e-5, that is
2.7e-7 to 1.5e-6 of the largest logit (GPT-2 and Llama blocks, LSTM, GRU; int4 sym and asym, int8 sym); the
test's bound is 1e-5 of it, and the float model's logits sit 2.7e-2 (int8) to 0.5 (int4) of it away. The
symmetric grids' initializers decode to lmkit's weights bit for bit, the asymmetric one's to 1.1e-7 of the
largest weight. The trained 2x64 char Transformer, int4 sym rtn: perplexity 10.8674 through onnxruntime,
10.8678 in lmkit's own report (whose packed kernel multiplies bf16 activations).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lmkit.backbones.unrolled import UnrolledRNN
from lmkit.blockquant import BlockQuantEmbedding, BlockQuantLinear, BlockQuantWeight
from lmkit.errors import LmkitError
from lmkit.tensors import swap_modules

MS_DOMAIN = "com.microsoft"


def grid_weights(backbone: nn.Module) -> dict[str, BlockQuantWeight]:
    """Every grid weight of `backbone` by its module path, each shared (tied) one once."""
    return {name: m for name, m in backbone.named_modules() if isinstance(m, BlockQuantWeight)}


def float_weight(linear: nn.Module) -> torch.Tensor:
    """A linear layer's weight as the exporter should see it: a grid's dequantized values, or the float weight."""
    return linear.quantized.dequantize() if isinstance(linear, BlockQuantLinear) else linear.weight.detach()


def as_linear(module: nn.Module) -> nn.Linear:
    """`module` (a BlockQuantLinear or a Linear) as a Linear of its own float weight: never tied, so a head
    and its embedding each give the graph an initializer of their own to rewrite."""
    weight = float_weight(module)
    linear = nn.Linear(weight.size(1), weight.size(0), bias=module.bias is not None)
    linear.weight = nn.Parameter(weight.float().clone())
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().float().clone())
    return linear


def float_standin(backbone: nn.Module) -> nn.Module:
    """`backbone` (a copy: it is changed in place) with every grid layer as a float layer of its dequantized
    weight, and every UnrolledRNN as a LoopRNN, which exports its time loop as an ONNX Loop."""

    def convert(module: nn.Module) -> nn.Module | None:
        if isinstance(module, BlockQuantLinear):
            return as_linear(module)
        if isinstance(module, BlockQuantEmbedding):
            return nn.Embedding.from_pretrained(module.quantized.dequantize().clone(), freeze=True)
        if isinstance(module, UnrolledRNN):
            return LoopRNN(module)
        return None

    return swap_modules(backbone, convert)


@cache
def scripted_steps(cell: str) -> Any:
    """The time loop of one layer, scripted, so torch's TorchScript exporter writes an ONNX Loop over however many
    steps a call has (traced, a Python loop would be unrolled to the sample's length). Scripted on first use."""

    def lstm(gates_x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh_t: torch.Tensor,
             b_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs: list[torch.Tensor] = []
        for t in range(gates_x.size(1)):
            i, f, g, o = (gates_x[:, t] + (torch.matmul(h, w_hh_t) + b_hh)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), h, c

    def gru(gates_x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh_t: torch.Tensor,
            b_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs: list[torch.Tensor] = []
        for t in range(gates_x.size(1)):  # as UnrolledRNN: the reset gate scales the recurrent candidate only
            xr, xz, xn = gates_x[:, t].chunk(3, dim=-1)
            hr, hz, hn = (torch.matmul(h, w_hh_t) + b_hh).chunk(3, dim=-1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            outputs.append(h)
        return torch.stack(outputs, dim=1), h, c

    return torch.jit.script(lstm if cell == "lstm" else gru)


class LoopRNN(nn.Module):
    """UnrolledRNN's maths for export: per layer, the input projection of every step (a Linear, one MatMul),
    then a scripted loop whose recurrent product multiplies by the transposed weight, so the graph's MatMul
    reads an initializer of the layout every other Linear's has (W^T), which `write_grid` finds by value."""

    def __init__(self, rnn: UnrolledRNN) -> None:
        super().__init__()
        self.cell, self.num_layers = rnn.cell, rnn.num_layers
        self.ih = nn.ModuleList(as_linear(linear) for linear in rnn.ih)
        self.w_hh_t = nn.ParameterList(nn.Parameter(float_weight(hh).float().t().contiguous()) for hh in rnn.hh)
        self.b_hh = nn.ParameterList(nn.Parameter(hh.bias.detach().float().clone() if hh.bias is not None else
                                                  torch.zeros(hh.out_features)) for hh in rnn.hh)

    def forward(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        h_all, c_all = state if self.cell == "lstm" else (state, state)  # a GRU's loop carries h as c, unused
        steps, h_out, c_out = scripted_steps(self.cell), [], []
        for layer in range(self.num_layers):
            x, h, c = steps(self.ih[layer](x), h_all[layer], c_all[layer], self.w_hh_t[layer], self.b_hh[layer])
            h_out.append(h)
            c_out.append(c)
        h_n = torch.stack(h_out)
        return x, ((h_n, torch.stack(c_out)) if self.cell == "lstm" else h_n)


def onnx_layout(weight: BlockQuantWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B, scales, zero_points or None) of MatMulNBits for `weight`: B uint8 [N, blocks, blob], scales and
    zero points float32 [N, blocks]."""
    grid = weight.grid
    rows, cols = weight.shape
    codes = weight.codes.cpu().numpy().astype(np.int16).reshape(rows, cols // grid.blocksize, grid.blocksize)
    scales = weight.scales.cpu().numpy().astype(np.float32).copy()
    zero_points = None
    if grid.symmetric:
        unsigned = codes + 2 ** (grid.bits - 1)  # the ops' default zero point, so none is stored
    else:
        mins = weight.mins.cpu().numpy().astype(np.float32)
        unsigned = codes.copy()
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_points = np.where(scales != 0, -mins / scales, 0).astype(np.float32)
        flat = (scales == 0) & (mins != 0)  # every value of such a block is m: (0 - -1) * m
        unsigned[flat] = 0
        zero_points[flat], scales[flat] = -1, mins[flat]
    unsigned = unsigned.astype(np.uint8)
    packed = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4) if grid.bits == 4 else unsigned
    return np.ascontiguousarray(packed), scales, zero_points


class Rewriter:
    """Rewrites the consumers of the grid weights' float initializers in one ONNX model, adding each weight's
    integer initializers to the main graph once (subgraphs, such as an RNN's Loop body, read them from there)."""

    def __init__(self, model: Any, weights: dict[str, BlockQuantWeight]) -> None:
        from onnx import numpy_helper

        self.model, self.graph, self.weights = model, model.graph, weights
        # by the exact bytes and shape of the float values the stand-in gave the exporter
        self.matmul_b: dict[tuple[bytes, tuple[int, ...]], str] = {}
        self.gather_data: dict[tuple[bytes, tuple[int, ...]], str] = {}
        for name, weight in weights.items():
            values = weight.dequantize().cpu().numpy().astype(np.float32)
            self.matmul_b.setdefault(key(np.ascontiguousarray(values.T)), name)
            self.gather_data.setdefault(key(values), name)
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.float_keys = {name: key(numpy_helper.to_array(init)) for name, init in self.initializers.items()
                           if init.data_type == 1 and len(init.dims) == 2}  # float32 matrices only
        self.written: dict[str, dict[str, str]] = {}  # weight path -> its initializers' names
        self.layouts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        self.counts = {"MatMulNBits": 0, "GatherBlockQuantized": 0, "Gather (dequantized rows)": 0}
        self.used: set[str] = set()

    def run(self) -> dict[str, int]:
        self.rewrite_graph(self.graph)
        missing = sorted(set(self.weights) - self.used)
        if missing:  # a grid weight the exporter did not write as a MatMul or Gather of an initializer
            raise LmkitError(f"the ONNX graph multiplies by {missing[0]} in a form lmkit cannot rewrite into "
                             "onnxruntime's block-quantized ops: export the model before it was quantized")
        drop_unused_initializers(self.graph)
        if not any(op.domain == MS_DOMAIN for op in self.model.opset_import):
            from onnx import helper

            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        return self.counts

    def rewrite_graph(self, graph: Any) -> None:
        """`graph`'s nodes rewritten, its subgraphs' first (extending a node list copies the nodes, so a
        subgraph is edited while its node is still the one the graph holds)."""
        for node in graph.node:
            for sub in subgraphs(node):
                self.rewrite_graph(sub)
        rewritten = [new for node in graph.node for new in self.rewrite(node)]
        del graph.node[:]
        graph.node.extend(rewritten)

    def weight_of(self, name: str, table: dict[tuple[bytes, tuple[int, ...]], str]) -> str | None:
        found = self.float_keys.get(name)
        return table.get(found) if found is not None else None

    def rewrite(self, node: Any) -> list[Any]:
        if node.op_type == "MatMul" and node.domain == "":
            path = self.weight_of(node.input[1], self.matmul_b)
            if path is not None:
                return [self.matmul_nbits(node, path)]
        if node.op_type == "Gather" and node.domain == "" and not gather_axis(node):
            path = self.weight_of(node.input[0], self.gather_data)
            if path is not None:
                return self.gather(node, path)
        return [node]

    def matmul_nbits(self, node: Any, path: str) -> Any:
        from onnx import helper

        weight, names = self.weights[path], self.write(path)
        inputs = [node.input[0], names["packed"], names["scales"]] + ([names["zero_points"]]
                                                                       if "zero_points" in names else [])
        self.counts["MatMulNBits"] += 1
        self.used.add(path)
        return helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{path}.MatMulNBits",
                                domain=MS_DOMAIN, K=weight.shape[1], N=weight.shape[0], bits=weight.grid.bits,
                                block_size=weight.grid.blocksize)

    def gather(self, node: Any, path: str) -> list[Any]:
        """The embedding's rows from the codes (GatherBlockQuantized, on the head's B when tied), or, for an
        asymmetric grid (no float zero points there), the float Gather of dequantized rows as exported."""
        weight = self.weights[path]
        self.used.add(path)
        if not weight.grid.symmetric:
            self.counts["Gather (dequantized rows)"] += 1
            return [node]
        from onnx import helper

        names = self.write(path)
        if "row_scales" not in names:  # GatherBlockQuantized's scales have the data's rank: [N, blocks, 1]
            names["row_scales"] = self.add(f"{path}.row_scales", self.layouts[path][1][..., None])
            names["width"] = self.add(f"{path}.width", np.array([weight.shape[1]], dtype=np.int64))
        blocks, shape = f"{node.output[0]}.blocks", f"{node.output[0]}.shape"
        self.counts["GatherBlockQuantized"] += 1
        return [helper.make_node("GatherBlockQuantized", [names["packed"], node.input[1], names["row_scales"]],
                                 [blocks], name=f"{path}.GatherBlockQuantized", domain=MS_DOMAIN,
                                 bits=weight.grid.bits, block_size=weight.grid.blocksize, gather_axis=0,
                                 quantize_axis=2),
                # [..ids, blocks, blocksize] -> [..ids, width]
                helper.make_node("Shape", [node.input[1]], [f"{shape}.ids"]),
                helper.make_node("Concat", [f"{shape}.ids", names["width"]], [shape], axis=0),
                helper.make_node("Reshape", [blocks, shape], list(node.output))]

    def write(self, path: str) -> dict[str, str]:
        """The integer initializers of the weight at `path`, added once."""
        if path not in self.written:
            self.layouts[path] = packed, scales, zero_points = onnx_layout(self.weights[path])
            self.written[path] = {"packed": self.add(f"{path}.packed", packed),
                                  "scales": self.add(f"{path}.scales", scales)}
            if zero_points is not None:
                self.written[path]["zero_points"] = self.add(f"{path}.zero_points", zero_points)
        return self.written[path]

    def add(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name


def key(array: np.ndarray) -> tuple[bytes, tuple[int, ...]]:
    return array.tobytes(), tuple(array.shape)


def gather_axis(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def subgraphs(node: Any) -> Iterator[Any]:
    """The graphs a node holds (Loop, If, Scan bodies)."""
    from onnx import AttributeProto

    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == AttributeProto.GRAPHS:
            yield from attribute.graphs


def graphs(graph: Any) -> Iterator[Any]:
    """`graph` and every subgraph inside it."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from graphs(sub)


def drop_unused_initializers(graph: Any) -> None:
    """Remove the main graph's initializers no node reads any more (the float weights just replaced)."""
    read = {name for g in graphs(graph) for node in g.node for name in node.input}
    read |= {output.name for output in graph.output}
    kept = [init for init in graph.initializer if init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def write_grid(src: Path, dst: Path, backbone: nn.Module) -> dict[str, Any]:
    """Rewrite the float stand-in graph `src` of the grid model `backbone` into `dst`; returns what config.json
    records under runtime.quantization."""
    import onnx

    weights = grid_weights(backbone)
    model = onnx.load(str(src))
    counts = Rewriter(model, weights).run()
    onnx.save(model, str(dst))
    grids = sorted({w.grid.describe() for w in weights.values()})
    bits = min(w.grid.bits for w in weights.values())
    return {"method": f"int{bits}", "tool": "lmkit's grid codes in onnxruntime's MatMulNBits", "grids": grids,
            "ops": {op: n for op, n in counts.items() if n}}
