"""An ONNX export as a backbone: what `lmkit.load(DIR)` returns for one, run by onnxruntime.

`OnnxBackbone` keeps the backbone interface (`forward(ids, state) -> (logits, state)`, `init_state`,
`stack_states`, `max_seq_len`), so lmkit's one sampling loop, `lmkit generate|eval` and `lmkit serve`
drive an ONNX model exactly as they drive a torch one. The graph's interface is in lmkit.deploy.onnx.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lmkit.deploy import require
from lmkit.errors import LmkitError, first_line
from lmkit.inference import InferenceModel
from lmkit.record import ModelRecord


class OnnxState:
    """What the graph returned as present.* (the next call's cache inputs), and how many slots it holds.

    `rows`, when set, are the rows of `arrays` this state is (`select_states` defers the copy: a server
    selects the rows that stay and stacks them with new ones at once, and each copy of a 32-row cache
    cost as much as a decoding step)."""

    def __init__(self, arrays: list[np.ndarray], pos: int, batch_axis: int, rows: list[int] | None = None) -> None:
        self.arrays, self.pos, self.batch_axis = arrays, pos, batch_axis  # keys/values [batch, ...]; RNN [layers, batch, ...]
        self.rows = rows

    @property
    def batch_size(self) -> int:
        return len(self.rows) if self.rows is not None else self.arrays[0].shape[self.batch_axis]

    def selected(self) -> list[np.ndarray]:
        """The arrays of this state's rows only."""
        if self.rows is None:
            return self.arrays
        return [a.take(self.rows, axis=self.batch_axis) for a in self.arrays]


UNMASKED = ("its ONNX Transformer graph has no past_mask (an export from before lmkit batched ONNX Transformers), so "
            "rows of different lengths cannot share a batch: re-export it with `lmkit export format=onnx` to batch")


class OnnxBackbone(nn.Module):
    def __init__(self, session: Any, runtime: dict[str, Any], record: ModelRecord) -> None:
        super().__init__()
        self.session, self.runtime, self.config = session, runtime, record.backbone
        self.recurrent = record.kind != "transformer"
        self.max_seq_len: int | None = None if self.recurrent else record.backbone.max_seq_len
        self.batch_axis = 1 if self.recurrent else 0
        self.inputs, self.outputs = runtime["inputs"], runtime["outputs"]
        self.masked = self.inputs[-1] == "past_mask"  # the last cache entry, in exports that batch Transformers

    def init_state(self, batch_size: int, device: Any = None, dtype: Any = None) -> OnnxState:
        """An empty cache: past length 0 for a Transformer, zeros for a recurrent state."""
        arrays = []
        for shape in self.runtime["cache_shapes"]:
            shape = list(shape)
            shape[self.batch_axis] = batch_size
            arrays.append(np.zeros(shape, dtype=np.float32))
        return OnnxState(arrays, 0, self.batch_axis)

    def forward(self, ids: torch.Tensor, state: OnnxState | None = None) -> tuple[torch.Tensor, OnnxState]:
        state = state if state is not None else self.init_state(ids.size(0))
        if self.max_seq_len and state.pos + ids.size(1) > self.max_seq_len:
            raise ValueError(f"sequence of {state.pos + ids.size(1)} tokens exceeds max_seq_len={self.max_seq_len}")
        feeds = {"input_ids": ids.detach().cpu().numpy().astype(np.int64)}
        feeds.update(zip(self.inputs[1:], state.selected()))
        logits, *present = self.session.run(None, feeds)
        return torch.from_numpy(logits), OnnxState(present, state.pos + ids.size(1), self.batch_axis)

    def stack_states(self, states: list[OnnxState]) -> OnnxState:
        """One batch of the rows of `states` (of any lengths), so they decode together. A Transformer's rows
        are right-aligned at the longest row's length, the slots before a shorter row's text zero in
        keys, values and past_mask (as `Transformer.stack_states` pads its cache)."""
        if self.recurrent:
            return OnnxState([np.concatenate(parts, axis=1) for parts in zip(*(s.selected() for s in states))],
                             max(s.pos for s in states), self.batch_axis)
        if not self.masked:
            if len({s.pos for s in states}) > 1:
                raise ValueError(UNMASKED)
            return OnnxState([np.concatenate(parts) for parts in zip(*(s.selected() for s in states))],
                             states[0].pos, 0)
        masks = [s.arrays[-1] if s.rows is None else s.arrays[-1][s.rows] for s in states]
        held = [int(m.sum(axis=1).max()) for m in masks]  # each state's longest row
        pos, sizes = max(held), [s.batch_size for s in states]
        arrays = []
        for layer in range(len(states[0].arrays)):
            ref = states[0].arrays[layer]
            shape = [sum(sizes), *ref.shape[1:]]
            shape[1 if ref.ndim == 2 else 2] = pos
            out, row = np.zeros(shape, dtype=ref.dtype), 0
            for state, n, size in zip(states, held, sizes):  # one block per state: its rows are right-aligned already
                part = state.arrays[layer]
                src = part[:, part.shape[1] - n:] if part.ndim == 2 else part[:, :, part.shape[2] - n:]
                dst = out[row:row + size, pos - n:] if part.ndim == 2 else out[row:row + size, :, pos - n:]
                if state.rows is None:
                    dst[...] = src
                else:  # the selected rows, straight into place, a run of consecutive rows per copy
                    for to, start, stop in runs(state.rows):
                        dst[to:to + stop - start] = src[start:stop]
                row += size
            arrays.append(out)
        return OnnxState(arrays, pos, 0)

    def select_states(self, state: OnnxState, rows: list[int]) -> OnnxState:
        if state.rows is not None:
            rows = [state.rows[r] for r in rows]
        return OnnxState(state.arrays, state.pos, self.batch_axis, rows)


def runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """`rows` as runs of consecutive rows: (index in `rows` of the run's first, first row, row after the last)."""
    out, i = [], 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and rows[j] == rows[j - 1] + 1:
            j += 1
        out.append((i, rows[i], rows[j - 1] + 1))
        i = j
    return out


def is_onnx_export(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("runtime", {}).get("name") == "onnx"
    except (OSError, ValueError, AttributeError):
        return False


def load_onnx(path: Path, device: str | torch.device | None = None) -> InferenceModel:
    """An ONNX export directory as an `InferenceModel` whose backbone onnxruntime runs (on the CPU)."""
    ort = require("onnxruntime", "onnx")
    from lmkit.data.tokenizer import CharTokenizer, tokenizer_from_json

    if device is not None and torch.device(device).type != "cpu":
        raise LmkitError(f"device={device}: lmkit runs ONNX exports with onnxruntime's CPU provider")
    config = json.loads((path / "config.json").read_text())
    record = ModelRecord.from_dict(config, str(path / "config.json"))
    runtime = config["runtime"]
    missing = [key for key in ("inputs", "outputs", "cache_shapes", "file") if key not in runtime]
    if missing or Path(runtime.get("file", "")).name != runtime.get("file"):  # a file in this folder, no path
        raise LmkitError(f"{path / 'config.json'}: the runtime block lacks {', '.join(missing) or 'a plain file name'}")
    graph = path / runtime["file"]
    if not graph.is_file():
        raise LmkitError(f"{path} has no {graph.name}")
    try:
        options = ort.SessionOptions()
        # torch's thread count, which `lmkit serve` sets per worker: onnxruntime's own default (every core, its
        # pool spinning between calls) took the cores the server's HTTP process and its clients need
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types, with a useful first line
        raise LmkitError(f"{graph} is corrupt or not an ONNX model onnxruntime can run ({first_line(e)})") from None
    found = [i.name for i in session.get_inputs()]
    if found != runtime["inputs"]:
        raise LmkitError(f"{graph} takes inputs {found}, not the {runtime['inputs']} config.json names")
    tokenizer = None
    if record.tokenizer is not None:
        if not (path / "tokenizer.json").is_file():
            raise LmkitError(f"{path}: config.json names a {record.tokenizer} tokenizer but tokenizer.json is missing")
        text = (path / "tokenizer.json").read_text(encoding="utf-8")
        tokenizer = CharTokenizer.from_tokenizers_json(text) if record.tokenizer == "char" else tokenizer_from_json(text)
    return InferenceModel(OnnxBackbone(session, runtime, record), tokenizer, record).eval()
