"""How cost grows with the work.

    python bench/scale.py [--sizes 10,100,1000] [--inputs txt,parquet] [--no-train] [--out bench/results/scale.json]

1. Tokenizing and caching generated corpora of 10 MB, 100 MB and 1 GB of text (char tokenizer), as one
   .txt file and as a Parquet file of 1.5 KB documents (needs pyarrow): seconds and the child process's
   peak RSS, which stays flat because the corpus streams through in blocks (Parquet: batches of rows)
   and the tokens go straight to a file that is read back as a memmap.
2. Training tokens/s as the model grows: Transformer 1, 4, 12 layers; LSTM 1, 2, 4 layers.
"""

from __future__ import annotations

import argparse
import importlib.util
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


def corpus_lines() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(5000)]


def write_corpus(path: Path, megabytes: int) -> None:
    block = "\n".join(corpus_lines()) + "\n"
    with open(path, "w") as fh:
        for _ in range(max(1, megabytes * (1 << 20) // len(block))):
            fh.write(block)


def write_parquet_corpus(path: Path, megabytes: int, docs_per_row_group: int = 40_000) -> None:
    """The same text as documents of 20 lines, in row groups of ~60 MB (no dictionary: every row is new text
    to the reader, as in a real corpus; snappy, pyarrow's default)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = corpus_lines()
    docs = ["\n".join(lines[i:i + 20]) for i in range(0, len(lines), 20)]
    n_docs = max(1, megabytes * (1 << 20) // (sum(map(len, docs)) // len(docs) + 2))
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())]), use_dictionary=False) as writer:
        for start in range(0, n_docs, docs_per_row_group):
            rows = min(docs_per_row_group, n_docs - start)
            writer.write_table(pa.table({"text": [docs[i % len(docs)] for i in range(start, start + rows)]}))


def tokenize_cost(megabytes: int, tmp: Path, kind: str = "txt") -> dict:
    corpus = tmp / f"corpus-{megabytes}mb.{kind}"
    (write_parquet_corpus if kind == "parquet" else write_corpus)(corpus, megabytes)
    file_mb = corpus.stat().st_size / (1 << 20)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", TOKENIZE, str(corpus), str(tmp / "cache")], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    corpus.unlink()
    return {"input": kind, "corpus_mb": megabytes, "file_mb": round(file_mb), "tokens": int(out.split()[-1]),
            "seconds": round(seconds, 1),
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
    parser.add_argument("--inputs", default="txt,parquet", help="corpus files to tokenize: txt, parquet")
    parser.add_argument("--no-train", action="store_true", help="measure tokenizing only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "tokenize": [], "train": []}
    print(f"{'input':>8} {'corpus MB':>10} {'file MB':>8} {'tokens':>14} {'seconds':>8} {'MB/s':>6} "
          f"{'peak RSS MB':>12}")
    # A child's peak RSS is only reported as the maximum over all children so far, so measure
    # the sizes in increasing order, one input after the other: a flat column means memory did not grow
    # with the corpus (a later input's rows show its own peak only where it is above the earlier ones').
    for kind in args.inputs.split(","):
        if kind == "parquet" and importlib.util.find_spec("pyarrow") is None:
            print("  parquet: skipped, pyarrow is not installed (pip install 'lmkit[parquet]')")
            continue
        for mb in sorted(int(s) for s in args.sizes.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                row = tokenize_cost(mb, Path(tmp), kind)
            result["tokenize"].append(row)
            print(f"{kind:>8} {row['corpus_mb']:>10} {row['file_mb']:>8} {row['tokens']:>14,} {row['seconds']:>8} "
                  f"{row['mb_per_s']:>6} {row['peak_rss_mb']:>12}")
    if args.no_train:
        return _write(result, args.out)
    print(f"\n{'model':<28} {'train tok/s':>12}")
    for kind, layers in (("transformer", (1, 4, 12)), ("lstm", (1, 2, 4))):
        for n in layers:
            tps = train_tokens_per_s([f"model={kind}", f"model.n_layer={n}"])
            result["train"].append({"model": kind, "n_layer": n, "tokens_per_s": round(tps)})
            print(f"{f'{kind} x{n} layers':<28} {tps:>12,.0f}")
    _write(result, args.out)


def _write(result: dict, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
