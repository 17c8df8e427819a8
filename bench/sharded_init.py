"""What a rank holds while it builds a sharded model: lmkit's meta-device build against the whole-model build before it.

    python bench/sharded_init.py                  # against 5dcdf0a, the last commit that built whole models
    python bench/sharded_init.py --before COMMIT --out bench/results/sharded_init.json

A ~150M-parameter Transformer (12 x 1024, char vocabulary), `trainer=fsdp` on 2 and 4 CPU processes, two AdamW
steps; then `init_from` that model's exported folder on 2 processes. Each row runs twice, with this checkout's
train.py and with the `--before` commit's (a git worktree), and reports each rank's peak RSS when the model is built
(at `on_fit_start`: configure_model, sharding and loading are done, no step has run) and at the last step
(`bench/parallel.py`'s StateBytes: parameters, gradients and AdamW state by then). Run on an otherwise idle machine:
on 2 cores, four ranks share them.
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
MODEL = ["model=transformer", "model.n_layer=12", "model.n_embd=1024", "model.n_head=16", "model.max_seq_len=64"]
QUIET = ["data.seq_len=64", "data.val_windows=8", "data.test_windows=8", "trainer.num_sanity_val_steps=0",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.text_sampler=null",
         "callbacks.preemption=null", "logger=none", "trainer.limit_val_batches=0", "trainer.limit_test_batches=0"]


class BuildPeak(L.Callback):
    """Writes this rank's peak RSS once the model is built, sharded and loaded, before any step."""

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        Path(trainer.default_root_dir, f"build-rank{trainer.global_rank}.json").write_text(json.dumps(
            {"rank": trainer.global_rank, "build_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run(code: Path, name: str, overrides: list[str], work: Path) -> dict:
    run_dir = work / "".join(c if c.isalnum() else "_" for c in name)
    cmd = [sys.executable, str(code / "train.py"), f"hydra.run.dir={run_dir}", *MODEL, *QUIET, *overrides,
           "trainer.max_steps=2", "+callbacks.build_peak._target_=sharded_init.BuildPeak",
           "+callbacks.state_bytes._target_=parallel.StateBytes"]
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{ROOT / 'bench'}"}
    result = subprocess.run(cmd, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    ranks = []
    for build in sorted(run_dir.glob("build-rank*.json")):
        figures = json.loads(build.read_text())
        figures.update(json.loads((run_dir / build.name.replace("build", "memory")).read_text()))
        ranks.append(figures)
    return {"row": name, "overrides": overrides, "ranks": sorted(ranks, key=lambda r: r["rank"]), "run_dir": str(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="5dcdf0a", help="the commit to compare with (5dcdf0a: the last one that "
                        "built whole models on every rank)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results, load_before = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work, before = Path(tmp), Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            def row(label: str, overrides: list[str]) -> None:
                for code, which in ((before, "before"), (ROOT, "meta")):
                    results.append({"code": which, **run(code, f"{label} {which}", overrides, work)})
                    r = results[-1]
                    mem = ", ".join(f"{x['build_peak_rss_mb']:.0f}/{x['peak_rss_mb']:.0f}" for x in r["ranks"])
                    print(f"{label:24} {which:6}  build/final peak RSS MB per rank: {mem}", flush=True)

            fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", "callbacks.model_checkpoint=null"]
            row("FSDP x2", [*fsdp, "trainer.devices=2", "data.batch_size=4"])
            row("FSDP x4", [*fsdp, "trainer.devices=4", "data.batch_size=2"])
            # a pretrained folder of the same model: one process's checkpoint, exported
            source = work / "source"
            subprocess.run([sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={source}", *MODEL, *QUIET,
                            "trainer.max_steps=1", "data.batch_size=2"], cwd=ROOT, check=True, capture_output=True)
            subprocess.run([str(Path(sys.executable).with_name("lmkit")), "export", f"model={source}/checkpoints/last.ckpt",
                            f"out={work / 'pretrained'}"], cwd=ROOT, check=True, capture_output=True)
            row("FSDP x2 init_from", [*fsdp, "trainer.devices=2", "data.batch_size=4",
                                      f"init_from={work / 'pretrained'}"])
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "load_before": load_before, "load_after": os.getloadavg(), "model": MODEL, "before": args.before,
              "parameters": results[0]["ranks"][0]["parameters"], "rows": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
