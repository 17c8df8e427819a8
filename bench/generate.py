"""Generation speed at batch 1: tokens/s for 50 and 500 new tokens, with and without the cache.

    python bench/generate.py [--out bench/results/generate.json] [--repeats 3]

With the cache (KV cache / recurrent state) each token costs one step, so tokens/s stays flat as
the text grows; without it every token re-reads the whole context. Models are the default CPU
shapes with random weights: speed does not depend on what the weights learned. Greedy, best of
--repeats rounds. The row "lstm 1x256, oneDNN always (before)" is the LSTM's path before it skipped
oneDNN on small inference calls (`lmkit/backbones/lstm.py`, ONEDNN_OFF_MAX_BATCH): the baseline,
side by side with the current path.

Each model is measured in a fresh process, as `lmkit generate` meets it, and the processes alternate
round after round. oneDNN's LSTM step depends on what ran before it in the process: after a large
allocation was freed (a big matmul, a Transformer) glibc serves its per-call buffers from the heap,
before that from mmap, page faults and all (0.2 against 0.5-1.5 ms per step here). Timing one model
after another in one process measured the old path 4-5x faster than a process of its own gets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import lmkit.backbones.lstm as lstm_backbone
from lmkit.backbones import backbone_config, build_backbone
from lmkit.generate import generate

MODELS = {
    "transformer 4x128 (ctx 512)": ("transformer", dict(n_layer=4, n_head=4, n_embd=128, max_seq_len=512)),
    "lstm 1x256, oneDNN always (before)": ("lstm", dict(n_layer=1, n_embd=256)),
    "lstm 1x256": ("lstm", dict(n_layer=1, n_embd=256)),
}
CELLS = [(True, 50), (True, 500), (False, 50), (False, 500)]  # (cache, new tokens), cached first as in use


def seconds(backbone: torch.nn.Module, new_tokens: int, use_cache: bool) -> float:
    prompt = torch.zeros(1, 8, dtype=torch.long)
    started = time.perf_counter()
    generate(backbone, prompt, max_new_tokens=new_tokens, temperature=0, use_cache=use_cache)
    return time.perf_counter() - started


def child(name: str, first_round: bool) -> None:
    """One round of one model in this (fresh) process: prints the seconds of each cell as JSON."""
    if "oneDNN always" in name:
        lstm_backbone.ONEDNN_OFF_MAX_BATCH = 0  # no call is small enough to skip oneDNN
    kind, options = MODELS[name]
    torch.manual_seed(0)
    backbone = build_backbone(backbone_config(kind, 80, **options)).eval()
    times = {}
    for use_cache, n in CELLS:
        if n == 500 and not use_cache and not first_round:
            continue  # 500 tokens re-reading the whole context take seconds: one run
        seconds(backbone, 10, use_cache)  # warm-up
        times[f"{use_cache} {n}"] = seconds(backbone, n, use_cache)
    print(json.dumps(times))


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages: how busy the two cores were around the run."""
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; best of them (one run for 500 tokens uncached)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--first-round", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.first_round)
    load_before = loadavg()
    best: dict[str, dict[str, float]] = {name: {} for name in MODELS}
    for round_ in range(args.repeats):
        for name in MODELS:
            command = [sys.executable, __file__, "--child", name] + (["--first-round"] if round_ == 0 else [])
            times = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            for cell, s in times.items():
                best[name][cell] = min(best[name].get(cell, float("inf")), s)
    rows = []
    print(f"{'model':<36} {'cache':>6} {'50 tok/s':>10} {'500 tok/s':>10}")
    for name in MODELS:
        for use_cache in (True, False):
            row = {"model": name, "cache": use_cache, "tok_s_50": round(50 / best[name][f"{use_cache} 50"], 1),
                   "tok_s_500": round(500 / best[name][f"{use_cache} 500"], 1)}
            rows.append(row)
            print(f"{name:<36} {str(use_cache):>6} {row['tok_s_50']:>10} {row['tok_s_500']:>10}")
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "load_average_before": load_before,
              "load_average_after": loadavg(), "rows": rows}
    print(f"load average before: {load_before}; after: {result['load_average_after']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
