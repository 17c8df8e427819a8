"""Training speed: `python train.py` against a hand-written loop and against nanoGPT's loop.

    python bench/throughput.py [--steps 300] [--repeats 3] [--out bench/results/throughput.json]

raw:     lmkit's backbone in a hand-written PyTorch loop, same batches (the same TrainBatches
         stream), AdamW settings, warm-up/cosine schedule and clipping: what Lightning costs.
nanogpt: bench/nanogpt.py, a nanoGPT-equivalent model and loop at the same shape and data (its
         own get_batch, parameter groups, schedule and clipping): what lmkit as a whole costs.
         Its rows set `bias` as the lmkit side does (nanoGPT's default is bias=False).
Each side runs in its own process, alternated, and reports training tokens/s from its first step
to its last (evaluation excluded). On a GPU machine the rows run on cuda with bf16 as well.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# name -> (train.py overrides, nanoGPT reference's bias or None for no nanoGPT row)
SETUPS = {"transformer": (["model=transformer"], "true"),
          "transformer bias=false": (["model=transformer", "model.bias=false"], "false"),
          "lstm": (["model=lstm"], None)}


def lightning_tokens_per_s(overrides: list[str], steps: int, device: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ["trainer=gpu"] if device == "cuda" else []
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides, *trainer, f"trainer.max_steps={steps}",
               f"trainer.val_check_interval={steps}", f"hydra.run.dir={tmp}", "data.test_windows=1"]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads((Path(tmp) / "metrics.json").read_text())["tokens_per_s"]


def raw_tokens_per_s(overrides: list[str], steps: int, device: str) -> float:
    cmd = [sys.executable, __file__, "--raw", "--steps", str(steps), "--device", device, *overrides]
    out = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def nanogpt_tokens_per_s(overrides: list[str], steps: int, bias: str) -> float:
    cmd = [sys.executable, str(ROOT / "bench" / "nanogpt.py"), "--steps", str(steps), "--bias", bias, *overrides]
    out = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def raw_loop(overrides: list[str], steps: int, device: str, timed_from: int = 0, compile: bool = False,
             out: Path | None = None) -> None:
    """The hand-written loop: what a person writes without a framework. Timed from step `timed_from` (bench/gpu.py: a
    steady-state window, the device synchronised at both ends) to the last; `compile` compiles the backbone in place,
    as `model.compile=true` does; `out` also gets the printed JSON line."""
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lmkit.record import ModelRecord
    from lmkit.backbones import build_backbone
    from lmkit.data.datamodule import LMDataModule
    from lmkit.data.windows import TrainBatches

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "paths.output_dir=unused"])
    torch.manual_seed(cfg.seed)
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # as lmkit.train.run does on a GPU
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.pop("_target_")
    datamodule = LMDataModule(**data, tokenizer=OmegaConf.to_container(cfg.tokenizer), cache_dir=cfg.paths.cache_dir,
                              seed=cfg.seed)
    datamodule.prepare_data()
    record = ModelRecord.from_settings(OmegaConf.to_container(cfg.model, resolve=True), datamodule.tokenizer.vocab_size)
    model = build_backbone(record.backbone).to(device)
    if compile:
        model.compile()  # in place, as LitLanguageModel.configure_model does
    o = cfg.optim
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)  # as lmkit
    batches = iter(TrainBatches(datamodule.cache.split("train"), datamodule.seq_len, datamodule.batch_size, cfg.seed,
                                pin_memory=device == "cuda"))  # as LMDataModule pins them for a GPU
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    tokens, started = 0, None
    for step in range(steps):
        inputs, targets = (t.to(device, non_blocking=True) for t in next(batches))
        if step == timed_from:
            if device == "cuda":
                torch.cuda.synchronize()
            started, tokens = time.perf_counter(), 0
        warm = min(1.0, (step + 1) / o.warmup_steps)
        cos = o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = o.lr * (warm if step < o.warmup_steps else cos)
        with autocast:
            logits, _ = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        optimizer.step()
        tokens += inputs.numel()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {"tokens_per_s": tokens / seconds, "loss": loss.item()}
    if out is not None:  # (bench/gpu.py's figures)
        from bench.gpu_probe import device_name, flops_per_token, peak_memory_gib, write_json

        write_json(out, {**result, "side": "raw", "device": device_name(), "steps": steps - timed_from,
                         "from_step": timed_from, "seconds": round(seconds, 4), "tokens": tokens,
                         "peak_gib": peak_memory_gib(),
                         "flops_per_token": flops_per_token(model, datamodule.seq_len),
                         "precision": "bf16-mixed" if device == "cuda" else "32-true", "compiled": compile})
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--warm", type=int, default=0, help=argparse.SUPPRESS)  # (--raw: bench/gpu.py's window)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.raw:
        return raw_loop(overrides, args.steps, args.device, timed_from=args.warm, compile=args.compile, out=args.json)
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    print(f"{'model':<24} {'device':<6} {'lightning tok/s':>16} {'raw loop tok/s':>15} {'x raw':>6} "
          f"{'nanoGPT tok/s':>14} {'x nanoGPT':>9}")
    for device in devices:
        for name, (overrides, bias) in SETUPS.items():
            lightning, raw, nano = [], [], []
            for _ in range(args.repeats):  # alternated, so drift on the machine hits every side
                lightning.append(lightning_tokens_per_s(overrides, args.steps, device))
                raw.append(raw_tokens_per_s(overrides, args.steps, device))
                if bias is not None and device == "cpu":
                    nano.append(nanogpt_tokens_per_s(overrides, args.steps, bias))
            # medians: on this machine a run can drift 30% from the one before it, either way
            row = {"model": name, "device": device, "steps": args.steps, "lightning_tok_s": round(median(lightning)),
                   "raw_tok_s": round(median(raw)), "ratio": round(median(lightning) / median(raw), 3),
                   "all_lightning": [round(x) for x in lightning], "all_raw": [round(x) for x in raw]}
            if nano:
                row.update(nanogpt_tok_s=round(median(nano)), ratio_nanogpt=round(median(lightning) / median(nano), 3),
                           all_nanogpt=[round(x) for x in nano])
            rows.append(row)
            print(f"{name:<24} {device:<6} {row['lightning_tok_s']:>16} {row['raw_tok_s']:>15} {row['ratio']:>6} "
                  f"{row.get('nanogpt_tok_s', '-'):>14} {row.get('ratio_nanogpt', '-'):>9}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cores",
                                        "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
