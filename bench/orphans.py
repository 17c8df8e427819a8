"""Chaos: SIGKILL the launcher of a two-rank run at a random moment, and count its ranks alive 15 s later.

    python bench/orphans.py --tries 16            # = python bench/run.py orphans: 8 DDP and 8 FSDP runs, alternated
    python bench/orphans.py --tries 4 --seed 1 --out bench/results/orphans.json

Each try starts `python train.py trainer=ddp|fsdp trainer.accelerator=cpu trainer.devices=2` (a tiny LSTM, steps
without end) in a session of its own, kills the launcher (rank 0, which starts rank 1) with SIGKILL at a moment drawn
uniformly from the first --window seconds (before, while and after rank 1 starts, and in training), waits 15 s, and
counts what it had started that still runs: its children at the kill, and any process whose environment names it
in LMKIT_LAUNCHER_PID. Then it kills the whole session, so that no try outlives itself. Target: 0. Before
lmkit.distributed.die_with_launcher, 6 of 16 tries left a rank alive (DESIGN.md, Sharded training at scale).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ["model=lstm", "model.n_layer=1", "model.n_embd=32", "data.seq_len=32", "data.batch_size=8",
       "data.val_windows=16", "data.test_windows=16", "trainer.enable_progress_bar=false",
       "trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0", "trainer.accelerator=cpu",
       "trainer.devices=2", "trainer.max_steps=1000000", "trainer.val_check_interval=20",
       "callbacks.text_sampler=null", "logger=none"]
GRACE_S = 15


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # (a zombie has ended)
    except OSError:
        return False


def started_by(launcher: int) -> set[int]:
    """Its children now, and the processes whose environment names it (ranks re-parented after its death)."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher or f"LMKIT_LAUNCHER_PID={launcher}".encode() in env:
            found.add(int(proc.name))
    return found


def one_try(strategy: str, kill_at: float, folder: Path, cache_dir: Path) -> dict:
    run_dir = folder / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), f"trainer={strategy}", *RUN, f"hydra.run.dir={run_dir}",
           f"paths.cache_dir={cache_dir}"]
    with open(folder / "stderr.log", "w") as err:
        launcher = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        time.sleep(kill_at)
        ranks = started_by(launcher.pid)
        phase = ("before rank 1" if not ranks else "training" if any((run_dir / "checkpoints").glob("*"))
                 else "rank 1 starting")
        launcher.kill()
        launcher.wait()
        time.sleep(GRACE_S)
        left = sorted(pid for pid in ranks | started_by(launcher.pid) if alive(pid))
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)  # (the ranks are in the launcher's process group)
        except ProcessLookupError:
            pass
    return {"strategy": strategy, "kill_at_s": round(kill_at, 1), "phase": phase, "started": len(ranks),
            "alive_after_15s": len(left)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tries", type=int, default=16)
    parser.add_argument("--window", type=float, default=25.0, help="kill within this many seconds of the start")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    draw = random.Random(args.seed)
    rows, load_before = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.tries):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            row = one_try(("ddp", "fsdp")[i % 2], draw.uniform(1.0, args.window), folder, Path(tmp) / "cache")
            rows.append(row)
            print(f"{i + 1:2d}  {row['strategy']:4s}  killed at {row['kill_at_s']:5.1f} s ({row['phase']}): "
                  f"{row['alive_after_15s']} of {row['started']} alive {GRACE_S} s later", flush=True)
    summary = {s: f"{sum(r['alive_after_15s'] > 0 for r in rows if r['strategy'] == s)}/"
                  f"{sum(r['strategy'] == s for r in rows)}" for s in ("ddp", "fsdp")}
    print(f"tries with a process alive {GRACE_S} s after its launcher's SIGKILL: DDP {summary['ddp']}, "
          f"FSDP {summary['fsdp']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        machine = (f"{platform.machine()}, {os.cpu_count()} cores, 1-minute load {load_before:.1f} before, "
                   f"{os.getloadavg()[0]:.1f} after")
        args.out.write_text(json.dumps({"machine": machine, "python": platform.python_version(),
                                        "tries_with_a_survivor": summary, "tries": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
