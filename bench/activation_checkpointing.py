"""Activation checkpointing: memory and step time with every block, every second block or no block checkpointed.

    python bench/activation_checkpointing.py                       # = python bench/run.py activation_checkpointing
    python bench/activation_checkpointing.py --compile --out bench/results/activation_checkpointing.json

Trains lmkit's Transformer (8 layers x 512, 8 heads, char vocabulary, sequences of 512, batch 8: activations
outweigh the 25M parameters' weights, gradients and AdamW state at this shape) for a few AdamW steps in one process
with `model.activation_checkpointing` K = 0, 1 and 2 (lmkit.activation_checkpointing, the function train.py
applies), each setting in a fresh process, and reports:
- held_mb: the memory the forward pass leaves for the backward pass (resident memory after the forward minus
  before it, the largest over the timed steps): the activations autograd keeps, and what checkpointing cuts;
- peak_rss_mb: the process's peak resident memory (ru_maxrss: runtime, weights, AdamW state, activations, and the
  recomputation of one block at a time in the backward pass);
- step_s: the median time of a whole step (forward, backward, AdamW) after a warm-up step.
Each child runs with a fixed malloc mmap threshold (MALLOC_MMAP_THRESHOLD_), so that every large tensor is mapped
and unmapped on its own and resident memory follows the live tensors, not glibc's cached heap.
`--compile` adds K=0 and K=1 with each block compiled in place (how train.py compiles under checkpointing).
The losses of all rows must agree (1e-5): checkpointing changes memory and time, never the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE = dict(vocab_size=65, n_layer=8, n_head=8, n_embd=512, max_seq_len=512)


def resident_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(every: int, compile: bool, batch: int, steps: int) -> dict:
    """One setting, in this process: what `main` prints a row of."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(HERE.parent))
    from lmkit.activation_checkpointing import apply_activation_checkpointing
    from lmkit.backbones import Transformer, TransformerConfig

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(**SHAPE))
    apply_activation_checkpointing(model, every)
    if compile:
        for block in model.transformer.h:
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    data = torch.randint(0, SHAPE["vocab_size"], (steps + 1, batch, SHAPE["max_seq_len"] + 1))
    held, times, losses = [], [], []
    for step in range(steps + 1):  # step 0: the warm-up (AdamW's state, compilation), not timed
        inputs, targets = data[step, :, :-1], data[step, :, 1:]
        started, before = time.perf_counter(), resident_mb()
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        after_forward = resident_mb()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - started)
            held.append(after_forward - before)
        losses.append(loss.item())
    return {"every": every, "compile": compile, "held_mb": round(max(held)), "losses": losses,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "step_s": round(statistics.median(times), 3),
            "parameters": sum(p.numel() for p in model.parameters())}


def measure(every: int, compile: bool, batch: int, steps: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    cmd = [sys.executable, __file__, "--child", str(every), "--batch", str(batch), "--steps", str(steps)]
    result = subprocess.run(cmd + (["--compile"] if compile else []), env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"K={every} compile={compile} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps, after one warm-up step")
    parser.add_argument("--batch", type=int, default=8, help="sequences of 512 tokens")
    parser.add_argument("--compile", action="store_true", help="also K=0 and K=1 with each block compiled")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.compile, args.batch, args.steps)))
        return
    settings = [(0, False), (1, False), (2, False)] + ([(0, True), (1, True)] if args.compile else [])
    load_before, rows = os.getloadavg(), []
    print(f"{'setting':<22}{'held by forward MB':>20}{'peak RSS MB':>13}{'step s':>9}", flush=True)
    for every, compile in settings:
        rows.append(measure(every, compile, args.batch, args.steps))
        r = rows[-1]
        label = f"K={every}" + (" (blocks compiled)" if compile else "")
        print(f"{label:<22}{r['held_mb']:>20,}{r['peak_rss_mb']:>13,}{r['step_s']:>9.2f}", flush=True)
    eager = [r for r in rows if not r["compile"]]
    base = eager[0]
    for r in rows:
        tolerance = 1e-5 if r["compile"] == base["compile"] else 1e-4  # (compiled kernels sum in another order)
        worst = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        assert worst < tolerance, f"K={r['every']} compile={r['compile']}: losses differ by {worst}"
    for r in eager[1:]:
        print(f"K={r['every']}: {r['held_mb'] / base['held_mb']:.2f}x the activation memory of K=0, "
              f"{r['step_s'] / base['step_s']:.2f}x its step time")
    import torch

    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "load_before": load_before, "load_after": os.getloadavg(), "shape": SHAPE, "batch": args.batch,
              "steps": args.steps, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
