"""Generation speed at batch 1: tokens/s for 50 and 500 new tokens, with and without the cache.

    python bench/generate.py [--out bench/results/generate.json]

With the cache (KV cache / recurrent state) each token costs one step, so tokens/s stays flat as
the text grows; without it every token re-reads the whole context. Models are the default CPU
shapes with random weights: speed does not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from lmkit.backbones import backbone_config, build_backbone
from lmkit.generate import generate

MODELS = {
    "transformer 4x128 (ctx 512)": ("transformer", dict(n_layer=4, n_head=4, n_embd=128, max_seq_len=512)),
    "lstm 1x256": ("lstm", dict(n_layer=1, n_embd=256)),
}


def tokens_per_s(backbone: torch.nn.Module, new_tokens: int, use_cache: bool, repeats: int = 3) -> float:
    prompt = torch.zeros(1, 8, dtype=torch.long)
    generate(backbone, prompt, max_new_tokens=10, temperature=0, use_cache=use_cache)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        generate(backbone, prompt, max_new_tokens=new_tokens, temperature=0, use_cache=use_cache)
        best = min(best, time.perf_counter() - started)
    return new_tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    print(f"{'model':<30} {'cache':>6} {'50 tok/s':>10} {'500 tok/s':>10}")
    for name, (kind, options) in MODELS.items():
        torch.manual_seed(0)
        backbone = build_backbone(backbone_config(kind, 80, **options)).eval()
        for use_cache in (True, False):
            row = {"model": name, "cache": use_cache,
                   "tok_s_50": round(tokens_per_s(backbone, 50, use_cache), 1),
                   "tok_s_500": round(tokens_per_s(backbone, 500, use_cache, repeats=1 if not use_cache else 3), 1)}
            rows.append(row)
            print(f"{name:<30} {str(use_cache):>6} {row['tok_s_50']:>10} {row['tok_s_500']:>10}")
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
