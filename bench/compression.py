"""Compression trade-offs: size, perplexity and CPU generation speed of each recipe, and where int8 pays.

    python bench/compression.py [--out bench/results/compression.json] [--lstm CKPT] [--transformer CKPT] [--llama CKPT]

1. recipes: the default LSTM (`python train.py`), Transformer (`python train.py model=transformer`) and
   Llama-block Transformer (`model=llama`: SwiGLU, grouped-query attention, RMSNorm, rope), trained here
   unless checkpoints are given, each compressed by every recipe below exactly as
   `lmkit export model=CKPT compression=...` does it; perplexity on the whole test split,
   generation tokens/s at batch 1, bytes of model.safetensors.
2. widths: generation tokens/s of fp32 against dynamic_int8 (and bitsandbytes int8) for random
   models 128 to 1024 wide, both backbones: the crossover where int8 kernels start to pay.
3. kernels: one batch-1 step of a GPT MLP (w -> 4w -> w) and of an LSTM layer in fp32, through
   torchao's `quantize_(Int8DynamicActivationInt8WeightConfig())`, through
   `torch.ao.quantization.quantize_dynamic`, and as dynamic_int8 builds it: why it uses what it uses.

`--only recipes|widths|kernels` runs one part (the JSON then holds that part only); `--wide [CKPT]`
adds the recipes issue 12 set targets for (WIDE_RECIPES) on a Transformer 6 x 384 (WIDE below),
trained here for `--wide-steps` unless given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lmkit
from lmkit.backbones import backbone_config, build_backbone
from lmkit.compress import compress, table, training_context
from lmkit.generate import stream_tokens
from lmkit.inference import InferenceModel
from lmkit.plugins import CompressContext, make
from lmkit.record import ModelRecord

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "int8": {"int8": {}},
    # what 200 distillation steps do with nothing removed: the reference for a model still improving (--wide)
    "steps only": {"prune": {"amount": 0.0, "criterion": "magnitude"}},
    "dynamic_int8": {"dynamic_int8": {}},
    "int4": {"int4": {}},
    "prune magnitude one-shot": {"prune": {"criterion": "magnitude", "finetune_steps": 0}},
    "prune wanda one-shot": {"prune": {"criterion": "wanda", "finetune_steps": 0}},
    "prune sparsegpt one-shot": {"prune": {"criterion": "sparsegpt", "finetune_steps": 0}},
    "prune sparsegpt row one-shot": {"prune": {"criterion": "sparsegpt", "scope": "row", "finetune_steps": 0}},
    "prune magnitude finetune": {"prune": {"criterion": "magnitude", "recovery": "finetune"}},  # before issue 12
    "prune": {"prune": {}},
    "prune 2:4": {"prune": {"pattern": "2:4"}},
    "prune+int8": {"prune": {}, "int8": {}},
    "prune+int4": {"prune": {}, "int4": {}},
    "prune_structured magnitude finetune": {"prune_structured": {"criterion": "magnitude", "recovery": "finetune"}},
    "prune_structured": {"prune_structured": {}},
    "prune_structured+dynamic_int8": {"prune_structured": {}, "dynamic_int8": {}},
}
# --wide: a Transformer 6 x 384 trained for a few minutes, so the recipes are not judged on 128-wide layers only
WIDE = ["model=transformer", "model.n_layer=6", "model.n_head=6", "model.n_embd=384", "optim.lr=1e-3"]
WIDE_RECIPES = ["steps only", "int4", "prune magnitude one-shot", "prune sparsegpt one-shot", "prune", "prune 2:4",
                "prune+int4", "prune_structured"]  # 10.7M parameters: about 20 minutes for these on 2 idle cores
WIDTHS = (128, 256, 384, 512, 768, 1024)


def train(overrides: list[str], run_dir: Path, cache_dir: str) -> Path:
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}",
           f"paths.cache_dir={cache_dir}", "trainer.enable_progress_bar=false"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, capture_output=True)
    return run_dir / "checkpoints" / "last.ckpt"


def recipes(checkpoints: dict[str, Path], cache_dir: str, only: dict[str, list[str]] | None = None,
            gen_tokens: int = 200, partial: Path | None = None) -> dict[str, dict]:
    """Every recipe (or those `only` names for the checkpoint's kind) on every checkpoint; with `partial`,
    the results so far are written there after each recipe (a long run stopped early keeps what it measured)."""
    results = {}
    context = training_context(cache_dir=cache_dir, seed=1337)
    for kind, ckpt in checkpoints.items():
        dense = lmkit.load(ckpt)
        labelled, baseline = [], None
        for label, spec in RECIPES.items():
            if only and kind in only and label not in only[kind]:
                continue
            started = time.perf_counter()
            compressed, report = compress(dense, spec, context, gen_tokens=gen_tokens, baseline=baseline)
            baseline = report["before"]  # the dense model measured once
            report["seconds"] = round(time.perf_counter() - started, 1)
            if "prune_structured" in spec:  # speed against the dense model measured beside it, not hours before
                report["forward_speedup_alternated"] = forward_speedup(dense, compressed, cache_dir)
                print(f"  {kind} {label}: batched forward {report['forward_speedup_alternated']}x dense "
                      "(median of 5 alternated)", flush=True)
            results[f"{kind} {label}"] = report
            step_labels = [f"{st['plugin']} ({st['summary']})" if st.get("summary") else st["plugin"]
                           for st in report["steps"]]
            labelled.append((f"{label}: " + "+".join(step_labels), report["after"]))
            print(f"  {kind} {label}: {report['after_vs_before']} ({report['seconds']} s)", flush=True)
            if partial:
                partial.write_text(json.dumps(results, indent=2) + "\n")
        base = baseline
        print(f"\n{kind} ({ckpt})\n" + table([("dense", base), *labelled], base), flush=True)
    return results


@torch.no_grad()
def forward_speedup(dense: InferenceModel, smaller: InferenceModel, cache_dir: str, repeats: int = 5,
                    windows: int = 256) -> float:
    """Tokens/s reading `windows` test windows in batches (as the report's forward column), smaller over
    dense, the two alternated `repeats` times on the same machine minute: the median ratio."""
    from lmkit.evaluate import evaluate, own_datamodule

    datamodule = own_datamodule(dense, cache_dir, seed=1337)
    datamodule.prepare_data()
    tokens = datamodule.cache.split("test")
    options = dict(seq_len=datamodule.seq_len, batch_size=datamodule.eval_batch_size, max_windows=windows)
    ratios = []
    for _ in range(repeats):
        base = evaluate(dense.eval(), tokens, **options)["tokens_per_s"]
        ratios.append(evaluate(smaller.eval(), tokens, **options)["tokens_per_s"] / base)
    return round(sorted(ratios)[len(ratios) // 2], 3)


@torch.no_grad()
def speed(backbone: torch.nn.Module, new_tokens: int = 100, repeats: int = 3) -> float:
    ids = torch.zeros(1, 1, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    for _ in stream_tokens(backbone, ids, max_new_tokens=5, temperature=1.0, generator=generator):
        pass
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in stream_tokens(backbone, ids, max_new_tokens=new_tokens, temperature=1.0, generator=generator):
            pass
        best = min(best, time.perf_counter() - started)
    return new_tokens / best


def widths() -> list[dict]:
    out = []
    print(f"\n{'model':<22} {'fp32 tok/s':>10} {'dynamic_int8':>13} {'x':>6} {'int8 (bnb)':>11} {'x':>6}")
    for kind in ("transformer", "lstm"):
        for width in WIDTHS:
            options = (dict(n_layer=4, n_head=max(1, width // 64), n_embd=width, max_seq_len=256)
                       if kind == "transformer" else dict(n_layer=1, n_embd=width))
            torch.manual_seed(0)
            row = {"model": f"{kind} {options['n_layer']}x{width}"}
            for recipe in ("fp32", "dynamic_int8", "int8"):
                record = ModelRecord(backbone=backbone_config(kind, 80, **options))
                model = InferenceModel(build_backbone(record.backbone).eval(), None, record)
                if recipe != "fp32":
                    make(recipe).apply(model, CompressContext(cache_dir=""))
                row[recipe] = round(speed(model.backbone), 1)
            row["dynamic_int8_x"] = round(row["dynamic_int8"] / row["fp32"], 2)
            row["int8_x"] = round(row["int8"] / row["fp32"], 2)
            out.append(row)
            print(f"{row['model']:<22} {row['fp32']:>10} {row['dynamic_int8']:>13} {row['dynamic_int8_x']:>6} "
                  f"{row['int8']:>11} {row['int8_x']:>6}", flush=True)
    return out


def step_time(module: torch.nn.Module, x: torch.Tensor, repeats: int = 200) -> float:
    """Microseconds per call (after a warm-up)."""
    with torch.no_grad():
        for _ in range(10):
            module(x)
        started = time.perf_counter()
        for _ in range(repeats):
            module(x)
    return (time.perf_counter() - started) / repeats * 1e6


def kernels() -> list[dict]:
    import copy
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    from lmkit.backbones.unrolled import UnrolledRNN
    from lmkit.builtin_plugins.dynamic_int8 import DynamicInt8Linear

    warnings.filterwarnings("ignore")
    out = []
    print(f"\n{'width':>5} | {'MLP fp32 us':>11} {'torchao':>8} {'quantize_dynamic':>16} {'dynamic_int8':>12} | "
          f"{'LSTM fp32 us':>12} {'quantize_dynamic':>16} {'dynamic_int8':>12}")
    for width in WIDTHS:
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                  torch.nn.Linear(4 * width, width)).eval()
        x = torch.randn(1, 1, width)
        torchao_mlp = copy.deepcopy(mlp)
        quantize_(torchao_mlp, Int8DynamicActivationInt8WeightConfig())
        ours_mlp = torch.nn.Sequential(DynamicInt8Linear.from_float(mlp[0]), torch.nn.GELU(),
                                       DynamicInt8Linear.from_float(mlp[2]))
        lstm = torch.nn.LSTM(width, width, batch_first=True).eval()
        row = {"width": width,
               "mlp_fp32_us": step_time(mlp, x), "mlp_torchao_us": step_time(torchao_mlp, x),
               "mlp_quantize_dynamic_us": step_time(quantize_dynamic(
                   copy.deepcopy(mlp), {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8), x),
               "mlp_dynamic_int8_us": step_time(ours_mlp, x),
               "lstm_fp32_us": step_time(lstm, x),
               "lstm_quantize_dynamic_us": step_time(quantize_dynamic(
                   copy.deepcopy(lstm), {torch.nn.LSTM: per_channel_dynamic_qconfig}, dtype=torch.qint8), x),
               "lstm_dynamic_int8_us": step_time(UnrolledRNN(lstm, DynamicInt8Linear.from_float), x)}
        row = {k: round(v, 1) if k != "width" else v for k, v in row.items()}
        out.append(row)
        print(f"{width:>5} | {row['mlp_fp32_us']:>11} {row['mlp_torchao_us']:>8} {row['mlp_quantize_dynamic_us']:>16} "
              f"{row['mlp_dynamic_int8_us']:>12} | {row['lstm_fp32_us']:>12} {row['lstm_quantize_dynamic_us']:>16} "
              f"{row['lstm_dynamic_int8_us']:>12}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--lstm", type=Path, help="checkpoint of the default LSTM (default: train it)")
    parser.add_argument("--transformer", type=Path, help="checkpoint of the default Transformer (default: train it)")
    parser.add_argument("--llama", type=Path, help="checkpoint of model=llama (default: train it)")
    parser.add_argument("--cache-dir", default=os.environ.get("LMKIT_CACHE", ".cache/lmkit"))
    parser.add_argument("--only", choices=("recipes", "widths", "kernels"))
    parser.add_argument("--wide", type=Path, nargs="?", const=True, default=None,
                        help="also the recipes on a Transformer 6x384 (trained here for --wide-steps, or this checkpoint)")
    parser.add_argument("--wide-steps", type=int, default=1500, help="training steps of the wide model (23 minutes here)")
    parser.add_argument("--models", default="lstm,transformer,llama", help="which default models' recipes to run")
    parser.add_argument("--recipes", help="comma-separated labels of RECIPES to run (default: all)")
    parser.add_argument("--gen-tokens", type=int, default=200, help="tokens generated per speed measurement (0: none)")
    parser.add_argument("--train-dir", type=Path, help="keep the trained runs here (default: a temporary folder)")
    args = parser.parse_args()
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    if args.only in (None, "recipes"):
        with tempfile.TemporaryDirectory() as tmp:
            runs = args.train_dir or Path(tmp)
            checkpoints = {kind: getattr(args, kind) or train([f"model={kind}"], runs / kind, args.cache_dir)
                           for kind in args.models.split(",") if kind}
            if args.wide:
                checkpoints["transformer 6x384"] = args.wide if isinstance(args.wide, Path) else train(
                    [*WIDE, f"trainer.max_steps={args.wide_steps}", f"trainer.val_check_interval={args.wide_steps}"],
                    runs / "wide", args.cache_dir)
            only = {kind: args.recipes.split(",") if args.recipes else list(RECIPES) for kind in checkpoints}
            if not args.recipes:
                only["transformer 6x384"] = WIDE_RECIPES
            result["recipes"] = recipes(checkpoints, args.cache_dir, only, args.gen_tokens,
                                        args.out.with_suffix(".partial.json") if args.out else None)
    if args.only in (None, "widths"):
        result["widths"] = widths()
    if args.only in (None, "kernels"):
        result["kernels"] = kernels()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
