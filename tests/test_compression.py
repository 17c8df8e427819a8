"""Compression plugins on real trained models: apply, export, reload in a fresh process, measure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import lmkit
from lmkit.compress import compress_and_export, training_context
from lmkit.errors import LmkitError
from lmkit.export import save
from lmkit.plugins import CompressContext, installed, make
from lmkit.train import run
from tests.conftest import TINY, TINY_TRANSFORMER
from tests.helpers import decode_by_hand

RECIPES = {
    "int8": {"int8": {}},
    "dynamic_int8": {"dynamic_int8": {}},
    "prune": {"prune": {"finetune_steps": 40}},
    "prune_structured": {"prune_structured": {"amount": 0.25, "finetune_steps": 40}},
    "prune+int8": {"prune": {"finetune_steps": 40}, "int8": {}},
}
# (largest bytes ratio, largest perplexity ratio) against the dense model, on 48-wide models trained
# 300 steps; the bounds are loose for tiny layers (scales and biases weigh more) but far from no-op.
BOUNDS = {"int8": (0.35, 1.01), "dynamic_int8": (0.35, 1.02), "prune": (0.80, 1.10),
          "prune_structured": (0.85, 1.35), "prune+int8": (0.25, 1.10)}
KINDS = ("lstm", "transformer")


LMKIT = str(Path(sys.executable).parent / "lmkit")


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([LMKIT, *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """A 48-wide LSTM and Transformer, each trained 300 steps on the embedded corpus: their checkpoints."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    out = {}
    for kind in KINDS:
        run_dir = tmp_path_factory.mktemp(kind)
        tiny = TINY_TRANSFORMER if kind == "transformer" else TINY
        overrides = [f"model={kind}", *tiny, "model.n_embd=48", "trainer.max_steps=300", "trainer.val_check_interval=300",
                     "data.test_windows=32", "logger=none", f"paths.output_dir={run_dir}", f"paths.cache_dir={cache_dir}"]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            metrics, _ = run(compose("train", overrides=overrides))
        out[kind] = Path(metrics["last_ckpt"])
    return out


