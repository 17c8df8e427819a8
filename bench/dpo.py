"""finetune.objective=dpo: the reference model's log-probabilities precomputed once against computed on the fly.

    python bench/dpo.py --out bench/results/dpo.json      # = python bench/run.py dpo

The base: a Transformer of 4 layers x 256 (4 heads, context 256) with random weights and a byte-level BPE of 4096
tokens trained on the embedded Shakespeare, saved as an lmkit folder (lmkit's default chat template renders the
pairs; the weights' values do not change the cost). The data: 600 synthetic preference pairs, words drawn from the
same corpus (prompts ~25 words, responses ~50, log-normal), `data.seq_len=256`, 8 pairs (16 rows) a step.

End to end, each a real `python train.py init_from=<base> data=preference finetune.objective=dpo ...` run of
`--steps` steps: finetune=full and finetune=lora, each with finetune.reference=precomputed and live. Per row: the
seconds the precomputation took (its log line), training tokens/s (lmkit's Throughput callback: the training steps,
with evaluation left out), the process's wall time and its peak RSS (getrusage of the child).

The end-to-end rows run one after the other, so a change of the machine's load between them shows in their timings.
So the costs that decide run again in one process, taking turns batch by batch (`--rounds`, after one of warm-up):
a training step with the reference's log-probabilities looked up (forward, backward, AdamW), the live reference's
extra forward on the same batch (finetune=full: a frozen copy; lora: the base with its adapters off), and the
precomputation's forward of an evaluation batch of the same pairs; medians. From them: the precomputation's seconds
per pair, the live reference's seconds per pair per visit, and how many epochs of training make them equal.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
QUIET = ["trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "callbacks.text_sampler=null", "callbacks.preemption=null", "logger=none", "callbacks.model_checkpoint=null"]
MODEL = dict(kind="transformer", n_layer=4, n_head=4, n_embd=256, max_seq_len=256, dropout=0.0)
SEQ, BATCH, PAIRS = 256, 8, 600
# a child's peak resident memory: getrusage of the children of a process that started only it
PEAK = ("import resource, subprocess, sys\ncode = subprocess.run(sys.argv[1:]).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\nsys.exit(code)")


def pairs(words: list[str], n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def text(median: float, sigma: float, low: int, high: int) -> str:
        k = int(np.clip(rng.lognormal(np.log(median), sigma), low, high))
        start = int(rng.integers(0, len(words) - k))
        return " ".join(words[start:start + k])

    return [{"prompt": text(25, 0.6, 3, 60), "chosen": text(50, 0.4, 5, 100), "rejected": text(50, 0.4, 5, 100)}
            for _ in range(n)]


def train(run_dir: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-c", PEAK, sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *QUIET,
           *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run_dir / "stderr.txt", "w") as err:
        result = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{(run_dir / 'stderr.txt').read_text()[-3000:]}")
    m = json.loads((run_dir / "metrics.json").read_text())
    found = re.search(r"computed in ([\d.]+) s", result.stdout + (run_dir / "stderr.txt").read_text())
    return {"overrides": overrides[-2:], "precompute_s": float(found.group(1)) if found else 0.0,
            "tokens_per_s": round(m["tokens_per_s"]), "process_s": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(int(result.stdout.split()[-1]) / 1024), "val_loss": round(m["val_loss"], 4)}


def interleaved(base: Path, data: Path, cache: Path, rounds: int) -> dict:
    """Per finetune kind, medians over `rounds` batches taken in turn: a DPO training step with precomputed reference
    scores, the live reference's forward of the same batch, and the precomputation's forward of the same pairs."""
    import lmkit
    from lmkit.data.preference import PreferenceDataModule
    from lmkit.lora import LoRASettings, adapt
    from lmkit.preference import adapters_off, dpo_loss, sequence_logps

    model = lmkit.load(base)
    dm = PreferenceDataModule(source="preference", path=str(data), seq_len=SEQ, batch_size=BATCH,
                              eval_batch_size=BATCH, val_windows=None, test_windows=None, split=[0.9, 0.05, 0.05],
                              tokenizer={"kind": "json", "json": model.tokenizer.to_json()}, cache_dir=str(cache),
                              seed=0, model_tokens=model.record.tokens)
    dm.prepare_data()
    batches = iter(dm.train_dataloader())
    full = model.backbone.train()
    frozen = copy.deepcopy(full).eval().requires_grad_(False)
    lora = copy.deepcopy(full)
    adapt(lora, LoRASettings())
    lora.train()
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                  for name, m in (("full", full), ("lora", lora))}
    @torch.no_grad()
    def score_reference(name: str, backbone: torch.nn.Module, batch) -> None:
        """The reference's log-probabilities of a batch: the frozen copy (full), the base with adapters off (LoRA)."""
        if name == "full":
            sequence_logps(frozen, batch.inputs, batch.targets)
            return
        backbone.eval()
        with adapters_off(backbone):
            sequence_logps(backbone, batch.inputs, batch.targets)
        backbone.train()

    times: dict[str, list[float]] = {f"{k}_{what}": [] for k in ("full", "lora") for what in ("step", "live", "pre")}
    pairs_seen = 0
    for i in range(rounds + 1):
        batch = next(batches)
        n = len(batch.pairs)
        for name, backbone in (("full", full), ("lora", lora)):
            started = time.perf_counter()
            policy = sequence_logps(backbone, batch.inputs, batch.targets)
            reference = torch.zeros_like(policy)  # (a lookup: its cost is nothing beside the step's)
            losses, _ = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], beta=0.1)
            losses.mean().backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            step = time.perf_counter() - started
            started = time.perf_counter()
            score_reference(name, backbone, batch)  # the live reference: once per pair per visit
            live = time.perf_counter() - started
            started = time.perf_counter()
            score_reference(name, backbone, batch)  # the precomputation: the same forward, once per pair in all
            pre = time.perf_counter() - started
            if i:  # (the first round warms up)
                for what, took in (("step", step), ("live", live), ("pre", pre)):
                    times[f"{name}_{what}"].append(took)
        pairs_seen += n if i else 0
    out = {}
    for name in ("full", "lora"):
        step, live, pre = (float(np.median(times[f"{name}_{w}"])) for w in ("step", "live", "pre"))
        out[name] = {"step_s": round(step, 4), "live_reference_s": round(live, 4),
                     "live_over_step": round(live / step, 3), "precompute_s_per_pair": round(pre / BATCH, 5),
                     "live_s_per_pair_visit": round(live / BATCH, 5),
                     "breakeven_epochs": round(pre / live, 2)}
    params = sum(p.numel() for p in full.parameters())
    out["frozen_copy_mb"] = round(params * 4 / 2 ** 20, 1)  # what finetune=full's live reference holds: fp32 weights
    out["table_bytes_per_pair"] = 8  # what the precomputed one holds: two fp32 numbers a pair
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps of each end-to-end row (0: none)")
    parser.add_argument("--rounds", type=int, default=20, help="batches of the interleaved comparison")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from lmkit.backbones import build_backbone
    from lmkit.data.shakespeare import shakespeare_text
    from lmkit.data.tokenizer import BPETokenizer
    from lmkit.export import save
    from lmkit.inference import InferenceModel
    from lmkit.record import ModelRecord

    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU used, torch {torch.__version__}",
                    "command": "python bench/run.py dpo", "load_before": [round(x, 2) for x in os.getloadavg()],
                    "model": MODEL, "seq_len": SEQ, "batch_pairs": BATCH, "pairs": PAIRS, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = shakespeare_text()
        tokenizer = BPETokenizer.train([corpus[:2_000_000]], vocab_size=4096)
        torch.manual_seed(0)
        record = ModelRecord.from_settings(MODEL, tokenizer.vocab_size, tokenizer="bpe",
                                           tokens={"eos_token_ids": [tokenizer.end_of_text_id]})
        save(InferenceModel(build_backbone(record.backbone).eval(), tokenizer, record), work / "base")
        data = work / "pairs.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs(corpus.split(), PAIRS)))
        common = [f"init_from={work / 'base'}", "data=preference", f"data.path={data}", f"data.seq_len={SEQ}",
                  f"data.batch_size={BATCH}", f"data.eval_batch_size={BATCH}", f"paths.cache_dir={work / 'cache'}",
                  f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
                  "data.val_windows=16", "data.test_windows=16", "optim.lr=1e-4", "optim.warmup_steps=5",
                  "finetune.objective=dpo"]
        rows = {}
        for kind in ("full", "lora") if args.steps else ():
            for reference in ("precomputed", "live"):
                name = f"{kind}_{reference}"
                rows[name] = train(work / name, [*common, f"finetune={kind}", f"finetune.reference={reference}"])
                print(json.dumps({name: rows[name]}), flush=True)
        report["rows"] = rows
        report["interleaved"] = interleaved(work / "base", data, work / "cache", args.rounds)
        print(json.dumps({"interleaved": report["interleaved"]}), flush=True)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
