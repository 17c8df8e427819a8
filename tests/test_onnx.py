"""ONNX exports, checked by onnxruntime itself: the graph interface, cached decoding against the torch model,
a decoding loop with no torch at all, onnxruntime's quantizers, the CLI, and the refusals."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lmkit
from lmkit.backbones import LSTMConfig, TransformerConfig, build_backbone
from lmkit.data.tokenizer import CharTokenizer
from lmkit.errors import LmkitError
from lmkit.inference import InferenceModel
from lmkit.record import ModelRecord
from tests.helpers import lmkit_main, one_error_line

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
    "llama": TransformerConfig(vocab_size=TOKENIZER.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                               max_seq_len=96, position="rope", bias=False, norm="rmsnorm", mlp="swiglu",
                               mlp_hidden=48, rope_base=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "lstm": LSTMConfig(vocab_size=TOKENIZER.vocab_size, n_layer=2, n_embd=32, hidden_size=48),
    "gru": LSTMConfig(vocab_size=TOKENIZER.vocab_size, n_layer=1, n_embd=32, cell="gru"),
}


def model_of(name: str) -> InferenceModel:
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    scale = 8 if cfg.kind == "transformer" else 4  # a recurrent net turns chaotic (and quantization noisy) above
    backbone = build_backbone(cfg).eval()
    with torch.no_grad():  # weights far from the init's near-uniform outputs, so greedy decoding is not trivial
        for p in backbone.parameters():
            p.mul_(scale if p.dim() > 1 else 2)
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
# an empty cache: its batch axis (each shape's first 0) becomes 1; a Transformer's past length stays 0
cache = [np.zeros(s[:s.index(0)] + [1] + s[s.index(0) + 1:], np.float32) for s in runtime["cache_shapes"]]
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


def op_types(path: Path) -> list[str]:
    import onnx

    return [node.op_type for node in onnx.load(str(path / "model.onnx")).graph.node]


@pytest.mark.parametrize("name, method, op", [("learned", "int8", "MatMulInteger"), ("rope", "int4", "MatMulNBits"),
                                              ("llama", "int8", "MatMulInteger"), ("llama", "int4", "MatMulNBits"),
                                              ("lstm", "int8", "DynamicQuantizeLSTM")])
def test_onnxruntime_quantizers_write_integer_kernels_that_decode_alike(exports, name, method, op, tmp_path):
    model, dense_path = exports[name]
    path = export_onnx(model, tmp_path / method, quantization=(method, {"blocksize": 32}))
    assert op not in op_types(dense_path)
    # every weight matrix, the tied output head included (it is exported untied, so that it is quantized too)
    cfg = model.record.backbone
    per_layer = 5 if cfg.kind == "transformer" and cfg.mlp == "swiglu" else 4  # SwiGLU: gate, up and down
    assert op_types(path).count(op) == (per_layer * cfg.n_layer + 1 if cfg.kind == "transformer" else cfg.n_layer)
    runtime = json.loads((path / "config.json").read_text())["runtime"]
    assert runtime["quantization"]["method"] == ("int4" if method == "int4" else "dynamic_int8")
    assert (path / "model.onnx").stat().st_size < 0.6 * (dense_path / "model.onnx").stat().st_size
    ids = torch.tensor([TOKENIZER.encode(TEXT)])
    dense, quantized = lmkit.load(dense_path)(ids), lmkit.load(path)(ids)
    # rounding moves the logits, mostly not the model's choices; 4 bits of a random 32-wide model move more
    # (the trained default models' perplexity through each runtime is in bench/deploy.py)
    swiglu = getattr(cfg, "mlp", None) == "swiglu"
    error = (dense - quantized).norm() / dense.norm()
    if method == "int8":
        assert (dense.argmax(-1) == quantized.argmax(-1)).float().mean() > 0.9
        assert 0 < error < (0.1 if swiglu else 0.05)  # (SwiGLU multiplies two quantized matmuls: 7% measured)
        return
    # 4 bits: onnxruntime's rounding costs what round-to-nearest on the same grid costs lmkit (every matrix, the head
    # included, at 4 bits; blocks of 16, as the 48-wide MLP output needs). Measured: rope 0.400 and 0.400, llama
    # 0.556 and 0.528; unrelated logits would be about 1.4. The argmax agreement of these near-flat random logits is
    # a coin flip for the Llama block (50-57% over draws): the error is the firmer check.
    with torch.no_grad():
        nearest = on_grid(name, "int4", "sym", head_bits=4, blocksize=16)(ids)
    assert 0 < error < 1.25 * (dense - nearest).norm() / dense.norm()
    assert (dense.argmax(-1) == quantized.argmax(-1)).float().mean() > (0.4 if swiglu else 0.6)


def test_refusals_are_one_line(exports, tmp_path):
    lstm, _ = exports["lstm"]
    with pytest.raises(LmkitError, match="MatMulNBits does not cover the LSTM op"):
        export_onnx(lstm, tmp_path / "a", quantization=("int4", {}))
    gru, _ = exports["gru"]
    with pytest.raises(LmkitError, match="no int8 GRU op"):
        export_onnx(gru, tmp_path / "b", quantization=("int8", {}))
    with pytest.raises(LmkitError, match="blocksize=512: onnxruntime.s MatMulNBits takes 16, 32"):
        export_onnx(exports["rope"][0], tmp_path / "c", quantization=("int4", {"blocksize": 512}))
    assert not any(tmp_path.iterdir())  # nothing half-written

    from lmkit.plugins import CompressContext, make

    quantized = model_of("learned")
    record = {"plugin": "dynamic_int8", "settings": {}, **make("dynamic_int8").apply(quantized, CompressContext(""))}
    quantized.record = quantized.record.replace(compression=[record])
    with pytest.raises(LmkitError, match="dynamic_int8 has no ONNX form"):
        export_onnx(quantized, tmp_path / "d")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for file in ("config.json", "tokenizer.json"):
        (corrupt / file).write_bytes((exports["learned"][1] / file).read_bytes())
    (corrupt / "model.onnx").write_bytes((exports["learned"][1] / "model.onnx").read_bytes()[:5000])
    with pytest.raises(LmkitError, match="model.onnx is corrupt or not an ONNX model"):
        lmkit.load(corrupt)


def on_grid(name: str, plugin: str, quant_type: str, **settings) -> InferenceModel:
    """`model_of(name)` through `compression=<plugin> quant_type=<quant_type>` (round to nearest), run exactly as
    stored (the `exact` kernel: the dequantized fp32 weights, which is what onnxruntime multiplies by too)."""
    from lmkit.blockquant import set_kernel
    from lmkit.plugins import CompressContext, make

    model = model_of(name)
    blocksize = 16 if name == "lstm" else 32  # the LSTM's recurrent matrices are 48 wide
    step = make(plugin, {"quant_type": quant_type, "blocksize": blocksize, **settings})
    record = {"plugin": plugin, "settings": step.settings, **step.apply(model, CompressContext(""))}
    model.record = model.record.replace(compression=[record])
    set_kernel(model.backbone, "exact")
    return model


def all_nodes(graph) -> list:
    """The nodes of `graph` and of the subgraphs inside it (an RNN's Loop body)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        nodes += [n for a in node.attribute if a.g.node for n in all_nodes(a.g)]
    return nodes


def decode(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int) -> np.ndarray:
    """What MatMulNBits (and GatherBlockQuantized) compute from their initializers: (u - zero point) * scale per
    block, u the unsigned codes (4-bit: two per byte, the low nibble first); zero point 2^(bits-1) when none."""
    rows, blocks = packed.shape[:2]
    unsigned = np.stack([packed & 15, packed >> 4], axis=-1).reshape(rows, blocks, -1) if bits == 4 else packed
    zero = zero_points.reshape(rows, blocks, 1) if zero_points is not None else np.float32(2 ** (bits - 1))
    return ((unsigned.astype(np.float32) - zero) * scales.reshape(rows, blocks, 1)).reshape(rows, -1)


GRID_MODELS = [("learned", "int4", "sym", {}), ("learned", "int4", "asym", {}), ("learned", "int8", "sym", {}),
               ("lstm", "int4", "sym", {}), ("lstm", "int4", "asym", {"head_bits": 4}), ("lstm", "int8", "sym", {}),
               ("gru", "int8", "sym", {})]


@pytest.mark.parametrize("name, plugin, quant_type, settings", GRID_MODELS)
def test_a_grid_model_exports_its_own_integers_and_onnxruntime_computes_its_logits(name, plugin, quant_type,
                                                                                  settings, tmp_path):
    """A model on a runtime grid exports as it is: every matrix a MatMulNBits whose initializers decode to lmkit's
    dequantized weights (bit for bit on the symmetric grids), and onnxruntime's logits are lmkit's."""
    import onnx
    from onnx import numpy_helper

    model = on_grid(name, plugin, quant_type, **settings)
    path = export_onnx(model, tmp_path / "grid")
    graph = onnx.load(str(path / "model.onnx")).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    weights = dict(model.backbone.named_modules())
    nodes = all_nodes(graph)
    matmuls = [n for n in nodes if n.op_type == "MatMulNBits"]
    cfg = model.record.backbone
    # the Transformer's 4 per block and the head; an RNN's ih and hh per layer (hh in the Loop), proj and head
    recurrent = 2 * cfg.n_layer + 1 + (model.backbone.proj is not None) if cfg.kind != "transformer" else None
    assert len(matmuls) == (4 * cfg.n_layer + 1 if cfg.kind == "transformer" else recurrent)
    assert not [n for n in nodes if n.op_type in ("MatMul", "Gemm", "LSTM") and n.input[1] in arrays]  # no float weight
    gathers = [n for n in nodes if n.op_type == "GatherBlockQuantized"]
    for node in matmuls + gathers:
        data = node.input[0] if node.op_type == "GatherBlockQuantized" else node.input[1]
        weight = weights[data.removesuffix(".packed")]
        attrs = {a.name: a.i for a in node.attribute}
        zero_points = arrays.get(node.input[3]) if node.op_type == "MatMulNBits" and len(node.input) > 3 else None
        assert (zero_points is None) == weight.grid.symmetric and attrs["bits"] == weight.grid.bits
        assert attrs["block_size"] == weight.grid.blocksize
        got, want = decode(arrays[data], arrays[node.input[2]], zero_points, attrs["bits"]), weight.dequantize().numpy()
        if weight.grid.symmetric:
            assert np.array_equal(got, want)  # lmkit's integers and fp16 scales, exactly
        else:  # (q + m/d) * d: m/d rounded to float32 once
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    if settings.get("head_bits") == 4:  # an asymmetric tied embedding: GatherBlockQuantized has no float zero points
        assert not gathers
        [rows] = [arrays[n.input[0]] for n in nodes if n.op_type == "Gather" and n.input[0] in arrays
                  and arrays[n.input[0]].shape[0] == cfg.vocab_size]
        assert np.array_equal(rows, model.backbone.embedding.quantized.dequantize().numpy())
    else:  # the tied embedding gathers the head's own codes
        assert len(gathers) == 1 and gathers[0].input[0] in {n.input[1] for n in matmuls}

    ids = torch.tensor([TOKENIZER.encode(TEXT)] * 2)
    with torch.no_grad():
        quantized, dense = model(ids), model_of(name)(ids)
    from_onnx = lmkit.load(path)(ids)
    # both multiply float32 activations by the same float32 weights; measured at most 4e-7 of the largest logit
    bound = 1e-5 * float(quantized.abs().max())
    assert float((from_onnx - quantized).abs().max()) <= bound
    assert float((dense - quantized).abs().max()) > 100 * bound  # the float model's logits: far outside it
    runtime = json.loads((path / "config.json").read_text())["runtime"]
    assert runtime["quantization"]["method"] == plugin and runtime["quantization"]["ops"]["MatMulNBits"] == len(matmuls)


def test_an_asymmetric_block_of_one_value_decodes_exactly():
    """A block whose values are all m has d = 0: no zero point gives (q - z) * 0 = m, so it is written as codes 0,
    zero point -1 and scale m."""
    from lmkit.blockquant import BlockQuantWeight, Grid
    from lmkit.deploy.onnx_grid import onnx_layout

    codes = torch.randint(0, 16, (2, 32), dtype=torch.int8)
    scales, mins = torch.tensor([[0.5, 0.0], [0.25, 0.0]]), torch.tensor([[-1.0, 0.75], [0.5, 0.0]])
    weight = BlockQuantWeight(codes, scales, mins, Grid(4, False, 16))
    packed, onnx_scales, zero_points = onnx_layout(weight)
    np.testing.assert_array_equal(decode(packed, onnx_scales, zero_points, 4), weight.dequantize().numpy())


def test_quantized_models_off_the_grids_are_refused_naming_the_setting_that_exports(tmp_path):
    """NF4/FP4, LLM.int8 and dynamic_int8 models have no ONNX form: one line naming quant_type=sym. A grid step
    in an export's recipe runs in torch and exports as it is; onnxruntime's quantizers keep the float model's."""
    from lmkit.deploy.onnx import split_recipe

    model = model_of("learned")
    for step, named in [({"plugin": "int4", "settings": {"quant_type": "nf4"}}, "compression.int4.quant_type=nf4"),
                        ({"plugin": "int4", "settings": {"quant_type": "fp4"}}, "compression.int4.quant_type=fp4"),
                        ({"plugin": "int8", "settings": {}}, "compression.int8.quant_type=llm_int8"),
                        ({"plugin": "dynamic_int8", "settings": {}}, "dynamic_int8")]:
        quantized = copy.copy(model)
        quantized.record = model.record.replace(compression=[step])
        with pytest.raises(LmkitError, match=f"^{named}.* has no ONNX form: quantize with "
                                             f"compression.{'int8' if 'int8' in named else 'int4'}.quant_type=sym"):
            export_onnx(quantized, tmp_path / "refused")
    grid = copy.copy(model)
    grid.record = model.record.replace(compression=[{"plugin": "int8", "settings": {"quant_type": "sym"}}])
    with pytest.raises(LmkitError, match="already quantized .* exports as it is: drop compression=int8"):
        export_onnx(grid, tmp_path / "refused", quantization=("int8", {}))
    assert not any(tmp_path.iterdir())

    assert split_recipe(model, {"int4": {"quant_type": "sym"}}) == ({"int4": {"quant_type": "sym"}}, None)
    assert split_recipe(model, {"int4": {"quant_type": "nf4", "blocksize": 32}}) == ({}, ("int4", {"quant_type": "nf4",
                                                                                                   "blocksize": 32}))
    assert split_recipe(model, {"int8": None}) == ({}, ("int8", {}))


def test_cli_exports_a_pruned_int8_model_that_generate_and_eval_run(trained, tmp_path):
    """`lmkit export format=onnx compression=[prune,int8]`: pruning in torch, int8 by onnxruntime; then
    `lmkit generate` and `lmkit eval` on the folder, and a one-line refusal that writes nothing."""
    env = {"LMKIT_CACHE": str(trained["cache"])}
    out = tmp_path / "onnx"
    result = lmkit_main("export", f"model={trained['ckpt']}", f"out={out}", "format=onnx", "compression=[prune,int8]",
                       "compression.prune.finetune_steps=0", "gen_tokens=0", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert [r["plugin"] for r in config["compression"]] == ["prune"]
    assert config["runtime"]["quantization"]["method"] == "dynamic_int8"
    assert "MatMulInteger" in op_types(out) and (out / "report.json").is_file()

    greedy = ["prompt=ROMEO:", "max_new_tokens=40", "temperature=0"]
    from_onnx = lmkit_main("generate", f"model={out}", *greedy, env=env)
    assert from_onnx.returncode == 0, from_onnx.stderr[-2000:]
    model = lmkit.load(out)
    assert from_onnx.stdout.strip() == model.generate("ROMEO:", max_new_tokens=40, temperature=0).strip()
    # its perplexity is the dense model's times what pruning cost in torch (report.json), and int8's rounding little
    evaluated = lmkit_main("eval", f"model={out}", "max_windows=4", env=env)
    dense = lmkit_main("eval", f"model={trained['ckpt']}", "max_windows=4", env=env)
    assert evaluated.returncode == 0 and dense.returncode == 0, evaluated.stderr[-2000:] + dense.stderr[-2000:]
    ratio = json.loads(evaluated.stdout)["perplexity"] / json.loads(dense.stdout)["perplexity"]
    pruning = json.loads((out / "report.json").read_text())["after_vs_before"]["perplexity"]
    assert ratio == pytest.approx(pruning, rel=0.02), (ratio, pruning)  # measured 0.9999 against 1.0002

    # the refusals through `lmkit`'s main in this process (one-line refusals of `lmkit export` in a process of their
    # own: test_commands.py's)
    refused = lmkit_main("export", f"model={trained['ckpt']}", f"out={tmp_path / 'no'}", "format=onnx",
                         "compression=[int8,prune]")
    one_error_line(refused, "int8")
    again = lmkit_main("export", f"model={out}", f"out={tmp_path / 'no'}")
    one_error_line(again, "is an ONNX export: export from the lmkit model or checkpoint it came from")
    assert not (tmp_path / "no").exists()


def test_rows_of_different_lengths_decode_together_through_past_mask(exports):
    """Rows prefilled apart and stacked (the shorter one padded on the left, as `lmkit serve` batches them)
    give each row's logits as if it ran alone, at its own positions; a row leaving trims the padding."""
    for name in ("learned", "llama", "sinusoidal"):
        model, path = exports[name]
        backbone = lmkit.load(path).backbone
        texts = [torch.tensor([TOKENIZER.encode(t)]) for t in ("ROMEO: But soft, what", "light", "O")]
        states = [backbone(ids, backbone.init_state(1))[1] for ids in texts]
        state = backbone.stack_states(states)
        assert state.pos == 21 and state.arrays[-1].sum(axis=1).tolist() == [21, 5, 1]
        following = torch.tensor([[3, 4], [5, 6], [7, 8]])
        logits, state = backbone(following, state)
        for row, ids in enumerate(texts):
            alone = model(torch.cat([ids, following[row:row + 1]], dim=1))[0, -2:]
            torch.testing.assert_close(logits[row], alone, atol=2e-3, rtol=1e-3)
        short = backbone.stack_states([backbone.select_states(state, [1, 2])])
        assert short.pos == 7 and short.arrays[0].shape[2] == 7


def test_an_export_from_before_past_mask_loads_and_serves_one_request_at_a_time():
    """tests/data/format1-transformer-onnx: an ONNX Transformer exported before graphs took past_mask."""
    from lmkit.serve.engine import Engine

    old = lmkit.load(Path(__file__).parent / "data" / "format1-transformer-onnx")
    assert "past_mask" not in old.backbone.inputs
    same = dict(max_new_tokens=40, temperature=0.8, seed=1)
    assert old.generate("ROMEO:", **same) == lmkit.load(Path(__file__).parent / "data" / "format1-transformer").generate(
        "ROMEO:", **same)
    engine = Engine(old, max_rows=8)
    assert not engine.batched and "re-export it with `lmkit export format=onnx` to batch" in engine.unbatched