@pytest.fixture(scope="module")
def exports(trained, cache_dir, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Every recipe on both backbones, exported; logits of the in-memory compressed models kept."""
    root = tmp_path_factory.mktemp("exports")
    ids = torch.randint(0, 60, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, root / "ids.pt")
    results = {}
    for kind in KINDS:
        dense = lmkit.load(trained[kind])
        for name, spec in RECIPES.items():
            out = root / f"{kind}-{name}"
            model, report = compress_and_export(dense, spec, out, training_context(cache_dir=str(cache_dir), seed=1337),
                                                eval_windows=32, gen_tokens=8)
            with torch.no_grad():
                torch.save(model(ids), root / f"{kind}-{name}.pt")
            results[kind, name] = {"out": out, "report": report, "model": model}
    return results


@pytest.fixture(scope="module")
def reloaded(exports, tmp_path_factory) -> dict[str, str]:
    """Each artifact loaded in one fresh process with neither Lightning nor Hydra imported."""
    root = next(iter(exports.values()))["out"].parent
    code = f"""
import sys, torch, lmkit
ids = torch.load({str(root / 'ids.pt')!r}, weights_only=True)
for out in {[str(r['out']) for r in exports.values()]!r}:
    model = lmkit.load(out)
    expected = torch.load(out + '.pt', weights_only=True)
    with torch.no_grad():
        print(out, torch.equal(model(ids), expected), repr(model.generate("ROMEO:", max_new_tokens=5, seed=1)))
loaded = [m for m in ("lightning", "pytorch_lightning", "hydra", "omegaconf") if m in sys.modules]
print("loaded:", loaded)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_shrinks_the_model_within_its_perplexity_bound_and_reloads_exactly(kind, name, exports, reloaded):
    report = exports[kind, name]["report"]
    max_bytes, max_ppl = BOUNDS[name]
    ratios = report["after_vs_before"]
    assert ratios["bytes"] <= max_bytes, ratios
    assert ratios["perplexity"] <= max_ppl, ratios
    assert report["after"]["bytes"] == (exports[kind, name]["out"] / "model.safetensors").stat().st_size
    # bit-exact logits, and the text the in-memory compressed model samples with the same seed
    text = exports[kind, name]["model"].generate("ROMEO:", max_new_tokens=5, seed=1)
    assert reloaded[str(exports[kind, name]["out"])] == f"True {text!r}"
    assert reloaded["loaded:"] == "[]"
    files = sorted(p.name for p in exports[kind, name]["out"].iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "report.json", "report.png", "tokenizer.json"]
    assert "| dense |" in (exports[kind, name]["out"] / "README.md").read_text()


@pytest.mark.parametrize("kind", KINDS)
def test_quantization_stays_close_to_the_dense_logits(kind, trained, exports):
    dense = lmkit.load(trained[kind])
    ids = torch.load(next(iter(exports.values()))["out"].parent / "ids.pt", weights_only=True)
    with torch.no_grad():
        reference = dense(ids)
        for name in ("int8", "dynamic_int8"):
            error = (exports[kind, name]["model"](ids) - reference).abs().max() / reference.abs().max()
            assert error < 0.05, (name, float(error))


def test_int8_quantizes_every_weight_matrix_embeddings_and_lstm_included(exports):
    for kind in KINDS:
        model = exports[kind, "int8"]["model"]
        floats = [n for n, t in model.backbone.state_dict().items() if t.dim() == 2 and t.is_floating_point()]
        assert not floats, (kind, floats)
    lstm = exports["lstm", "int8"]["model"].backbone
    assert not any(isinstance(m, nn.LSTM) for m in lstm.modules())
    assert lstm.head.weight is lstm.embedding.weight  # tied: one int8 tensor and one set of scales
    assert lstm.head.weight.dtype == torch.int8


def test_lstm_weights_are_really_pruned_and_tied_weights_stay_tied(exports, trained):
    backbone = exports["lstm", "prune"]["model"].backbone
    for name in ("weight_ih_l0", "weight_hh_l0"):
        sparsity = float((getattr(backbone.rnn, name) == 0).float().mean())
        assert 0.3 < sparsity < 0.8, (name, sparsity)
    assert (backbone.embedding.weight != 0).all()  # embeddings are left alone by default
    assert backbone.head.weight is backbone.embedding.weight
    # asked to, it prunes the embedding and the tied head with it, once
    model = lmkit.load(trained["lstm"])
    make("prune", {"embeddings": True, "finetune_steps": 0, "scope": "layer"}).apply(model, CompressContext(cache_dir=""))
    assert model.backbone.head.weight is model.backbone.embedding.weight
    assert abs(float((model.backbone.embedding.weight == 0).float().mean()) - 0.5) < 0.01


def test_pruned_artifact_is_smaller_than_the_dense_one_and_stores_bitmasks(trained, exports, tmp_path):
    dense = lmkit.load(trained["lstm"])
    save(dense, tmp_path / "dense")
    pruned = exports["lstm", "prune"]["out"]
    assert (pruned / "model.safetensors").stat().st_size < 0.8 * (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert any(name.endswith(".__mask") for name in load_file(pruned / "model.safetensors"))


def test_structured_pruning_rebuilds_smaller_layers(exports):
    for kind in KINDS:
        report = exports[kind, "prune_structured"]["report"]
        assert report["after_vs_before"]["parameters"] <= 0.75  # amount=0.25: at least a quarter removed
        assert report["after"]["sparsity"] < 0.01  # smaller, not sparser
    cfg = exports["transformer", "prune_structured"]["model"].record.backbone
    assert cfg.layer_ffn[0] < 4 * 48 and cfg.layer_ffn[0] % 8 == 0 and cfg.layer_heads == [1]
    assert exports["lstm", "prune_structured"]["model"].record.backbone.n_embd == 40  # tied: 48 -> 40 wide


def test_compression_report_over_exports_and_its_bad_input(exports, tmp_path):
    dirs = [str(exports["lstm", name]["out"]) for name in ("int8", "prune+int8")]
    result = cli("report", *dirs, f"out={tmp_path / 'pareto.png'}")
    assert result.returncode == 0, result.stderr
    assert "| dense |" in result.stdout and "prune+int8" in result.stdout
    assert (tmp_path / "pareto.png").read_bytes().startswith(b"\x89PNG")
    mixed = cli("report", dirs[0], str(exports["transformer", "int8"]["out"]))
    assert mixed.returncode == 2 and "different models" in mixed.stderr and "Traceback" not in mixed.stderr


def test_bad_compression_input_is_one_line_and_writes_nothing(trained, exports, tmp_path):
    ckpt, out = str(trained["lstm"]), tmp_path / "out"
    cases = {
        "unknown compression plugin": ["compression=nosuch"],
        "must be in [0, 1)": ["compression=prune", "compression.prune.amount=1.5"],
        "cannot follow int8": ["compression=[int8,prune]"],
        "would fill prune's zeros back in": ["compression=[prune,prune_structured]"],
        "compression.prune.amount='abc' must be a number": ["compression=prune", "compression.prune.amount=abc"],
        "compression.prune.embeddings='no' must be true or false": ["compression=prune", "compression.prune.embeddings=no"],
    }
    for expected, args in cases.items():
        result = cli("export", f"model={ckpt}", f"out={out}", *args)
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not out.exists()
    requantize = cli("export", f"model={exports['lstm', 'int8']['out']}", f"out={out}", "compression=int8")
    assert requantize.returncode == 2 and "already quantized by int8" in requantize.stderr
    with pytest.raises(LmkitError, match="keeps the dtypes its plugins chose"):
        lmkit.load(exports["lstm", "int8"]["out"], dtype="bf16")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in exports["lstm", "prune+int8"]["out"].iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = cli("generate", f"model={corrupt}", "max_new_tokens=3")
    assert result.returncode == 2 and "corrupt" in result.stderr and "Traceback" not in result.stderr
    unknown = json.loads((corrupt / "config.json").read_text())
    unknown["compression"][0]["plugin"] = "os.system"  # a name selects an installed plugin, never code
    (corrupt / "config.json").write_text(json.dumps(unknown))
    with pytest.raises(LmkitError, match="unknown compression plugin 'os.system'"):
        lmkit.load(corrupt)
    unknown["model"]["vocab_size"] = 10**9  # sizes are checked against the file before anything is allocated
    (corrupt / "config.json").write_text(json.dumps(unknown))
    with pytest.raises(LmkitError, match="more than model.safetensors"):
        lmkit.load(corrupt)


THIRD_PARTY = '''
import torch
from lmkit.plugins import Plugin

class HalfStorage(Plugin):
    name = "half_storage"
    summary = "stores float tensors as float16"
    defaults = {"min_numel": 0}

    def pack(self, tensors, record):
        return {k: v.half() if v.is_floating_point() and v.numel() >= self.settings["min_numel"] else v
                for k, v in tensors.items()}

    def unpack(self, tensors, record):
        return {k: v.float() if v.dtype == torch.float16 else v for k, v in tensors.items()}
'''


def test_third_party_plugin_is_found_through_its_entry_point(trained, cache_dir, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "half_storage-1.0.dist-info").mkdir(parents=True)
    (site / "half_storage-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: half-storage\nVersion: 1.0\n")
    (site / "half_storage-1.0.dist-info" / "entry_points.txt").write_text(
        "[lmkit.plugins]\nhalf_storage = half_storage_plugin:HalfStorage\n")
    (site / "half_storage_plugin.py").write_text(THIRD_PARTY)
    env = {"PYTHONPATH": f"{site}:{Path(__file__).resolve().parent.parent}"}
    listed = cli("plugins", env={**os.environ, **env})
    assert listed.returncode == 0 and "half_storage" in listed.stdout and "int8" in listed.stdout
    out = tmp_path / "half"
    result = cli("export", f"model={trained['lstm']}", f"out={out}", "+compression.half_storage.min_numel=64",
                 "gen_tokens=0", "eval_windows=8", f"paths.cache_dir={cache_dir}", env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == ["half_storage"] and report["after_vs_before"]["bytes"] < 0.6
    monkeypatch.syspath_prepend(str(site))
    installed.cache_clear()
    try:
        model = lmkit.load(out)
        assert model.record.compression[0]["settings"] == {"min_numel": 64}
    finally:
        installed.cache_clear()


def test_train_py_compresses_after_training_and_prunes_during_it(make_cfg):
    cfg = make_cfg(*TINY, "trainer.max_steps=60", "trainer.val_check_interval=60", "logger=none",
                   "compression=[prune,int8]", "compression.prune.during_training=true", "compression.prune.ramp=0.5")
    metrics, objects = run(cfg)
    rnn = objects["module"].backbone.rnn  # the trained model itself was pruned by the schedule
    assert abs(float((rnn.weight_hh_l0 == 0).float().mean()) - 0.5) < 0.1
    report = json.loads((Path(metrics["export_dir"]) / "report.json").read_text())
    assert report["recipe"] == ["prune", "int8"] and report["steps"][0]["finetuned_steps"] == 0
    assert metrics["export_bytes_ratio"] < 0.3
    exported = lmkit.load(metrics["export_dir"])  # its greedy text: argmax of full forward passes, token by token
    assert exported.generate("A", max_new_tokens=10, temperature=0) == decode_by_hand(exported, "A", 10)
