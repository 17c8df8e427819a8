"""What bench/gpu.py and tests/test_gpu.py hang into a `python train.py` run: Lightning callbacks, named by Hydra as
`+callbacks.NAME._target_=bench.gpu_probe.CLASS` (train.py runs from the repository root, so `bench` imports).

    SteadyClock   tokens/s between two training steps (a device sync at each end, none in between), the peak
                  GPU memory, the model's FLOPs per token; optionally torch.profiler over a few steps after it
    RecordRun     what the run really used: process-group backend, parameter device and dtype, precision,
                  optimizer and where its state lives

Both write one JSON file (`out`), on global rank zero. Shared with bench/throughput.py's raw loop:
`flops_per_token` (nanoGPT's estimate) and `sync_counts` (host syncs in a profiler's table).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

# what a host sync looks like in a profiler's table: the op that reads a device scalar (`.item()`, `.tolist()`, a
# tensor in an `if`), and the CUDA runtime calls that wait for the device
SYNC_EVENTS = ("aten::_local_scalar_dense", "aten::item", "cudaStreamSynchronize", "cudaDeviceSynchronize",
               "cudaEventSynchronize", "cudaMemcpy")


def flops_per_token(backbone: torch.nn.Module, seq_len: int) -> float | None:
    """Training FLOPs per token, nanoGPT's estimate: 6N + 12 L d T, N the parameters without the learned position
    embedding (a tied head counted once), L layers, d the width, T the sequence length. A recurrent model: 6N (each
    weight one multiply-add per token forward, two backward)."""
    config = getattr(backbone, "config", None)
    seen, n = set(), 0
    for name, p in backbone.named_parameters():
        if id(p) in seen or name.endswith("wpe.weight"):
            continue
        seen.add(id(p))
        n += p.numel()
    if config is None or getattr(config, "n_head", None) is None:
        return 6.0 * n
    return 6.0 * n + 12.0 * config.n_layer * config.n_embd * seq_len


def sync_counts(events: Any) -> dict[str, int]:
    """Calls of each host-sync event in a profiler's `key_averages()`."""
    counts = {}
    for event in events:
        if event.key.startswith(SYNC_EVENTS):
            counts[event.key] = counts.get(event.key, 0) + int(event.count)
    return counts


def host_syncs(counts: dict[str, int]) -> int:
    """The waits themselves: the CUDA runtime's synchronize calls on a GPU (an `.item()` shows as
    `aten::item` -> `aten::_local_scalar_dense` -> `cudaMemcpyAsync` + `cudaStreamSynchronize`: one wait, four
    events); on the CPU, the scalar reads that would wait on a GPU."""
    cuda = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
    waits = [k for k in counts if k.startswith(cuda)]
    return sum(counts[k] for k in waits) if waits else counts.get("aten::_local_scalar_dense", 0)


def profile_table(prof: Any, steps: int, title: str) -> str:
    events = prof.key_averages()
    cuda = torch.cuda.is_available()
    by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    counts = sync_counts(events)
    lines = [f"# {title}: {steps} steps",
             f"# host syncs: {host_syncs(counts)} in {steps} steps; the events behind them: {json.dumps(counts)}", "",
             events.table(sort_by="self_cpu_time_total", row_limit=30)]
    if cuda:
        lines += ["", events.table(sort_by=by, row_limit=20)]
    return "\n".join(lines) + "\n"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_memory_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


class SteadyClock(L.Callback):
    """Tokens/s from the start of step `start` to the end of step `end` (None: trainer.max_steps), both sides
    synchronised with the device, nothing in between; then, with `profile_steps`, torch.profiler over that many
    more steps (the run must go on that far), its table written to `profile_out`."""

    def __init__(self, out: str, start: int = 100, end: int | None = None, profile_steps: int = 0,
                 profile_out: str | None = None) -> None:
        self.out, self.start, self.end = out, start, end
        self.profile_steps, self.profile_out = profile_steps, profile_out
        self._t0: float | None = None
        self._tokens = 0
        self._prof = None
        self._done = False

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._t0 is None and trainer.global_step == self.start:
            _sync()
            self._t0 = time.perf_counter()
        end = self.end or trainer.max_steps
        if self._done and self.profile_steps and self._prof is None and trainer.global_step == end:
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
            self._prof.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        end = self.end or trainer.max_steps
        if self._t0 is not None and not self._done:
            self._tokens += batch[0].numel()
            if trainer.global_step >= end:
                _sync()
                self._finish(trainer, module, time.perf_counter() - self._t0, outputs)
        if self._prof is not None and trainer.global_step >= end + self.profile_steps:
            self._prof.__exit__(None, None, None)
            if trainer.is_global_zero:
                if self.profile_out:
                    Path(self.profile_out).write_text(profile_table(self._prof, self.profile_steps,
                                                                    "Lightning training steps after the timed window"))
                counts = sync_counts(self._prof.key_averages())
                figures = json.loads(Path(self.out).read_text())
                write_json(self.out, {**figures, "profiled_steps": self.profile_steps, "sync_events": counts,
                                      "host_syncs_per_step": round(host_syncs(counts) / self.profile_steps, 2)})
            self._prof = None
            self.profile_steps = 0

    def _finish(self, trainer: L.Trainer, module: L.LightningModule, seconds: float, outputs: Any) -> None:
        self._done = True
        if not trainer.is_global_zero:
            return
        seq_len = trainer.datamodule.seq_len if trainer.datamodule is not None else None
        backbone = getattr(module, "backbone", module)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        write_json(self.out, {
            "side": "lightning", "device": device_name(), "steps": (self.end or trainer.max_steps) - self.start,
            "from_step": self.start, "seconds": round(seconds, 4), "tokens": self._tokens,
            "tokens_per_s": self._tokens / seconds if seconds > 0 else None,
            "flops_per_token": flops_per_token(backbone, seq_len) if seq_len else None,
            "peak_gib": peak_memory_gib(), "precision": str(trainer.precision),
            "loss": float(loss.detach()) if loss is not None else None})


class RecordRun(L.Callback):
    """What the run used, read at the end of training: for the tests' assertions on the device actually used."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        dist = torch.distributed
        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
        param = next(module.parameters())
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        states = [t for s in (optimizer.state.values() if optimizer else []) for t in s.values()
                  if isinstance(t, torch.Tensor) and t.dim() > 0]
        write_json(self.out, {
            "backend": backend, "strategy": type(trainer.strategy).__name__, "precision": str(trainer.precision),
            "param_device": str(param.device), "param_type": type(param).__name__, "param_dtype": str(param.dtype),
            "optimizer": type(optimizer).__name__ if optimizer else None,
            "optimizer_state_devices": sorted({str(t.device) for t in states}),
            "optimizer_state_dtypes": sorted({str(t.dtype) for t in states}),
            "compiled": bool(getattr(getattr(module, "backbone", None), "_compiled_call_impl", None)),
            "peak_gib": peak_memory_gib(), "device": device_name()})
