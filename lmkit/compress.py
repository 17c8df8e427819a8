"""Compress a model with an ordered list of plugins, measure each step, export the result with its report.

    compress_and_export(model, {"prune": {...}, "int8": {...}}, out, context)

Before the first step and after each one: bytes of model.safetensors (really written), parameter
count, non-zeros, sparsity, perplexity on the model's own test split, and generation tokens/s at
batch 1. The artifact gets `report.json`, `report.png` (size against perplexity) and a table in
its README.md, all in the same atomic write as the model.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkit.errors import LmkitError
from lmkit.evaluate import evaluate, own_datamodule
from lmkit.export import save, write_tensors
from lmkit.files import check_free
from lmkit.generate import stream_tokens
from lmkit.inference import InferenceModel
from lmkit.plugins import CompressContext, Teacher, check_chain, recipe
from lmkit.tensors import count_parameters, unique_tensors

log = logging.getLogger("lmkit")


def weights_digest(model: InferenceModel) -> str:
    """A digest of every weight: two reports compare only if they compressed the same model."""
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(unique_tensors(model.backbone).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stored_bytes(model: InferenceModel) -> int:
    """Size of model.safetensors as `lmkit.export.save` would write it now."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        write_tensors(model.backbone, path, model.record.compression)
        return path.stat().st_size


