"""Strategies side by side on one Transformer large enough to show them: 1 process, DDP x2, FSDP x2, TP x2.

    python bench/parallel.py                      # CPU processes (gloo); on a GPU machine the cuda rows too
    python bench/parallel.py --steps 20 --out bench/results/parallel.json

Each row is a real `python train.py` run at the same global batch (one process at batch B; DDP and FSDP at
B/2 per rank; TP x2 at B, both ranks on the same batch) and reports, per rank:
- state_mb: the bytes of this rank's parameters, gradients and AdamW state (its shards under FSDP/TP),
  counted tensor by tensor after the last step: what sharding divides;
- peak_rss_mb: the process's peak resident memory (activations, buffers, the Python runtime included);
- cuda_peak_mb on GPU rows: torch.cuda.max_memory_allocated.
and tokens/s of the whole job (Lightning's steps timed by lmkit's Throughput callback, evaluation left out).
Target: FSDP's state_mb at most 0.6x DDP's. On 2 CPU cores every row shares the same two cores, so tokens/s
compares communication and per-rank work, not what more devices buy. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["model=transformer", "model.n_layer=8", "model.n_embd=512", "model.n_head=8", "model.max_seq_len=128"]
QUIET = ["data.seq_len=128", "data.val_windows=8", "data.test_windows=8", "trainer.num_sanity_val_steps=0",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.text_sampler=null",
         "callbacks.model_checkpoint=null", "callbacks.preemption=null", "logger=none"]


class StateBytes(L.Callback):
    """Writes this rank's memory figures to `<run dir>/memory-rank<R>.json` at the last optimizer step (one file per
    rank), when parameters, gradients and AdamW's moments all exist."""

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer) -> None:
        if trainer.global_step != trainer.max_steps - 1:
            return

        def local(t: torch.Tensor) -> torch.Tensor:
            return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank

        params = list(module.parameters())
        state = getattr(optimizer, "_optimizer", optimizer).state  # (Lightning wraps the optimizer)
        tensors = [local(p) for p in params] + [local(p.grad) for p in params if p.grad is not None]
        tensors += [local(v) for moments in state.values() for v in moments.values() if torch.is_tensor(v)]
        # a tied embedding and head share one storage: count each storage once
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        figures = {"rank": trainer.global_rank, "parameters": sum(p.numel() for p in params),  # (global)
                   "state_mb": sum(storages.values()) / 2**20,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if torch.cuda.is_available():
            figures["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        Path(trainer.default_root_dir, f"memory-rank{trainer.global_rank}.json").write_text(json.dumps(figures))


def rows(batch: int, accelerator: str) -> dict[str, list[str]]:
    device = [f"trainer.accelerator={accelerator}"]
    two = [*device, "trainer.devices=2"]
    return {
        "1 process": ["trainer=gpu" if accelerator == "gpu" else "trainer=cpu", "trainer.precision=32-true",
                      f"data.batch_size={batch}"],
        "DDP x2": ["trainer=ddp", *two, f"data.batch_size={batch // 2}"],
        "FSDP x2": ["trainer=fsdp", *two, f"data.batch_size={batch // 2}"],
        "TP x2": ["trainer=fsdp", *two, "trainer.strategy.tensor_parallel_size=2", f"data.batch_size={batch}"],
    }


def run(name: str, overrides: list[str], steps: int, work: Path) -> dict:
    run_dir = work / "".join(c if c.isalnum() else "_" for c in name)  # a Hydra override takes no ( or space
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *MODEL, *QUIET, *overrides,
           f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
           "+callbacks.state_bytes._target_=parallel.StateBytes"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'bench'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ranks = sorted((json.loads(p.read_text()) for p in run_dir.glob("memory-rank*.json")), key=lambda r: r["rank"])
    return {"row": name, "overrides": overrides, "tokens_per_s": round(metrics["tokens_per_s"]),
            "val_loss": metrics["val_loss"], "ranks": ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences of 128 tokens)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    accelerators = ["cpu"] + (["gpu"] if torch.cuda.device_count() >= 2 else [])
    results, load_before = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        for accelerator in accelerators:
            for name, overrides in rows(args.batch, accelerator).items():
                label = f"{name} ({accelerator})"
                results.append(run(label, overrides, args.steps, Path(work)))
                r = results[-1]
                mem = ", ".join(f"{x['state_mb']:.0f}/{x['peak_rss_mb']:.0f}" for x in r["ranks"])
                print(f"{label:18} {r['tokens_per_s']:>8,} tokens/s   state/peak RSS MB per rank: {mem}", flush=True)
    ddp = next(r for r in results if r["row"] == "DDP x2 (cpu)")["ranks"][0]["state_mb"]
    fsdp = max(x["state_mb"] for x in next(r for r in results if r["row"] == "FSDP x2 (cpu)")["ranks"])
    print(f"FSDP / DDP state per rank: {fsdp / ddp:.2f}x (target <= 0.6x)")
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "load_before": load_before, "load_after": os.getloadavg(), "model": MODEL,
              "parameters": results[0]["ranks"][0]["parameters"], "global_batch": args.batch,
              "steps": args.steps, "rows": results, "fsdp_over_ddp_state": round(fsdp / ddp, 3)}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
