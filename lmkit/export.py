"""The lmkit artifact: a directory that rebuilds a model with torch, safetensors and tokenizers alone.

    config.json        format version, backbone kind and options, tokenizer kind, dtype, provenance,
                       and the compression steps applied (`compression`: plugin name, settings, layout)
    model.safetensors  every tensor (a tied head is stored once; compressed tensors as plugins pack them)
    tokenizer.json     when the model has a tokenizer
    report.json        what each compression step cost and bought (written by lmkit.compress)
    README.md          a model card

Never pickle, never a class path read from a file: loading a stranger's artifact cannot run code. Artifacts are written to a temporary
directory and renamed into place, so an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmkit.backbones import build_backbone
from lmkit.checkpoint import read_checkpoint
from lmkit.sharded_checkpoint import is_sharded_checkpoint
from lmkit.data.tokenizer import tokenizer_from_json
from lmkit.errors import LmkitError, first_line
from lmkit.files import atomic_directory
from lmkit.inference import InferenceModel
from lmkit.plugins import plugin_class
from lmkit.lora import LoRASettings, adapt, fingerprint, fingerprint_of, merged, quantized_base, trained_names
from lmkit.record import ModelRecord, dtype_name, parse_dtype
from lmkit.tensors import count_parameters, load_tensors, unique_tensors


def is_artifact(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load(path: str | Path, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None) -> InferenceModel:
    """Load an lmkit artifact directory, an ONNX export (run by onnxruntime) or a Lightning checkpoint as an
    `InferenceModel` in eval mode."""
    path = Path(path)
    check_device(device)
    if is_artifact(path) and (onnx := _onnx_runtime()).is_onnx_export(path):
        if dtype is not None:
            raise LmkitError(f"dtype={dtype}: {path} is an ONNX export and keeps the dtypes it was exported with")
        return onnx.load_onnx(path, device)
    if is_artifact(path):
        model = _load_artifact(path)
    elif path.is_file() or is_sharded_checkpoint(path):
        model = _load_checkpoint(path)
    else:
        raise LmkitError(f"{path} is neither an lmkit model directory (with config.json) nor a checkpoint "
                         "(a file, or a sharded checkpoint folder)")
    dtype = parse_dtype(dtype)
    compression = [r["plugin"] for r in model.record.compression]
    if compression and dtype is not None:
        raise LmkitError(f"dtype={dtype_name(dtype)}: {path} is compressed ({'+'.join(compression)}) and keeps "
                         "the dtypes its plugins chose")
    cpu_only = [name for name in compression if name in CPU_ONLY]
    if cpu_only and device is not None and torch.device(device).type != "cpu":
        raise LmkitError(f"device={device}: {'+'.join(cpu_only)} runs torch's CPU kernels only: load {path} on the CPU")
    return model.to(device=device, dtype=dtype).eval() if dtype else model.to(device=device).eval()


def check_device(device: str | torch.device | None) -> None:
    """Refuse, in one line, a device this machine does not have (torch's own error is a traceback)."""
    if device is None:
        return
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise LmkitError(f"device={device} is not a device torch knows (cpu, cuda, cuda:N, ...)") from None
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise LmkitError(f"device={device}: this machine has no CUDA GPU (torch {torch.__version__}); use device=cpu")
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise LmkitError(f"device={device}: this machine has {torch.cuda.device_count()} GPU(s)")


CPU_ONLY = ("dynamic_int8",)  # plugins whose layers run a CPU-only kernel (torch._weight_int8pack_mm)


def _onnx_runtime():
    import lmkit.deploy.onnx_runtime  # imports onnxruntime only when it loads a model

    return lmkit.deploy.onnx_runtime


def _load_artifact(path: Path) -> InferenceModel:
    record = ModelRecord.from_file(path / "config.json")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise LmkitError(f"{path} has no model.safetensors")
    planned = record.backbone.num_parameters()  # config.json must not make us allocate what the file cannot fill
    if planned > 8 * weights.stat().st_size + 2**20:  # even all-zero tensors cost a bit each, as a bitmask
        raise LmkitError(f"{path / 'config.json'} describes a model of {planned:,} parameters, more than "
                         f"{weights.name} ({weights.stat().st_size:,} bytes) can hold")
    steps = [(plugin_class(r["plugin"]).from_record(r), r) for r in record.compression]
    backbone = build_backbone(record.backbone).to(parse_dtype(record.dtype))
    try:
        for plugin, step in steps:  # the compressed structure; the stored tensors fill it below
            backbone = plugin.restore(backbone, step)
        tensors = load_file(weights)
        for plugin, step in reversed(steps):
            tensors = plugin.unpack(tensors, step)
        load_tensors(backbone, tensors)
    except (SafetensorError, OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise LmkitError(f"{weights} is corrupt, truncated or for another model ({first_line(e)})") from None
    tokenizer = None
    if record.tokenizer is not None:
        if not (path / "tokenizer.json").is_file():
            raise LmkitError(f"{path}: config.json names a {record.tokenizer} tokenizer but tokenizer.json is missing")
        tokenizer = tokenizer_from_json((path / "tokenizer.json").read_text(encoding="utf-8"))
    return InferenceModel(backbone, tokenizer, record)


def _load_checkpoint(path: Path) -> InferenceModel:
    checkpoint = read_checkpoint(path)
    record = ModelRecord.from_checkpoint(checkpoint, path)
    if checkpoint.get("lmkit", {}).get("lora_base"):  # adapters alone: their base comes from where it was
        backbone = _adapted_backbone(checkpoint, path)
    else:
        backbone = build_backbone(record.backbone)
        state = {k.removeprefix("backbone."): v for k, v in checkpoint["state_dict"].items()
                 if k.startswith("backbone.")}
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise LmkitError(f"{path}: weights do not fit the model settings ({first_line(e)})") from None
    tok_json = checkpoint.get("lmkit", {}).get("tokenizer")
    return InferenceModel(backbone, tokenizer_from_json(tok_json) if tok_json else None, record)


def _adapted_backbone(checkpoint: dict, path: Path) -> torch.nn.Module:
    """The backbone a LoRA checkpoint trained: the base it names, checked against its fingerprint, quantized as in
    training (QLoRA: part by part as it is read, never whole in float), with the checkpoint's adapters and trained
    embedding rows."""
    base = checkpoint["lmkit"]["lora_base"]
    settings = LoRASettings.from_config(checkpoint["hyper_parameters"]["finetune"])
    if not Path(base["path"]).exists():
        raise LmkitError(f"{path} holds LoRA adapters for the base model {base['path']}, which is missing: "
                         "put that model back there")
    if settings.base is not None:
        from lmkit.parallel.materialize import describe_pretrained, read_pretrained

        record, _, _ = describe_pretrained(base["path"])
        with torch.device("meta"):
            backbone = build_backbone(record.backbone)
        tensors = read_pretrained(base["path"], backbone)
        found = fingerprint_of(tensors.items(sorted(backbone.state_dict())))
    else:
        backbone = load(base["path"]).backbone
        found = fingerprint(backbone)
    if found != base["fingerprint"]:
        raise LmkitError(f"{path} holds LoRA adapters for the base model at {base['path']}, but the model there now "
                         f"has other weights (fingerprint {found}, recorded {base['fingerprint']})")
    if settings.base is not None:
        backbone = quantized_base(backbone, settings.base, float_embedding=settings.train_embeddings,
                                  pretrained=tensors)
    tok_json = checkpoint["lmkit"].get("tokenizer")
    adapt(backbone, settings, tokenizer_from_json(tok_json) if tok_json else None)
    state = {k.removeprefix("backbone."): v for k, v in checkpoint["state_dict"].items()}
    result = backbone.load_state_dict(state, strict=False)
    missing = sorted(trained_names(backbone) - set(state))
    if missing or result.unexpected_keys:
        raise LmkitError(f"{path}: its adapters do not fit finetune settings {settings} "
                         f"(e.g. {(missing or result.unexpected_keys)[0]})")
    return backbone


def save(model: InferenceModel, out: str | Path, *, dtype: str | torch.dtype | None = None, overwrite: bool = False,
         files: dict[str, bytes] | None = None, readme_extra: str | None = None) -> Path:
    """Write `model` as an lmkit artifact at `out` (float32 unless `dtype` says otherwise).

    `files` are written beside the model in the same atomic step (report.json, report.png)."""
    model = merged(model)  # a LoRA model is written as the dense model it computes
    dtype = parse_dtype(dtype) or torch.float32
    record = model.record.replace(dtype=dtype_name(dtype),
                                  tokenizer=model.tokenizer.kind if model.has_tokenizer else None)
    with atomic_directory(Path(out), overwrite) as tmp:
        backbone = model.backbone
        if record.compressed:
            if dtype != torch.float32:
                raise LmkitError(f"dtype={dtype_name(dtype)}: a compressed model keeps the dtypes its plugins chose")
        elif dtype != next(backbone.parameters()).dtype:
            backbone = copy.deepcopy(backbone).to(dtype)  # leave the caller's model as it was
        write_tensors(backbone, tmp / "model.safetensors", record.compression)
        if model.has_tokenizer:
            (tmp / "tokenizer.json").write_text(model.tokenizer.to_json(), encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(record.to_dict(), indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(record, backbone) + (readme_extra or ""))
        for name, content in (files or {}).items():
            (tmp / name).write_bytes(content)
    return Path(out)


def write_tensors(backbone: torch.nn.Module, path: Path, compression: list[dict]) -> None:
    tensors = unique_tensors(backbone)
    for step in compression:
        tensors = plugin_class(step["plugin"]).from_record(step).pack(tensors, step)
    save_file(tensors, str(path), metadata={"format": "lmkit"})


def model_card(record: ModelRecord, backbone: torch.nn.Module) -> str:
    n_params = count_parameters(backbone)[0]
    shape = ", ".join(f"{k}={v}" for k, v in record.model_settings.items() if k != "kind")
    tok = record.tokenizer or "none (token ids only)"
    steps = " -> ".join(r["plugin"] for r in record.compression)
    dtype = f"{record.dtype}, compressed: {steps}" if steps else record.dtype
    return (f"# lmkit {record.kind} language model\n\n"
            f"- parameters: {n_params:,}\n- shape: {shape}\n- tokenizer: {tok}\n- dtype: {dtype}\n"
            f"- trained on: {json.dumps(record.data)}\n- source: {json.dumps(record.source)}\n\n"
            "## Use\n\n```python\nimport lmkit\n\nmodel = lmkit.load(\"PATH\")\n"
            "print(model.generate(\"ROMEO:\", max_new_tokens=200, temperature=0.8, top_k=50))\n```\n\n"
            "Loads with torch, safetensors and tokenizers; no Lightning, no Hydra, no pickle.\n")
