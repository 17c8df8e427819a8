"""Full fine-tuning, LoRA and QLoRA side by side: memory, speed, checkpoint bytes and the loss each reaches.

    python bench/finetune.py --out bench/results/finetune.json      # = python bench/run.py finetune

Every row is a real `python train.py init_from=<base> ...` run on a corpus of another domain than the base's:
the Python standard library's own source (the first ~400 KB of `*.py` files under `sysconfig`'s stdlib path,
in sorted order, concatenated into one .txt; `data=text`). A callback (`+callbacks.finetune_memory=...`) writes
the run's figures at the last optimizer step. The design is honest for a 2-core CPU, so it runs in two parts:

1. Memory, speed, bytes: a model large enough that weights and AdamW state dominate, GPT-2 small's shape
   (12 layers x 768, 12 heads), built once with random weights and saved as an lmkit folder (weights' values
   change neither memory, nor bytes, nor speed), then full / LoRA / LoRA with the embedding trained
   (finetune.train_embeddings=true) / QLoRA (finetune=lora finetune.base=int4) each train it for a handful of
   steps on short sequences (seq 64, batch 2). Per row:
   - state_mb: trainable parameters + their gradients + AdamW's moments, counted tensor by tensor at the last
     step (each storage once): what LoRA shrinks;
   - model_mb: every parameter and buffer of the model (the frozen base too: int4 codes and scales for QLoRA);
   - peak_rss_mb: the training process's peak resident memory (getrusage of the child, the whole process:
     loading the base and writing the checkpoint included; QLoRA quantizes its base part by part as it reads
     it, so the float base is never whole in memory); rss_at_step_mb: its resident memory at the last step;
   - tokens_per_s: lmkit's Throughput callback (training steps only; a handful of steps on a shared 2-core
     machine: compare rows, not absolutes);
   - ckpt_bytes: the size of checkpoints/last.ckpt (a LoRA checkpoint holds its adapters and their optimizer
     state, and the path + fingerprint of its base).
2. Quality: a pretrained base is needed, so a small Transformer (model=transformer, 4 x 128, byte-level BPE of
   2048 tokens, so Python's characters encode) is trained briefly on the embedded Shakespeare, then each
   method fine-tunes it for the same number of steps on the Python corpus and the validation loss at the end
   is compared. Full fine-tuning runs at lr 1e-3 and 3e-3, LoRA and LoRA with the embedding trained
   (finetune.train_embeddings=true: every row of the tied embedding/head) at 1e-3, 3e-3 and 1e-2; the targets
   compare each at its best. QLoRA and three more LoRA rows (targets q,v only; r=16; the tied head adapted too)
   run at LoRA's best lr and show what the default (r=8, alpha 16 on q,k,v,o,mlp) buys.

Targets (issue 22, issue 32): QLoRA peak memory at most 0.4x full fine-tuning's; LoRA checkpoint at most 0.05x
full's; LoRA's validation loss within 3% of full fine-tuning's at equal steps, and LoRA with the embedding
trained within 5%. Each is printed met / not met beside the measured ratio. Run on an otherwise idle machine;
the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent
QUIET = ["trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "callbacks.text_sampler=null", "callbacks.preemption=null", "logger=none",
         "callbacks.model_checkpoint.save_top_k=0"]  # last.ckpt only
GPT2_SMALL = dict(kind="transformer", n_layer=12, n_head=12, n_embd=768, max_seq_len=64, gelu="tanh", dropout=0.0)
BASE_STEPS = 600
CORPUS_BYTES = 400_000
LORA, QLORA = ["finetune=lora"], ["finetune=lora", "finetune.base=int4"]
EMBEDDINGS = ["finetune=lora", "finetune.train_embeddings=true"]
FULL_LRS, LORA_LRS = (1e-3, 3e-3), (1e-3, 3e-3, 1e-2)  # each method's targets use its best of these


class FinetuneMemory(L.Callback):
    """Writes `<run dir>/memory.json` at the last optimizer step, when gradients and AdamW's moments all exist."""

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer) -> None:
        if trainer.global_step != trainer.max_steps - 1:
            return

        def nbytes(tensors) -> int:  # a tied embedding and head share one storage: count each storage once
            return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

        trainable = [p for p in module.parameters() if p.requires_grad]
        state = getattr(optimizer, "_optimizer", optimizer).state  # (Lightning wraps the optimizer)
        moments = [v for s in state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        grads = [p.grad for p in trainable if p.grad is not None]
        everything = list(module.backbone.parameters()) + list(module.backbone.buffers())
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        figures = {"trainable_parameters": sum({id(p): p.numel() for p in trainable}.values()),
                   "parameters": sum({id(p): p.numel() for p in module.backbone.parameters()}.values()),
                   "state_mb": nbytes(trainable + grads + moments) / 2**20,
                   "weights_mb": nbytes(trainable) / 2**20, "grads_mb": nbytes(grads) / 2**20,
                   "adamw_mb": nbytes(moments) / 2**20, "model_mb": nbytes(everything) / 2**20,
                   "rss_at_step_mb": rss / 2**20,
                   "peak_rss_at_step_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        Path(trainer.default_root_dir, "memory.json").write_text(json.dumps(figures))


def python_corpus(out: Path, limit: int = CORPUS_BYTES) -> dict:
    """The first `limit` bytes of the standard library's top-level `*.py` files, in sorted order, as one text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size, files = [], 0, 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(f"# {path.name}\n{text}\n")
        size, files = size + len(parts[-1].encode()), files + 1
        if size >= limit:
            break
    out.write_text("".join(parts), encoding="utf-8")
    return {"source": str(stdlib), "files": files, "bytes": out.stat().st_size}


def train(run_dir: Path, overrides: list[str]) -> dict:
    """`python train.py` with `overrides`; its metrics.json, memory.json and the process's peak RSS."""
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *QUIET, *overrides,
           "+callbacks.finetune_memory._target_=finetune.FinetuneMemory"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'bench'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run_dir / "stderr.txt", "w") as err:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage: its peak RSS
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{(run_dir / 'stderr.txt').read_text()[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    memory = json.loads((run_dir / "memory.json").read_text()) if (run_dir / "memory.json").exists() else {}
    last = Path(metrics["last_ckpt"]) if metrics.get("last_ckpt") else None
    return {"overrides": overrides, "val_loss": metrics["val_loss"], "tokens_per_s": round(metrics["tokens_per_s"]),
            "ckpt_bytes": last.stat().st_size if last and last.exists() else None,
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "process_s": round(time.perf_counter() - started, 1),
            **{k: round(v, 1) if isinstance(v, float) else v for k, v in memory.items()}}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-steps", type=int, default=6)
    parser.add_argument("--quality-steps", type=int, default=200)
    parser.add_argument("--base-steps", type=int, default=BASE_STEPS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import lmkit
    from lmkit.backbones import build_backbone
    from lmkit.export import save
    from lmkit.inference import InferenceModel
    from lmkit.record import ModelRecord

    load_before, started = load(), time.perf_counter()
    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU used, torch {torch.__version__}",
                    "command": "python bench/run.py finetune", "load_before": load_before}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "python_stdlib.txt"
        report["corpus"] = python_corpus(corpus)
        text = ["data=text", f"data.path={corpus}"]

        # the pretrained base: a small Transformer on the embedded Shakespeare, byte-level BPE
        base_run = train(work / "base", ["model=transformer", "tokenizer=bpe", f"trainer.max_steps={args.base_steps}",
                                         f"trainer.val_check_interval={args.base_steps}", "data.test_windows=64"])
        print(f"base: model=transformer tokenizer=bpe, {args.base_steps} steps on Shakespeare: val_loss "
              f"{base_run['val_loss']:.4f} ({base_run['process_s']} s, load {load()})", flush=True)
        pretrained = lmkit.load(Path(json.loads((work / "base" / "metrics.json").read_text())["last_ckpt"]))
        save(pretrained, work / "small")

        # part 1: memory, speed and bytes at GPT-2 small's shape (random weights)
        torch.manual_seed(0)
        record = ModelRecord.from_settings(GPT2_SMALL, pretrained.tokenizer.vocab_size, tokenizer="bpe")
        save(InferenceModel(build_backbone(record.backbone).eval(), pretrained.tokenizer, record), work / "gpt2")
        steps = args.memory_steps
        common = [*text, f"init_from={work / 'gpt2'}", "data.seq_len=64", "data.batch_size=2", "data.val_windows=8",
                  "data.test_windows=8", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                  "optim.lr=1e-4", "optim.warmup_steps=1"]
        memory = []
        print(f"\npart 1: GPT-2 small's shape ({GPT2_SMALL['n_layer']}x{GPT2_SMALL['n_embd']}), seq 64, batch 2, "
              f"{steps} steps", flush=True)
        print(f"{'row':8} {'params':>11} {'trainable':>10} {'state MB':>9} {'model MB':>9} {'RSS@step':>9} "
              f"{'peak RSS':>9} {'tokens/s':>9} {'ckpt MB':>9}  load")
        for name, extra in (("full", []), ("LoRA", LORA), ("LoRA+emb", EMBEDDINGS), ("QLoRA", QLORA)):
            r = {"row": name, **train(work / f"mem_{name}", [*common, *extra]), "load_after": load()}
            memory.append(r)
            print(f"{name:8} {r['parameters']:>11,} {r['trainable_parameters']:>10,} {r['state_mb']:>9.1f} "
                  f"{r['model_mb']:>9.1f} {r['rss_at_step_mb']:>9.0f} {r['peak_rss_mb']:>9,} {r['tokens_per_s']:>9,} "
                  f"{r['ckpt_bytes'] / 2**20:>9.1f}  {r['load_after']}", flush=True)
        report["memory"] = {"model": GPT2_SMALL, "seq_len": 64, "batch_size": 2, "steps": steps, "rows": memory}

        # part 2: quality, the same number of steps from the pretrained small base
        steps = args.quality_steps
        common = [*text, f"init_from={work / 'small'}", "data.seq_len=64", "data.batch_size=12", "data.test_windows=64",
                  f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "optim.warmup_steps=20",
                  f"optim.decay_steps={steps}"]
        zero = train(work / "q_zero", [*common, "trainer.max_steps=1", "trainer.val_check_interval=1", "optim.lr=1e-9"])
        quality = []
        print(f"\npart 2: 4x128 Transformer pretrained on Shakespeare, {steps} steps on Python source (seq 64, "
              f"batch 12); val_loss before fine-tuning {zero['val_loss']:.4f}")
        print(f"{'row':10} {'lr':>6} {'trainable':>10} {'val_loss':>9} {'tokens/s':>9} {'ckpt KB':>9}  load")

        def row(name: str, extra: list[str], lr: float) -> None:
            r = {"row": name, "lr": lr, **train(work / f"q{len(quality)}", [*common, *extra, f"optim.lr={lr}"]),
                 "load_after": load()}
            quality.append(r)
            print(f"{name:10} {lr:>6g} {r['trainable_parameters']:>10,} {r['val_loss']:>9.4f} {r['tokens_per_s']:>9,} "
                  f"{r['ckpt_bytes'] / 2**10:>9.1f}  {r['load_after']}", flush=True)

        for lr in FULL_LRS:
            row("full", [], lr)
        for lr in LORA_LRS:
            row("LoRA", LORA, lr)
        for lr in LORA_LRS:
            row("LoRA+emb", EMBEDDINGS, lr)
        lr = min((r for r in quality if r["row"] == "LoRA"), key=lambda r: r["val_loss"])["lr"]  # the others at it
        row("QLoRA", QLORA, lr)
        row("LoRA q,v", [*LORA, "finetune.targets=[q,v]"], lr)
        row("LoRA r=16", [*LORA, "finetune.r=16", "finetune.alpha=32"], lr)
        row("LoRA +head", [*LORA, "finetune.targets=[q,k,v,o,mlp,head]"], lr)
        report["quality"] = {"base": {"overrides": base_run["overrides"], "val_loss_shakespeare": base_run["val_loss"],
                                      "val_loss_python_before": zero["val_loss"]},
                             "seq_len": 64, "batch_size": 12, "steps": steps, "rows": quality}

    full_mem, lora_mem, _, qlora_mem = memory
    best = {name: min((r for r in quality if r["row"] == name), key=lambda r: r["val_loss"])
            for name in ("full", "LoRA", "LoRA+emb")}
    targets = {
        "qlora_peak_rss_over_full": (qlora_mem["peak_rss_mb"] / full_mem["peak_rss_mb"], 0.4),
        "qlora_rss_at_step_over_full": (qlora_mem["rss_at_step_mb"] / full_mem["rss_at_step_mb"], 0.4),
        "qlora_state_plus_model_over_full": ((qlora_mem["state_mb"] + qlora_mem["model_mb"] - qlora_mem["weights_mb"])
                                             / full_mem["state_mb"], 0.4),
        "lora_ckpt_over_full": (lora_mem["ckpt_bytes"] / full_mem["ckpt_bytes"], 0.05),
        "lora_val_loss_over_full": (best["LoRA"]["val_loss"] / best["full"]["val_loss"], 1.03),
        "lora_embeddings_val_loss_over_full": (best["LoRA+emb"]["val_loss"] / best["full"]["val_loss"], 1.05),
    }
    report["targets"] = {k: {"measured": round(v, 4), "target_at_most": t, "met": v <= t}
                         for k, (v, t) in targets.items()}
    print("\ntargets (issues 22, 32):")
    for k, v in report["targets"].items():
        print(f"  {k:34} {v['measured']:.3f} (at most {v['target_at_most']}): {'met' if v['met'] else 'NOT met'}")
    report["load_after"], report["wall_s"] = load(), round(time.perf_counter() - started)
    print(f"load average before {load_before}, after {report['load_after']}; {report['wall_s']} s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
