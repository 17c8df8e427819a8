"""ONNX exports, checked by onnxruntime itself: the graph interface, cached decoding against the torch model,
a decoding loop with no torch at all, onnxruntime's quantizers, the CLI, and the refusals."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import lmkit
from lmkit.backbones import LSTMConfig, TransformerConfig, build_backbone
from lmkit.data.tokenizer import CharTokenizer
from lmkit.errors import LmkitError
from lmkit.export import save
from lmkit.inference import InferenceModel
from lmkit.record import ModelRecord
from tests.test_commands import LMKIT, lmkit_cmd, one_error_line, trained  # noqa: F401 (a fixture)

ort = pytest.importorskip("onnxruntime")
from lmkit.deploy.onnx import export_onnx  # noqa: E402 (after the skip: it needs onnx installed)

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
TOKENIZER = CharTokenizer.from_texts([TEXT])
CONFIGS = {
    "learned": TransformerConfig(vocab_size=TOKENIZER.vocab_size, n_layer=2, n_head=2, n_embd=32, max_seq_len=96),
    "rope": TransformerConfig(vocab_size=TOKENIZER.vocab_size, n_layer=2, n_head=2, n_embd=32, max_seq_len=96,
                              position="rope", bias=False),
    "sinusoidal": TransformerConfig(vocab_size=TOKENIZER.vocab_size, n_layer=1, n_head=4, n_embd=32, max_seq_len=96,
                                    position="sinusoidal", layer_heads=[3], layer_ffn=[40]),  # as structured pruning leaves it
    "lstm": LSTMConfig(vocab_size=TOKENIZER.vocab_size, n_layer=2, n_embd=32, hidden_size=48),
    "gru": LSTMConfig(vocab_size=TOKENIZER.vocab_size, n_layer=1, n_embd=32, cell="gru"),
}


def model_of(name: str) -> InferenceModel:
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    backbone = build_backbone(cfg).eval()
    with torch.no_grad():  # weights far from the init's near-uniform outputs, so greedy decoding is not trivial
        for p in backbone.parameters():
            p.mul_(8 if p.dim() > 1 else 2)
    return InferenceModel(backbone, TOKENIZER, ModelRecord(backbone=cfg, tokenizer="char"))


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[InferenceModel, Path]]:
    tmp = tmp_path_factory.mktemp("onnx")
    out = {}
    for name in CONFIGS:
        model = model_of(name)
        out[name] = (model, export_onnx(model, tmp / name))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_through_onnxruntime_matches_torch(exports, name):
    model, path = exports[name]
    config = json.loads((path / "config.json").read_text())
    session = ort.InferenceSession(str(path / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == config["runtime"]["inputs"]
    assert [o.name for o in session.get_outputs()] == config["runtime"]["outputs"]
    inputs = config["runtime"]["inputs"]
    if name in ("lstm", "gru"):
        assert inputs == ["input_ids", "state.h", "state.c"][:3 if name == "lstm" else 2]
    else:
        assert inputs[1:3] == ["past_key_values.0.key", "past_key_values.0.value"]
        assert config["runtime"]["outputs"][1] == "present.0.key"

    onnx_model = lmkit.load(path)
    ids = torch.tensor([TOKENIZER.encode(TEXT)] * 3)  # batch 3, 54 tokens: neither is the export's sample size
    full = model(ids)
    torch.testing.assert_close(onnx_model(ids), full, atol=2e-3, rtol=1e-3)  # weights scaled up: logits in the tens
    backbone = onnx_model.backbone
    logits, state = backbone(ids[:, :20], backbone.init_state(3))  # a prompt in one call, from an empty cache
    pieces = [logits]
    logits, state = backbone(ids[:, 20:30], state)  # a chunk after a filled past: positions continue
    pieces.append(logits)
    for t in range(30, ids.size(1)):  # then one token per call
        logits, state = backbone(ids[:, t:t + 1], state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=2e-3, rtol=1e-3)  # weights scaled up: logits in the tens

    greedy = dict(max_new_tokens=100, temperature=0)  # past a Transformer's 96: the window slides
    assert onnx_model.generate("ROMEO:", **greedy) == model.generate("ROMEO:", **greedy)
    sampled = dict(max_new_tokens=40, temperature=1.0, top_k=10, seed=3)
    assert onnx_model.generate("ROMEO:", **sampled) == model.generate("ROMEO:", **sampled)


PLAIN_LOOP = '''
import builtins, json, sys
real_import = builtins.__import__
def no_torch(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
        raise ImportError("torch is not installed here")
    return real_import(name, *args, **kwargs)
builtins.__import__ = no_torch

import numpy as np
import onnxruntime
from tokenizers import Tokenizer

folder, prompt, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
runtime = json.load(open(f"{folder}/config.json"))["runtime"]
session = onnxruntime.InferenceSession(f"{folder}/{runtime['file']}")
tokenizer = Tokenizer.from_file(f"{folder}/tokenizer.json")
ids = tokenizer.encode(prompt).ids
# an empty cache: its batch axis (the 0 in cache_shapes) becomes 1; a Transformer's past length stays 0
cache = [np.zeros([d or 1 if axis == (0 if len(shape) == 4 else 1) else d for axis, d in enumerate(shape)],
                  np.float32) for shape in runtime["cache_shapes"]]
feed = np.array([ids], dtype=np.int64)
for _ in range(steps):  # the prompt in one call, then one token per call
    logits, *cache = session.run(None, {"input_ids": feed, **dict(zip(runtime["inputs"][1:], cache))})
    token = int(logits[0, -1].argmax())
    ids.append(token)
    feed = np.array([[token]], dtype=np.int64)
print(json.dumps({"text": tokenizer.decode(ids), "torch_loaded": "torch" in sys.modules}))
'''


@pytest.mark.parametrize("name", ["rope", "lstm"])
def test_a_plain_onnxruntime_loop_without_torch_generates_the_same_text(exports, name, tmp_path):
    model, path = exports[name]
    script = tmp_path / "loop.py"
    script.write_text(PLAIN_LOOP)
    result = subprocess.run([sys.executable, str(script), str(path), "ROMEO:", "50"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert not out["torch_loaded"]
    assert out["text"] == model.generate("ROMEO:", max_new_tokens=50, temperature=0)
    assert len(set(out["text"][6:])) > 3  # a real continuation, not one token repeated
