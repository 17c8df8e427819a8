"""data=chat: packed rows (no attention across conversations) against padded batches, on a small model.

    python bench/chat.py --out bench/results/chat.json      # = python bench/run.py chat

Every row is a real `python train.py init_from=<base> data=chat ...` run. The base: a Transformer of 4 layers x 256
(4 heads, context 512) with random weights and a byte-level BPE of 4096 tokens trained on the embedded Shakespeare,
saved as an lmkit folder: it has no chat template, so lmkit's default renders the conversations (the weights' values
do not change the speed). The data: 2,000 synthetic conversations, words drawn from the same corpus, lengths shaped
like instruction data (1 to 3 exchanges, 60/30/10%; a system message in 30% of them; user messages ~25 words,
replies ~90 words, both log-normal with a long tail), `data.seq_len=512`.

Rows:
- packed: `data.packing=true`, 8 rows of 513 tokens a step (best-fit packing; each conversation attends to itself);
- padded: `data.packing=false`, 8 conversations a step, each batch padded to its longest;
- padded, same tokens: `data.packing=false` with as many conversations a step as a packed step holds on average.
Per row: tokens/s (tokens that are not padding, lmkit's Throughput callback over the training steps), the training
rows' fill (tokens that are not padding, over all: `chat_packing_efficiency`), the masked fraction, and the val loss.

The end-to-end rows run one after the other, so a change of the machine's load between them shows in their tokens/s.
So the same comparison runs again in one process with the modes taking turns step by step: forward + backward of
the base on each mode's next training batch (`--rounds`, after one of warm-up), tokens that are not padding per
second. And on each packed batch, the document mask's cost (`documents=`: a boolean mask for
`scaled_dot_product_attention`) against plain causal attention (is_causal, attending across conversations): median
step times.
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
QUIET = ["trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "callbacks.text_sampler=null", "callbacks.preemption=null", "logger=none", "callbacks.model_checkpoint=null"]
MODEL = dict(kind="transformer", n_layer=4, n_head=4, n_embd=256, max_seq_len=512, dropout=0.0)
SEQ, BATCH, CONVERSATIONS = 512, 8, 2000


def conversations(words: list[str], n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def text(median: float, sigma: float, low: int, high: int) -> str:
        k = int(np.clip(rng.lognormal(np.log(median), sigma), low, high))
        start = int(rng.integers(0, len(words) - k))
        return " ".join(words[start:start + k])

    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": text(10, 0.3, 3, 30)}] if rng.random() < 0.3 else []
        for _ in range(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))):
            messages += [{"role": "user", "content": text(25, 0.8, 3, 150)},
                         {"role": "assistant", "content": text(90, 0.7, 5, 220)}]
        out.append({"messages": messages})
    return out


def train(run_dir: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *QUIET, *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run_dir / "stderr.txt", "w") as err:
        code = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{(run_dir / 'stderr.txt').read_text()[-3000:]}")
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"overrides": overrides, "tokens_per_s": round(m["tokens_per_s"]), "fill": m["chat_packing_efficiency"],
            "padding_waste": round(1 - m["chat_packing_efficiency"], 4), "masked_fraction": m["chat_masked_fraction"],
            "val_loss": round(m["val_loss"], 4), "process_s": round(time.perf_counter() - started, 1)}


def step_cost(base: Path, data: Path, cache: Path, matched: int, rounds: int) -> dict:
    """Forward + backward of the base, training batch by training batch, the modes taking turns step by step (so a
    change of the machine's load touches each alike): tokens that are not padding per second; and, on the packed
    batches, the document mask against plain causal attention (attending across conversations)."""
    import lmkit
    from lmkit.data.chat_datamodule import ChatDataModule

    model = lmkit.load(base)
    backbone = model.backbone.train()

    def stream(packing: bool, batch_size: int):
        dm = ChatDataModule(source="chat", path=str(data), seq_len=SEQ, batch_size=batch_size,
                            eval_batch_size=batch_size, val_windows=8, test_windows=8, split=[0.9, 0.05, 0.05],
                            tokenizer={"kind": "json", "json": model.tokenizer.to_json()}, cache_dir=str(cache),
                            seed=0, packing=packing, model_tokens=model.record.tokens)
        dm.prepare_data()
        return iter(dm.train_dataloader())

    def step(batch, documents) -> float:
        started = time.perf_counter()
        logits, _ = backbone(batch.inputs, documents=documents)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten()).backward()
        backbone.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    modes = {"packed": stream(True, BATCH), "padded": stream(False, BATCH),
             "padded_same_tokens": stream(False, matched)}
    seconds = {name: 0.0 for name in [*modes, "packed_causal"]}
    tokens = dict.fromkeys(seconds, 0)
    mask_s, causal_s = [], []
    for i in range(rounds + 1):
        for name, batches in modes.items():
            batch = next(batches)
            took = step(batch, batch.documents)
            if name == "packed":
                causal = step(batch, None)
                if i:
                    mask_s.append(took)
                    causal_s.append(causal)
            if i:  # (the first round warms up)
                seconds[name] += took
                tokens[name] += batch.tokens
    out = {f"{name}_tokens_per_s": round(tokens[name] / seconds[name]) for name in modes}
    out.update(document_mask_s=round(float(np.median(mask_s)), 4), causal_s=round(float(np.median(causal_s)), 4))
    out["mask_over_causal"] = round(out["document_mask_s"] / out["causal_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="training steps of each end-to-end row")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the step-by-step comparison")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from lmkit.backbones import build_backbone
    from lmkit.data.shakespeare import shakespeare_text
    from lmkit.data.tokenizer import BPETokenizer
    from lmkit.export import save
    from lmkit.inference import InferenceModel
    from lmkit.record import ModelRecord

    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU used, torch {torch.__version__}",
                    "command": "python bench/run.py chat", "load_before": [round(x, 2) for x in os.getloadavg()],
                    "model": MODEL, "seq_len": SEQ, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = shakespeare_text()
        tokenizer = BPETokenizer.train([corpus[:2_000_000]], vocab_size=4096)
        torch.manual_seed(0)
        record = ModelRecord.from_settings(MODEL, tokenizer.vocab_size, tokenizer="bpe",
                                           tokens={"eos_token_ids": [tokenizer.end_of_text_id]})
        save(InferenceModel(build_backbone(record.backbone).eval(), tokenizer, record), work / "base")
        data = work / "chats.jsonl"
        data.write_text("".join(json.dumps(c) + "\n" for c in conversations(corpus.split(), CONVERSATIONS)))
        common = [f"init_from={work / 'base'}", "data=chat", f"data.path={data}", f"data.seq_len={SEQ}",
                  f"paths.cache_dir={work / 'cache'}", f"trainer.max_steps={args.steps}",
                  f"trainer.val_check_interval={args.steps}", "data.val_windows=16", "data.test_windows=16",
                  "optim.lr=1e-3", "optim.warmup_steps=5"]
        rows = {}
        rows["packed"] = train(work / "packed", [*common, "data.packing=true", f"data.batch_size={BATCH}"])
        print(json.dumps({"packed": rows["packed"]}), flush=True)
        rows["padded"] = train(work / "padded", [*common, "data.packing=false", f"data.batch_size={BATCH}"])
        print(json.dumps({"padded": rows["padded"]}), flush=True)
        # as many conversations a step as a packed step holds: the padded run's rows hold fill x (its batch's longest)
        per_row = _mean_tokens(work / "cache")
        matched = max(BATCH, round(BATCH * (SEQ + 1) * rows["packed"]["fill"] / per_row))
        rows["padded_same_tokens"] = train(work / "padded_same", [*common, "data.packing=false",
                                                                  f"data.batch_size={matched}"])
        print(json.dumps({"padded_same_tokens": rows["padded_same_tokens"]}), flush=True)
        report["mean_conversation_tokens"] = round(per_row, 1)
        report["rows"] = rows
        report["steps_interleaved"] = step_cost(work / "base", data, work / "cache", matched, args.rounds)
        print(json.dumps({"steps_interleaved": report["steps_interleaved"]}), flush=True)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def _mean_tokens(cache: Path) -> float:
    """The mean length, in tokens (cut at seq_len + 1), of the rendered conversations in the chat cache."""
    (folder,) = [p for p in (cache / "chat").iterdir() if p.is_dir() and not p.name.startswith(".")]
    with np.load(folder / "docs.npz") as docs:
        return float(np.minimum(np.diff(docs["starts"]), SEQ + 1).mean())


if __name__ == "__main__":
    main()
