"""Deployment runtimes side by side, in one run: torch fp32, lmkit dynamic_int8, onnxruntime fp32 / int8 / int4.

    python bench/deploy.py [--transformer CKPT --lstm CKPT] [--out bench/results/deploy.json]

1. quality: the default models (trained here unless checkpoints are given) exported with `lmkit export
   format=onnx` [compression=int8|int4]: file bytes and perplexity through onnxruntime on their test split.
2. widths: batch-1 generation tokens/s and file bytes at the int8 curve's widths (bench/compression.py),
   random weights (speed does not depend on what the weights learned). Every runtime is driven by the same
   sampling loop (lmkit.generate.stream_tokens), so the difference is the runtime's forward step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import lmkit
from compression import WIDTHS, speed, train
from lmkit.backbones import backbone_config, build_backbone
from lmkit.compress import stored_bytes
from lmkit.deploy.onnx import export_onnx
from lmkit.evaluate import evaluate, own_datamodule
from lmkit.inference import InferenceModel
from lmkit.plugins import CompressContext, make
from lmkit.record import ModelRecord

ONNX = {"onnx fp32": None, "onnx int8": ("int8", {}), "onnx int4": ("int4", {})}  # conf/compression's settings


def onnx_variants(model: InferenceModel, folder: Path) -> dict[str, Path]:
    """The model exported for onnxruntime as float32, int8 and (Transformers) int4."""
    out = {}
    for label, quantization in ONNX.items():
        if quantization and quantization[0] == "int4" and model.record.kind != "transformer":
            continue  # refused: MatMulNBits does not cover the LSTM op (lmkit.deploy.onnx.check_exportable)
        out[label] = export_onnx(model, folder / label.replace(" ", "-"), quantization=quantization)
    return out


def quality(checkpoints: dict[str, Path], cache_dir: str) -> list[dict]:
    rows = []
    print(f"\n{'model':<12} {'runtime':<10} {'bytes':>10} {'x fp32':>7} {'perplexity':>10} {'vs fp32':>8}")
    for kind, ckpt in checkpoints.items():
        dense = lmkit.load(ckpt)
        datamodule = own_datamodule(dense, cache_dir)
        datamodule.prepare_data()
        tokens = datamodule.cache.split("test")
        with tempfile.TemporaryDirectory() as tmp:
            models = {"torch fp32": (dense, None), **{label: (lmkit.load(path), path / "model.onnx")
                                                      for label, path in onnx_variants(dense, Path(tmp)).items()}}
            for label, (model, file) in models.items():
                result = evaluate(model, tokens, seq_len=datamodule.seq_len, batch_size=datamodule.eval_batch_size,
                                  max_windows=datamodule.test_windows)
                rows.append({"model": kind, "runtime": label, "bytes": file.stat().st_size if file else None,
                             "perplexity": round(result["perplexity"], 4)})
        base = next(r for r in rows if r["model"] == kind and r["runtime"] == "onnx fp32")
        for row in rows:
            if row["model"] == kind and row["bytes"]:
                row["bytes_x"] = round(row["bytes"] / base["bytes"], 3)
            if row["model"] == kind:
                row["perplexity_vs_onnx_fp32"] = round(row["perplexity"] / base["perplexity"] - 1, 4)
                print(f"{kind:<12} {row['runtime']:<10} {row['bytes'] or '-':>10} {row.get('bytes_x', '-'):>7} "
                      f"{row['perplexity']:>10} {row['perplexity_vs_onnx_fp32']:>+8.2%}", flush=True)
    return rows


def widths() -> list[dict]:
    out = []
    labels = ["torch fp32", "dynamic_int8", *ONNX]
    print(f"\n{'model':<18} " + " ".join(f"{label:>12}" for label in labels) + "   (generation tokens/s, batch 1)")
    for kind in ("transformer", "lstm"):
        for width in WIDTHS:
            options = (dict(n_layer=4, n_head=max(1, width // 64), n_embd=width, max_seq_len=256)
                       if kind == "transformer" else dict(n_layer=1, n_embd=width))
            record = ModelRecord(backbone=backbone_config(kind, 80, **options))
            torch.manual_seed(0)
            dense = InferenceModel(build_backbone(record.backbone).eval(), None, record)
            row = {"model": f"{kind} {options['n_layer']}x{width}", "tokens_per_s": {}, "bytes": {}}
            row["tokens_per_s"]["torch fp32"] = speed(dense.backbone)
            row["bytes"]["torch fp32"] = stored_bytes(dense)  # model.safetensors, as lmkit export writes it
            quantized = InferenceModel(build_backbone(record.backbone).eval(), None, record)
            quantized.backbone.load_state_dict(dense.backbone.state_dict())
            plugin = make("dynamic_int8")
            details = plugin.apply(quantized, CompressContext(cache_dir=""))
            quantized.record = quantized.record.replace(
                compression=[{"plugin": "dynamic_int8", "settings": plugin.settings, **details}])
            row["tokens_per_s"]["dynamic_int8"] = speed(quantized.backbone)
            row["bytes"]["dynamic_int8"] = stored_bytes(quantized)
            with tempfile.TemporaryDirectory() as tmp:
                for label, path in onnx_variants(dense, Path(tmp)).items():
                    row["tokens_per_s"][label] = speed(lmkit.load(path).backbone)
                    row["bytes"][label] = (path / "model.onnx").stat().st_size
            row["tokens_per_s"] = {k: round(v, 1) for k, v in row["tokens_per_s"].items()}
            out.append(row)
            print(f"{row['model']:<18} " + " ".join(f"{row['tokens_per_s'].get(label, '-'):>12}" for label in labels),
                  flush=True)
            print(f"{'  bytes':<18} " + " ".join(f"{row['bytes'].get(label, '-'):>12}" for label in labels), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformer", type=Path, help="a trained default Transformer's checkpoint")
    parser.add_argument("--lstm", type=Path, help="a trained default LSTM's checkpoint")
    parser.add_argument("--cache-dir", default=os.environ.get("LMKIT_CACHE", str(Path.home() / ".cache" / "lmkit")))
    parser.add_argument("--only", choices=("quality", "widths"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "onnxruntime": __import__("onnxruntime").__version__},
              "command": " ".join(sys.argv)}
    started = time.perf_counter()
    if args.only in (None, "quality"):
        with tempfile.TemporaryDirectory() as runs:
            checkpoints = {kind: getattr(args, kind) or train(kind, Path(runs) / kind, args.cache_dir)
                           for kind in ("transformer", "lstm")}
            result["quality"] = quality(checkpoints, args.cache_dir)
    if args.only in (None, "widths"):
        result["widths"] = widths()
    result["seconds"] = round(time.perf_counter() - started)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