@torch.no_grad()
def generation_speed(model: InferenceModel, new_tokens: int, repeats: int = 3) -> float:
    """Tokens/s generating `new_tokens` at batch 1 from a one-token prompt: the best of `repeats`."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    generator = torch.Generator(device=model.device).manual_seed(0)
    for _ in stream_tokens(model.backbone, ids, max_new_tokens=4, temperature=1.0, generator=generator):  # warm-up
        pass
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in stream_tokens(model.backbone, ids, max_new_tokens=new_tokens, temperature=1.0, generator=generator):
            pass
        best = min(best, time.perf_counter() - started)
    return new_tokens / best


def measure(model: InferenceModel, tokens: Any, *, seq_len: int, batch_size: int, windows: int | None,
            gen_tokens: int) -> dict[str, Any]:
    params, nonzero = count_parameters(model.backbone)
    result = evaluate(model, tokens, seq_len=seq_len, batch_size=batch_size, max_windows=windows) \
        if tokens is not None else {}
    return {"bytes": stored_bytes(model), "parameters": params, "nonzero": nonzero,
            "sparsity": round(1 - nonzero / params, 4), "loss": result.get("loss"),
            "perplexity": result.get("perplexity"),
            "tokens_per_s": round(generation_speed(model, gen_tokens), 1) if gen_tokens else None,
            "eval_tokens_per_s": round(result["tokens_per_s"]) if result.get("tokens_per_s") else None}


def compress(model: InferenceModel, spec: dict[str, dict[str, Any] | None], context: CompressContext,
             *, eval_windows: int | None = None, gen_tokens: int = 100,
             baseline: dict[str, Any] | None = None) -> tuple[InferenceModel, dict[str, Any]]:
    """Apply the plugins of `spec` in order to a copy of `model`; returns it and the report.

    `baseline`: the report's `before` of an earlier compress of this same model with the same measure
    options, reused instead of measured again (a benchmark compressing one model many ways)."""
    done = [r["plugin"] for r in model.record.compression]
    plugins = recipe(spec)
    check_chain([p.name for p in plugins], already=done)
    has_corpus = bool(model.record.data) and model.has_tokenizer
    needs = [(p.name, p.needs_corpus()) for p in plugins if p.needs_corpus()]
    if needs and not has_corpus:
        name, (why, fix) = needs[0]
        raise LmkitError(f"compression: {name} {why} on the model's training corpus, and this model records none "
                         f"(or no tokenizer): set " + " ".join(f"compression.{name}.{kv}" for kv in fix.split()))
    for i, plugin in enumerate(plugins):  # before minutes of measuring and fine-tuning
        plugin.check_model(model)
        plugin.check_after([*done, *(p.name for p in plugins[:i])])
    # float32 in, so that what is measured is what the artifact (float32 plus its plugins' dtypes) holds
    model = copy.deepcopy(model).float().eval()
    dense_shape = model.record.to_dict()["model"]
    fingerprint = weights_digest(model)
    tokens, seq_len, batch_size = None, 0, 1
    if has_corpus:
        datamodule = own_datamodule(model, context.cache_dir, seed=context.seed)
        datamodule.prepare_data()
        tokens, seq_len, batch_size = datamodule.cache.split("test"), datamodule.seq_len, datamodule.eval_batch_size
        eval_windows = eval_windows or datamodule.test_windows
    else:
        log.warning("the model records no training corpus or no tokenizer: the report has no perplexity")
    measure_now = lambda: measure(model, tokens, seq_len=seq_len, batch_size=batch_size,  # noqa: E731
                                  windows=eval_windows, gen_tokens=gen_tokens)
    before = baseline if baseline is not None else measure_now()
    steps = []
    for plugin in plugins:
        context.log(f"compression: {plugin.name} {json.dumps(plugin.settings)}")
        record = {"plugin": plugin.name, "settings": plugin.settings, **plugin.apply(model, context)}
        model.record = model.record.replace(compression=[*model.record.compression, record])
        steps.append({**record, "summary": plugin.describe(), **measure_now()})
    report = {"model": dense_shape, "dense_digest": fingerprint, "compressed_before": done,
              "source": model.record.source,
              "data": model.record.data, "recipe": [p.name for p in plugins],
              "before": before, "steps": steps, "after": steps[-1] if steps else before}
    report["after_vs_before"] = ratios(before, report["after"])
    return model, report


def ratios(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    def ratio(key: str) -> float | None:
        return round(after[key] / before[key], 4) if after.get(key) and before.get(key) else None

    return {"bytes": ratio("bytes"), "parameters": ratio("parameters"), "perplexity": ratio("perplexity"),
            "tokens_per_s": ratio("tokens_per_s")}


def training_context(*, cache_dir: str, seed: int, log: Any = print, train_device: str | None = None) -> CompressContext:
    """A CompressContext whose fine-tunes run lmkit's training loop (Lightning) on the model's own corpus,
    on `train_device` (None: where the model is)."""

    def finetune(model: InferenceModel, *, steps: int, lr: float | None = None, callbacks: list | None = None,
                 teacher: Teacher | None = None) -> None:
        from lmkit.finetune import finetune as lightning_finetune

        lightning_finetune(model, steps=steps, lr=lr, callbacks=callbacks, teacher=teacher, cache_dir=cache_dir,
                           seed=seed, device=train_device)

    def calibration(model: InferenceModel, windows: int) -> torch.Tensor:
        return calibration_windows(model, windows, cache_dir=cache_dir, seed=seed)

    return CompressContext(cache_dir=cache_dir, seed=seed, log=log, finetune=finetune, calibration=calibration)


def calibration_windows(model: InferenceModel, windows: int, *, cache_dir: str, seed: int) -> torch.Tensor:
    """`windows` random windows (windows, seq_len) of token ids from the model's own training split: what
    activation-aware pruning measures inputs on (never the test split its report is measured on)."""
    datamodule = own_datamodule(model, cache_dir, seed=seed)
    datamodule.prepare_data()
    tokens, seq_len = datamodule.cache.split("train"), datamodule.seq_len
    if model.backbone.max_seq_len:
        seq_len = min(seq_len, model.backbone.max_seq_len)
    if len(tokens) <= seq_len:
        raise LmkitError(f"the training split has {len(tokens)} tokens, too few for a calibration window of {seq_len}")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seq_len, size=windows)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts]))


def compress_and_export(model: InferenceModel, spec: dict[str, dict[str, Any] | None], out: str | Path,
                        context: CompressContext, overwrite: bool = False,
                        **measure_options: Any) -> tuple[InferenceModel, dict[str, Any]]:
    """Compress, then write the artifact, report.json, report.png and the README table atomically."""
    check_free(Path(out), overwrite)  # before minutes of fine-tuning, not after
    compressed, report = compress(model, spec, context, **measure_options)
    files = {"report.json": (json.dumps(report, indent=2) + "\n").encode(), "report.png": report_png(report)}
    save(compressed, out, overwrite=overwrite, files=files, readme_extra=report_markdown(report))
    return compressed, report


def rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, measures) for the model as given and after each step."""
    out, names = [("dense" if not report.get("compressed_before") else "before", report["before"])], []
    for step in report["steps"]:
        names.append(step["plugin"] + (f" ({step['summary']})" if step.get("summary") else ""))
        out.append(("+".join(names), step))
    return out


