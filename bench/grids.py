"""Calibrated quantization on the runtimes' grids: what rtn, GPTQ and activation-aware scales cost and buy.

    python bench/grids.py [--out bench/results/grids.json] [--transformer CKPT] [--wide CKPT] [--llama CKPT]
                          [--lstm CKPT] [--windows N]

For each model (checkpoints given, or trained here: see `train_here`), fp32 against int4 and int8 on the
symmetric grid in blocks of 32 (llama.cpp's Q4_0 / Q8_0), each by rounding to nearest (`rtn`: what llama.cpp's
and onnxruntime's own quantizers do), by GPTQ, and by activation-aware scales + GPTQ, exactly as
`lmkit export model=CKPT compression=int4 compression.int4.quant_type=sym compression.int4.method=gptq` does:
bytes of model.safetensors, perplexity on the test split, generation tokens/s at batch 1 and batch 32
(int4 also through the exact fp32 kernel: the measurement behind the packed kernel's choice).

For the Transformers (BPE-tokenized: GGUF carries a byte-level BPE), the GGUF perplexity as llama.cpp itself
computes it on the same test windows (llama-cpp-python, each model in its own process): the f32 export, lmkit's
calibrated Q4_0 exports, and llama.cpp's own q4_0 of the float model (its quantizer, `llama_model_quantize`),
each loaded without llama.cpp's extra (AMX) buffers, which compute Q4_0 wrongly on this machine's Xeon.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lmkit
from lmkit.blockquant import set_kernel
from lmkit.compress import compress, training_context
from lmkit.evaluate import own_datamodule
from lmkit.generate import stream_tokens
from lmkit.inference import InferenceModel

ROOT = Path(__file__).resolve().parent.parent
GRID = {"quant_type": "sym", "blocksize": 32}
RECIPES = {
    "int4 rtn": {"int4": {**GRID, "method": "rtn"}},
    "int4 gptq": {"int4": {**GRID, "method": "gptq"}},
    "int4 awq+gptq": {"int4": {**GRID, "method": "gptq", "awq": True}},
    "int8 rtn": {"int8": {**GRID, "method": "rtn"}},
    "int8 gptq": {"int8": {**GRID, "method": "gptq"}},
    "int8 awq+gptq": {"int8": {**GRID, "method": "gptq", "awq": True}},
}
# What trains here when no checkpoint is given: (overrides, steps). BPE for the Transformers (GGUF needs it).
BPE = ["experiment=shakespeare_bpe"]
MODELS = {
    "transformer": (BPE + ["model=transformer"], 1000),
    "transformer 6x384": (BPE + ["model=transformer", "model.n_layer=6", "model.n_head=6", "model.n_embd=384",
                                 "optim.lr=1e-3"], 600),
    "llama": (BPE + ["model=llama"], 1000),
    "lstm": ([], 4000),  # the default run
}


def train_here(name: str, root: Path, cache_dir: str) -> Path:
    overrides, steps = MODELS[name]
    run_dir = root / name.replace(" ", "_")
    subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, f"trainer.max_steps={steps}",
                    f"trainer.val_check_interval={steps}", "logger=none", "trainer.enable_progress_bar=false",
                    f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}"], check=True)
    return run_dir / "checkpoints" / "last.ckpt"


@torch.no_grad()
def tokens_per_s(model: InferenceModel, batch: int, new_tokens: int = 64, repeats: int = 3) -> float:
    """Generated tokens/s (all rows) from a one-token prompt, the best of `repeats`."""
    ids = torch.zeros(batch, 1, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    best = math.inf
    for attempt in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        for _ in stream_tokens(model.backbone, ids, max_new_tokens=new_tokens, temperature=1.0, generator=generator):
            pass
        if attempt:
            best = min(best, time.perf_counter() - started)
    return round(batch * new_tokens / best, 1)


def test_windows(model: InferenceModel, cache_dir: str, windows: int) -> np.ndarray:
    """The first `windows` non-overlapping test windows (windows, seq_len + 1): what both runtimes are scored on."""
    datamodule = own_datamodule(model, cache_dir, seed=1337)
    datamodule.prepare_data()
    tokens, seq_len = np.asarray(datamodule.cache.split("test"), dtype=np.int64), datamodule.seq_len
    count = min(windows, (len(tokens) - 1) // seq_len)
    return np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)])


@torch.no_grad()
def lmkit_perplexity(model: InferenceModel, windows: np.ndarray) -> float:
    ids = torch.from_numpy(windows)
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    return round(math.exp(loss.item()), 4)


# llama.cpp's AMX buffers compute Q4_0/Q4_1 wrongly on an Intel Xeon with AMX (lmkit.deploy.gguf_card.AMX_NOTE):
# every file loads without them, as the tests load theirs
LLAMA_CPP_PERPLEXITY = """
import json, math, sys
import numpy as np
import llama_cpp
from llama_cpp import llama_cpp as api
default = api.llama_model_default_params
def without_extra_buffers():
    params = default()
    if "use_extra_bufts" in dict(type(params)._fields_):
        params.use_extra_bufts = False
    return params
