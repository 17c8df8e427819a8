"""Validation loss the default config reaches on this machine, timing the whole `python train.py` process.

    python bench/quality.py                          # the default run
    python bench/quality.py model=lstm               # any overrides
    python bench/quality.py --out bench/results/quality.json

The reference is karpathy/nanoGPT's CPU recipe on the same text (4 layers x 128, block 64,
batch 12, 2000 iterations), measured once on the 2-core CI machine: NANOGPT_VAL_LOSS and
NANOGPT_SECONDS below (bench/README.md, quality, says how to repeat it). lmkit's target is a
validation loss at least 5% lower in about two minutes. Run on an otherwise idle machine.
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

ROOT = Path(__file__).resolve().parent.parent
NANOGPT_VAL_LOSS, NANOGPT_SECONDS = 1.885, 118.0


def run_train(overrides: list[str], run_dir: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *overrides]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"overrides": overrides, "process_s": round(wall, 1), **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to train.py")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # A warm-up run fills the token cache, so the timed run measures training, as a second run would.
        run_train([*args.overrides, "trainer.max_steps=1", "trainer.val_check_interval=1", "callbacks=none",
                   "logger=none", "data.val_windows=1", "data.test_windows=1"], Path(tmp) / "warm")
        result = run_train(args.overrides, Path(tmp) / "run")
    result.update(machine=f"{platform.node()} {os.cpu_count()} cores", torch_threads=os.cpu_count(),
                  nanogpt_val_loss=NANOGPT_VAL_LOSS, nanogpt_s=NANOGPT_SECONDS,
                  vs_nanogpt=round(result["val_loss"] / NANOGPT_VAL_LOSS - 1, 4))
    print(f"{'overrides':<40} {'steps':>6} {'process s':>10} {'val_loss':>9} {'vs nanoGPT':>11} {'tok/s':>8}")
    print(f"{' '.join(result['overrides']) or '(default)':<40} {result['steps']:>6} {result['process_s']:>10} "
          f"{result['val_loss']:>9.4f} {result['vs_nanogpt']:>+10.1%} {result['tokens_per_s']:>8.0f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
