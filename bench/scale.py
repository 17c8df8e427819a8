"""How cost grows with the work.

    python bench/scale.py [--sizes 10,100,1000] [--out bench/results/scale.json]

1. Tokenizing and caching generated corpora of 10 MB, 100 MB and 1 GB (char tokenizer): seconds and
   the child process's peak RSS, which stays flat because the corpus streams through in blocks and
   the tokens go straight to a file that is read back as a memmap.
2. Training tokens/s as the model grows: Transformer 1, 4, 12 layers; LSTM 1, 2, 4 layers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("thou art the king of all that we see and hear in this fair land where love is lord "
         "and honour waits upon the crown of night ROMEO JULIET speak soft").split()

TOKENIZE = """
import sys
from hydra.utils import instantiate
from lmkit.conf import compose
cfg = compose("train", ["data=text", f"data.path={sys.argv[1]}", "paths.output_dir=unused"])
dm = instantiate(cfg.data, tokenizer={"kind": "char"}, cache_dir=sys.argv[2], seed=0, _convert_="all")
dm.prepare_data()
print(dm.cache.n_tokens)
"""


def write_corpus(path: Path, megabytes: int) -> None:
    rng = random.Random(0)
    line_words = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(5000)]
    block = "\n".join(line_words) + "\n"
    with open(path, "w") as fh:
        for _ in range(max(1, megabytes * (1 << 20) // len(block))):
            fh.write(block)


def tokenize_cost(megabytes: int, tmp: Path) -> dict:
    corpus = tmp / f"corpus-{megabytes}mb.txt"
    write_corpus(corpus, megabytes)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", TOKENIZE, str(corpus), str(tmp / "cache")], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    corpus.unlink()
    return {"corpus_mb": megabytes, "tokens": int(out.split()[-1]), "seconds": round(seconds, 1),
            "peak_rss_mb": round(max(peak_kb, before) / 1024), "mb_per_s": round(megabytes / seconds, 1)}


def train_tokens_per_s(overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, "trainer.max_steps=100",
                        "trainer.val_check_interval=100", "data.test_windows=1", "data.val_windows=1",
                        "callbacks.text_sampler=null", "logger=none", f"hydra.run.dir={run_dir}"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads((Path(run_dir) / "metrics.json").read_text())["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "tokenize": [], "train": []}
    print(f"{'corpus MB':>10} {'tokens':>14} {'seconds':>8} {'MB/s':>6} {'peak RSS MB':>12}")
    # A child's peak RSS is only reported as the maximum over all children so far, so measure
    # the sizes in increasing order: a flat column means memory did not grow with the corpus.
    for mb in sorted(int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            row = tokenize_cost(mb, Path(tmp))
        result["tokenize"].append(row)
        print(f"{row['corpus_mb']:>10} {row['tokens']:>14,} {row['seconds']:>8} {row['mb_per_s']:>6} {row['peak_rss_mb']:>12}")
    print(f"\n{'model':<28} {'train tok/s':>12}")
    for kind, layers in (("transformer", (1, 4, 12)), ("lstm", (1, 2, 4))):
        for n in layers:
            tps = train_tokens_per_s([f"model={kind}", f"model.n_layer={n}"])
            result["train"].append({"model": kind, "n_layer": n, "tokens_per_s": round(tps)})
            print(f"{f'{kind} x{n} layers':<28} {tps:>12,.0f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