def table(rows_: list[tuple[str, dict[str, Any]]], base: dict[str, Any]) -> str:
    """A Markdown table of size, sparsity, perplexity and speed, ratios against `base`."""
    lines = ["| model | bytes | x dense | params | sparsity | perplexity | change | generate tok/s | x dense "
             "| forward tok/s | x dense |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def speed(m: dict[str, Any], key: str) -> str:
        if not m.get(key):
            return "- | -"
        return f"{m[key]:,.0f} | " + (f"{m[key] / base[key]:.2f}" if base.get(key) else "-")

    for label, m in rows_:
        ppl = m.get("perplexity")
        change = f"{100 * (ppl / base['perplexity'] - 1):+.2f}%" if ppl and base.get("perplexity") else "-"
        lines.append(f"| {label} | {m['bytes']:,} | {m['bytes'] / base['bytes']:.3f} | {m['parameters']:,} | "
                     f"{m['sparsity']:.1%} | {f'{ppl:.4f}' if ppl else '-'} | {change} | "
                     f"{speed(m, 'tokens_per_s')} | {speed(m, 'eval_tokens_per_s')} |")
    return "\n".join(lines) + "\n"


def report_markdown(report: dict[str, Any]) -> str:
    return ("\n## Compression\n\nRecipe: " + " -> ".join(report["recipe"]) + " (settings in config.json). "
            "Perplexity on the training corpus' test split; tokens/s on the export machine, generating at "
            "batch 1 and reading the test split (forward).\n\n" + table(rows(report), report["before"]))


def plot(points: list[tuple[str, dict[str, Any]]], title: str, frontier: bool = False) -> bytes:
    """A PNG of perplexity against size, one labelled point per model (and the Pareto front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    xs = [m["bytes"] / 1e6 for _, m in points]
    ys = [m.get("perplexity") or math.nan for _, m in points]
    ax.scatter(xs, ys)
    for (label, _), x, y in zip(points, xs, ys):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if frontier:
        front = pareto(points)
        ax.plot([m["bytes"] / 1e6 for _, m in front], [m["perplexity"] for _, m in front], "--", alpha=0.6)
    ax.set_xlabel("model.safetensors (MB)")
    ax.set_ylabel("test perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def report_png(report: dict[str, Any]) -> bytes:
    return plot(rows(report), f"{report['model']['kind']}: " + " -> ".join(report["recipe"]))


def pareto(points: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """The points no other point beats on both size and perplexity, smallest first."""
    scored = sorted((p for p in points if p[1].get("perplexity")), key=lambda p: (p[1]["bytes"], p[1]["perplexity"]))
    front, best = [], math.inf
    for point in scored:
        if point[1]["perplexity"] < best:
            front.append(point)
            best = point[1]["perplexity"]
    return front


def gather(dirs: list[str | Path]) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """The rows of several exports of the same model: its dense baseline once, then each export."""
    reports = []
    for d in dirs:
        path = Path(d) / "report.json"
        if not path.is_file():
            raise LmkitError(f"{d} has no report.json (export it with compression=...)")
        try:
            report = json.loads(path.read_text())
            if not isinstance(report, dict) or any(k not in report for k in ("recipe", "before", "after")) or \
                    any("bytes" not in report[k] or "parameters" not in report[k] for k in ("before", "after")):
                raise ValueError("it lacks recipe, before or after")
        except ValueError as e:
            raise LmkitError(f"{path} is not an lmkit compression report ({e})") from None
        reports.append((Path(d), report))
    first_dir, first = reports[0]
    for d, r in reports[1:]:
        if r.get("dense_digest") != first.get("dense_digest"):
            raise LmkitError(f"{d} and {first_dir} were compressed from different models: a report compares "
                             "recipes on one model")
    labels = ["+".join(r["recipe"]) for _, r in reports]
    labels = [label if labels.count(label) == 1 else f"{label} ({d})" for label, (d, _) in zip(labels, reports)]
    points = [("dense", first["before"])] + [(label, r["after"]) for label, (_, r) in zip(labels, reports)]
    return points, first["before"]