api.llama_model_default_params = without_extra_buffers
path, windows = sys.argv[1], np.load(sys.argv[2])
llm = llama_cpp.Llama(path, n_ctx=windows.shape[1], logits_all=True, verbose=False, n_threads={threads})
total, count = 0.0, 0
for window in windows:
    llm.reset()
    llm.eval(window[:-1].tolist())
    logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    total -= logp[np.arange(len(window) - 1), window[1:]].sum()
    count += len(window) - 1
print(json.dumps({{"perplexity": round(math.exp(total / count), 4)}}))
"""


def llama_cpp_perplexity(path: Path, windows_file: Path) -> float | str:
    """llama.cpp's perplexity of a GGUF file over the windows, in its own process (a crash is a result, not fatal)."""
    code = LLAMA_CPP_PERPLEXITY.format(threads=torch.get_num_threads())
    result = subprocess.run([sys.executable, "-c", code, str(path), str(windows_file)], capture_output=True, text=True)
    if result.returncode:
        return f"llama.cpp failed (exit {result.returncode}): {result.stderr.strip().splitlines()[-1:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])["perplexity"]


def llama_cpp_q4_0(f32_file: Path, out: Path) -> Path:
    """llama.cpp's own q4_0 of a float GGUF file, by its quantizer (what `llama-quantize F32 OUT q4_0` does)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    code = llama_cpp.llama_model_quantize(str(f32_file).encode(), str(out).encode(), params)
    if code:
        raise RuntimeError(f"llama_model_quantize returned {code}")
    return out


def gguf_rows(dense: InferenceModel, quantized: dict[str, InferenceModel], windows: np.ndarray,
              work: Path) -> dict[str, float | str]:
    """llama.cpp's perplexity of the f32 export, llama.cpp's own q4_0 of it and lmkit's int4 exports."""
    from lmkit.deploy.gguf import export_gguf

    work.mkdir(parents=True, exist_ok=True)
    windows_file = work / "windows.npy"
    np.save(windows_file, windows)
    export_gguf(dense, work / "f32")
    rows = {"f32": llama_cpp_perplexity(work / "f32" / "model.gguf", windows_file)}
    own = llama_cpp_q4_0(work / "f32" / "model.gguf", work / "llama_cpp_q4_0.gguf")
    rows["llama.cpp q4_0 (its quantizer)"] = llama_cpp_perplexity(own, windows_file)
    for label, model in quantized.items():
        folder = work / label.replace(" ", "_").replace("+", "_")
        export_gguf(model, folder)
        rows[f"lmkit {label} (Q4_0)"] = llama_cpp_perplexity(folder / "model.gguf", windows_file)
    return rows


