"""One entry point for the benchmarks: `python bench/run.py [name ...]` (no name: all of them).

    throughput   train.py vs a hand-written loop and vs a nanoGPT-equivalent loop, same work, alternated
    quality      validation loss of the default run against nanoGPT's CPU recipe, whole process timed
    generate     generation tokens/s at 50 and 500 new tokens, with and without the cache
    lstm_cpu     nn.LSTM inference on the CPU with oneDNN on and off, by batch size: where the backbone skips it
    scale        tokenizing 10 MB / 100 MB / 1 GB corpora (time, peak RSS); tokens/s as models grow
    compression  size / perplexity / speed of each compression recipe; where int8 kernels pay, by width
    grids        int4/int8 on llama.cpp's grids: rtn vs GPTQ vs activation-aware scales, lmkit's and llama.cpp's
                 perplexity of the GGUF exports, tokens/s at batch 1 and 32
    deploy       torch vs onnxruntime (fp32, int8, int4): perplexity and bytes of the default models, tokens/s by width
    serve        lmkit serve at 1, 8 and 32 streaming clients: requests/s, tokens/s, p50/p99 first-token and total latency
    parallel     1 process, DDP x2, FSDP x2 and TP x2 on a 25M-parameter Transformer: memory per rank, tokens/s
    finetune     full fine-tuning vs LoRA vs QLoRA: memory, tokens/s, checkpoint bytes, val loss on Python source
    sharded_init FSDP x2/x4 on a 150M-parameter Transformer, from its own init and from init_from: each rank's
                 peak RSS while the model is built, meta-device build against the whole-model build before it
    activation_checkpointing   every block / every second block / no block checkpointed: activation memory, step time
    chat         data=chat: packed rows (no attention across conversations) vs padded batches: tokens/s, padding
    instruct     exact-answer tasks (successor numbers, repeat a word): base, SFT full/LoRA/QLoRA, SFT + DPO on held-out
                 prompts (greedy exact match, preference accuracy)
    dpo          finetune.objective=dpo: the reference's log-probabilities precomputed once against computed live
    orphans      SIGKILL a two-rank run's launcher at random moments (DDP, FSDP): ranks alive 15 s later (target 0)
    gpu          only when named (it needs a GPU): bench/gpu.py, every CUDA path's tests and the GPU speed table in at
                 most 8 minutes; logs in outputs/gpu/, the figures in bench/results/gpu.json (bench/README.md, gpu)

Each prints its table and writes bench/results/<name>.json. Run on an otherwise idle machine:
on 2 cores a second busy process halves every number.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {"throughput": "throughput.py", "quality": "quality.py", "generate": "generate.py",
           "lstm_cpu": "lstm_cpu.py", "scale": "scale.py",
           "compression": "compression.py", "grids": "grids.py", "deploy": "deploy.py", "serve": "serve.py",
           "parallel": "parallel.py", "sharded_init": "sharded_init.py", "finetune": "finetune.py",
           "activation_checkpointing": "activation_checkpointing.py", "orphans": "orphans.py", "gpu": "gpu.py",
           "chat": "chat.py", "instruct": "instruct.py", "dpo": "dpo.py"}
ONLY_WHEN_NAMED = ("gpu",)


def main() -> int:
    names = sys.argv[1:] or [n for n in BENCHES if n not in ONLY_WHEN_NAMED]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"error: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    for name in names:
        print(f"== {name}", flush=True)
        out = HERE / "results" / f"{name}.json"
        if name == "gpu":  # --out is its folder of logs; it writes bench/results/gpu.json itself
            out = HERE.parent / "outputs" / "gpu"
        subprocess.run([sys.executable, str(HERE / BENCHES[name]), "--out", str(out)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
