"""nn.LSTM on the CPU in inference, with oneDNN (mkldnn) on and off: ms per call, by batch size.

    python bench/lstm_cpu.py [--out bench/results/lstm_cpu.json] [--rounds 15]

torch runs a float32 nn.LSTM through oneDNN (`aten::mkldnn_rnn_layer`) whenever
`torch.backends.mkldnn.enabled`, the default; at small batches that costs several times torch's own
kernel. This times the recurrent layer alone (`backbone.rnn`: the embedding and the head do not read
the flag) in eval mode under torch.no_grad, for a one-token step carrying a state (as generation does)
and 8- and 64-token prefills from no state, at the default LSTM shape and a bigger one. The two sides
alternate within each round (the order flips every round); each reports the median of the rounds (a
busy machine moves both alike) and the best (nearer what an idle machine gives). The last column is
what the backbone now picks (`LSTM.skips_onednn`: ONEDNN_OFF_MAX_BATCH / _TOKENS). It also
records the largest logit difference between the two paths. oneDNN's times also depend on what the
process freed before (bench/README.md, generate): compare the two sides within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmkit.backbones import backbone_config, build_backbone

VOCAB = 65  # the embedded corpus's characters
SHAPES = {"lstm 1x256": dict(n_layer=1, n_embd=256), "lstm 2x512": dict(n_layer=2, n_embd=512)}
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
LENGTHS = {"step": 1, "prefill 8": 8, "prefill 64": 64}


def ms_per_call(fn: Callable[[], object], onednn: bool, calls: int) -> float:
    torch.backends.mkldnn.enabled = onednn
    for _ in range(2):  # warm-up: oneDNN builds its primitive for this shape on the first call
        fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e3


@torch.no_grad()
def measure(rnn: torch.nn.Module, x: torch.Tensor, state: object, rounds: int) -> dict[bool, list[float]]:
    """ms per call with oneDNN on (True) and off (False), alternated `rounds` times."""
    def fn() -> object:
        return rnn(x, state)

    once = min(ms_per_call(fn, True, 1), ms_per_call(fn, False, 1))
    calls = max(1, min(100, round(10 / max(once, 1e-3))))  # about 10 ms of calls per timing
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for onednn in ((True, False) if r % 2 == 0 else (False, True)):
            times[onednn].append(ms_per_call(fn, onednn, calls))
    torch.backends.mkldnn.enabled = True
    return times


@torch.no_grad()
def logit_difference(backbone: torch.nn.Module, batch: int, steps: int = 16) -> float:
    """Largest |logit| difference between the paths over a 64-token prefill and `steps` one-token steps
    (the same tokens on both sides, so the paths cannot drift apart by picking different ones)."""
    ids = torch.randint(0, VOCAB, (batch, 64 + steps), generator=torch.Generator().manual_seed(0))

    def logits(onednn: bool) -> torch.Tensor:
        torch.backends.mkldnn.enabled = onednn
        head = backbone.head if backbone.proj is None else lambda out: backbone.head(backbone.proj(out))
        out, state = backbone.rnn(backbone.embedding(ids[:, :64]), None)
        seen = [head(out)]
        for t in range(64, 64 + steps):
            out, state = backbone.rnn(backbone.embedding(ids[:, t:t + 1]), state)
            seen.append(head(out))
        torch.backends.mkldnn.enabled = True
        return torch.cat(seen, dim=1)

    return (logits(True) - logits(False)).abs().max().item()


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages: how busy the two cores were around the run."""
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    load_before = loadavg()
    rows, differences = [], []
    print(f"{'model':<12} {'call':<11} {'batch':>5} {'oneDNN on ms':>13} {'off ms':>9} {'on / off':>9} "
          f"{'best on':>10} {'best off':>9} {'on / off':>9}  backbone")
    for name, options in SHAPES.items():
        torch.manual_seed(0)
        backbone = build_backbone(backbone_config("lstm", VOCAB, **options)).eval()
        width, layers = options["n_embd"], options["n_layer"]
        for call, length in LENGTHS.items():
            for batch in BATCHES:
                x = torch.randn(batch, length, width)
                state = None if length > 1 else (torch.randn(layers, batch, width), torch.randn(layers, batch, width))
                times = measure(backbone.rnn, x, state, args.rounds)
                with torch.no_grad():
                    chosen = "off" if backbone.skips_onednn(x) else "on"
                on, off = statistics.median(times[True]), statistics.median(times[False])
                best_on, best_off = min(times[True]), min(times[False])
                rows.append({"model": name, "call": call, "batch": batch, "tokens": length,
                             "onednn_ms": round(on, 4), "off_ms": round(off, 4), "on_over_off": round(on / off, 2),
                             "best_onednn_ms": round(best_on, 4), "best_off_ms": round(best_off, 4),
                             "best_on_over_off": round(best_on / best_off, 2), "backbone_takes": chosen})
                print(f"{name:<12} {call:<11} {batch:>5} {on:>13.3f} {off:>9.3f} {on / off:>9.2f}"
                      f" {best_on:>10.3f} {best_off:>9.3f} {best_on / best_off:>9.2f}  {chosen}", flush=True)
        for batch in (1, 128):
            diff = logit_difference(backbone, batch)
            differences.append({"model": name, "batch": batch, "max_abs_logit_difference": diff})
            print(f"{name}, batch {batch}: max |logit difference| over a 64-token prefill and 16 steps: {diff:.2e}")
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rounds": args.rounds, "load_average_before": load_before,
              "load_average_after": loadavg(), "rows": rows, "logit_differences": differences}
    print(f"load average before: {load_before}; after: {result['load_average_after']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