def bench_model(name: str, ckpt: Path, cache_dir: str, windows: int, work: Path) -> dict:
    context = training_context(cache_dir=cache_dir, seed=1337)
    dense = lmkit.load(ckpt).eval()
    scored = test_windows(dense, cache_dir, windows)
    rows = {"fp32": {"bytes": None, "perplexity": lmkit_perplexity(dense, scored),
                     "tokens_per_s_batch1": tokens_per_s(dense, 1), "tokens_per_s_batch32": tokens_per_s(dense, 32)}}
    baseline, int4_models = None, {}
    for label, spec in RECIPES.items():
        started = time.perf_counter()
        model, report = compress(dense, spec, context, eval_windows=windows, gen_tokens=8, baseline=baseline)
        baseline = report["before"]
        rows["fp32"]["bytes"] = baseline["bytes"]
        row = {"summary": report["steps"][-1]["summary"], "bytes": report["after"]["bytes"],
               "bytes_x": report["after_vs_before"]["bytes"], "perplexity": lmkit_perplexity(model, scored),
               "tokens_per_s_batch1": tokens_per_s(model, 1), "tokens_per_s_batch32": tokens_per_s(model, 32),
               "fallback_to_rtn": report["steps"][-1].get("fallback_to_rtn"),
               "seconds_to_quantize": round(time.perf_counter() - started, 1)}
        if label.startswith("int4"):
            set_kernel(model.backbone, "exact")
            row["tokens_per_s_batch1_exact_kernel"] = tokens_per_s(model, 1)
            set_kernel(model.backbone, "packed")
            int4_models[label] = model
        rows[label] = row
        print(f"  {name} {label}: {row}", flush=True)
    result = {"checkpoint": str(ckpt), "windows": int(scored.shape[0]), "seq_len": int(scored.shape[1] - 1),
              "rows": rows}
    if dense.record.kind == "transformer":
        result["gguf_perplexity_llama_cpp"] = gguf_rows(dense, int4_models, scored, work / name.replace(" ", "_"))
        print(f"  {name} llama.cpp: {result['gguf_perplexity_llama_cpp']}", flush=True)
    return result


def table(name: str, result: dict) -> str:
    rows, fp32 = result["rows"], result["rows"]["fp32"]
    lines = [f"\n{name} ({result['windows']} test windows of {result['seq_len']})",
             "| recipe | bytes | perplexity | vs fp32 | tok/s batch 1 | x fp32 | tok/s batch 32 | x fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['bytes']:,} | {row['perplexity']:.4f} | "
                     f"{100 * (row['perplexity'] / fp32['perplexity'] - 1):+.2f}% | {row['tokens_per_s_batch1']:,.0f} | "
                     f"{row['tokens_per_s_batch1'] / fp32['tokens_per_s_batch1']:.2f} | "
                     f"{row['tokens_per_s_batch32']:,.0f} | {row['tokens_per_s_batch32'] / fp32['tokens_per_s_batch32']:.2f} |")
    for label, value in result.get("gguf_perplexity_llama_cpp", {}).items():
        lines.append(f"| GGUF {label}, llama.cpp's perplexity | | {value} | | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "grids.json"))
    for name in MODELS:
        parser.add_argument(f"--{name.split()[0] if name != 'transformer 6x384' else 'wide'}", metavar="CKPT")
    parser.add_argument("--windows", type=int, default=64, help="test windows scored (both runtimes)")
    parser.add_argument("--only", nargs="*", choices=list(MODELS), help="these models only")
    args = parser.parse_args()
    given = {"transformer": args.transformer, "transformer 6x384": args.wide, "llama": args.llama, "lstm": args.lstm}
    names = args.only or list(MODELS)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                          f"{torch.__version__}, {torch.get_num_threads()} threads",
               "load_average_at_start": os.getloadavg()[0], "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work, cache_dir = Path(tmp), str(Path(tmp) / "cache")
        for name in names:
            ckpt = Path(given[name]) if given[name] else train_here(name, work, cache_dir)
            results["models"][name] = bench_model(name, ckpt, cache_dir, args.windows, work)
            print(table(name, results["models"][name]), flush=True)
    results["load_average_at_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nload average {results['load_average_at_start']:.2f} at start, {results['load_average_at_end']:.2f} at end")


if __name__ == "__main__":
    main()
