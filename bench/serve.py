"""`lmkit serve` under load: requests/s, generated tokens/s and p50/p99 time to first token and total latency
at 1, 8 and 32 concurrent streaming clients, for the torch runtime and the onnx one.

    python bench/serve.py [--out bench/results/serve.json] [--seconds 10] [--max-tokens 128]

Each model is saved as an lmkit artifact (the default CPU shapes, random weights: speed does not depend
on what the weights learned), served by `lmkit serve` in a subprocess on 127.0.0.1, and driven by
closed-loop clients: each sends a streaming /v1/completions request, reads it to `data: [DONE]`, and
sends the next, for `--seconds`. The clients share the machine with the server (on 2 cores they take
a real part of it), so the figures are what one machine does serving itself. The onnx rows serve
`lmkit export format=onnx` of the same model, in float32 and with `compression=int8` (they need the onnx
extra). The run ends with the serving targets, each said met or not: at 32 clients at least 4x one
client's tokens/s and a first-token p99 under 1 s, for every row; onnx int8 at least torch's tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from lmkit.backbones import backbone_config, build_backbone
from lmkit.data.tokenizer import CharTokenizer
from lmkit.export import save
from lmkit.inference import InferenceModel
from lmkit.record import ModelRecord

CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # the embedded corpus' 65 characters
MODELS = {  # what `python train.py` and `model=transformer` train (conf/model, data.seq_len 64)
    "lstm 1x256": ("lstm", dict(n_layer=1, n_embd=256)),
    "transformer 4x128 (ctx 64)": ("transformer", dict(n_layer=4, n_head=4, n_embd=128, max_seq_len=64)),
}
CONCURRENCY = (1, 8, 32)
PROMPT = "ROMEO:\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir: Path, port: int, runtime: str) -> subprocess.Popen:
    lmkit = Path(sys.executable).parent / "lmkit"
    proc = subprocess.Popen([str(lmkit), "serve", f"model={model_dir}", f"port={port}", f"runtime={runtime}",
                             "name=bench"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:  # the server prints its URL once it answers
        if "lmkit serve: bench at" in line:
            return proc
    raise RuntimeError(f"lmkit serve exited with {proc.wait()}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the server's own process group: its workers too
        proc.wait()


async def one_request(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[float, float, int]:
    """Time to first token, total latency, completion tokens of one streaming request."""
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}}
    started, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if first is None and any(c["text"] for c in event["choices"]):
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return first - started, time.perf_counter() - started, tokens


async def load(port: int, clients: int, seconds: float, max_tokens: int) -> dict:
    url = f"http://127.0.0.1:{port}/v1/completions"
    results, failures = [], 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        await one_request(client, url, 8)  # warm-up
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()

        async def user() -> None:
            nonlocal failures
            while time.perf_counter() < deadline:
                try:
                    results.append(await one_request(client, url, max_tokens))
                except (httpx.HTTPError, RuntimeError):
                    failures += 1

        await asyncio.gather(*(user() for _ in range(clients)))
        wall = time.perf_counter() - started
    ttft = sorted(r[0] for r in results)
    latency = sorted(r[1] for r in results)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(results), "failures": failures, "wall_s": round(wall, 2),
            "requests_s": round(len(results) / wall, 2), "tokens_s": round(sum(r[2] for r in results) / wall, 1),
            "ttft_p50_ms": round(1000 * pct(ttft, 0.5), 1), "ttft_p99_ms": round(1000 * pct(ttft, 0.99), 1),
            "latency_p50_ms": round(1000 * pct(latency, 0.5), 1), "latency_p99_ms": round(1000 * pct(latency, 0.99), 1)}


def exports(model: InferenceModel, out: Path) -> dict[str, tuple[str, Path]]:
    """The model as each row serves it, {row: (runtime, folder)}: the lmkit artifact (torch) and, with the onnx
    extra, ONNX exports in float32 and int8 (onnxruntime's quantizer: the fastest CPU export)."""
    paths = {"torch": ("torch", save(model, out / "torch"))}
    try:
        from lmkit.deploy.onnx import export_onnx

        paths["onnx"] = ("onnx", Path(export_onnx(model, out / "onnx")))
        paths["onnx int8"] = ("onnx", Path(export_onnx(model, out / "onnx-int8", quantization=("int8", {}))))
    except Exception as e:  # the onnx extra is not installed, or the exporter refused
        print(f"(no onnx rows: {str(e).splitlines()[0] if str(e) else type(e).__name__})")
    return paths


def targets(rows: list[dict]) -> list[str]:
    """The serving targets (issue 24), each as a line that says whether this run met it."""
    def row(name: str, runtime: str, clients: int) -> dict | None:
        return next((r for r in rows if (r["model"], r["runtime"], r["clients"]) == (name, runtime, clients)), None)

    most, lines = max(CONCURRENCY), []
    for name, runtime in dict.fromkeys((r["model"], r["runtime"]) for r in rows):
        one, full = row(name, runtime, 1), row(name, runtime, most)
        if one and full:
            gain = full["tokens_s"] / one["tokens_s"]
            lines.append(f"{name}, {runtime}: {most} clients give {gain:.1f}x the tokens/s of one "
                         f"({'met' if gain >= 4 else 'NOT met'}: 4x); first token p99 {full['ttft_p99_ms']:.0f} ms "
                         f"({'met' if full['ttft_p99_ms'] < 1000 else 'NOT met'}: under 1 s)")
    for name in dict.fromkeys(r["model"] for r in rows):
        for clients in CONCURRENCY:
            fp32, int8 = row(name, "torch", clients), row(name, "onnx int8", clients)
            if fp32 and int8:
                ratio = int8["tokens_s"] / fp32["tokens_s"]
                lines.append(f"{name}, {clients} clients: onnx int8 gives {ratio:.2f}x torch fp32's tokens/s "
                             f"({'met' if ratio >= 1 else 'NOT met'}: at least 1x)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--only", choices=list(MODELS))
    args = parser.parse_args()
    rows, load_before = [], os.getloadavg()
    header = (f"{'model':<28} {'runtime':<9} {'clients':>7} {'req/s':>7} {'tok/s':>8} {'ttft p50':>9} {'p99':>7} "
              f"{'latency p50':>12} {'p99':>7} {'fail':>5}")
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kind, options) in MODELS.items():
            if args.only and name != args.only:
                continue
            torch.manual_seed(0)
            record = ModelRecord(backbone=backbone_config(kind, len(CHARS), **options), tokenizer="char")
            model = InferenceModel(build_backbone(record.backbone).eval(), CharTokenizer(CHARS), record)
            for label, (runtime, model_dir) in exports(model, Path(tmp) / kind).items():
                port = free_port()
                proc = start(model_dir, port, runtime)
                try:
                    for clients in CONCURRENCY:
                        row = {"model": name, "runtime": label,
                               **asyncio.run(load(port, clients, args.seconds, args.max_tokens))}
                        rows.append(row)
                        print(f"{name:<28} {label:<9} {clients:>7} {row['requests_s']:>7} {row['tokens_s']:>8} "
                              f"{row['ttft_p50_ms']:>8}m {row['ttft_p99_ms']:>6}m {row['latency_p50_ms']:>11}m "
                              f"{row['latency_p99_ms']:>6}m {row['failures']:>5}", flush=True)
                finally:
                    stop(proc)
    summary = targets(rows)
    print("\n".join(summary))
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "seconds": args.seconds, "max_tokens": args.max_tokens, "rows": rows,
              "targets": summary}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
