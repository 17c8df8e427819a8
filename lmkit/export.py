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
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import lmkit
from lmkit.backbones import build_backbone
from lmkit.checkpoint import read_checkpoint
from lmkit.data.tokenizer import tokenizer_from_json
from lmkit.errors import LmkitError
from lmkit.files import atomic_directory
from lmkit.inference import InferenceModel
from lmkit.plugins import make

FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise LmkitError(f"dtype={name!r} is not one of fp32, bf16, fp16")
    return DTYPES[name]


def is_artifact(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load(path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> InferenceModel:
    """Load an lmkit artifact directory or a Lightning checkpoint as an `InferenceModel` in eval mode."""
    path = Path(path)
    if is_artifact(path):
        model = _load_artifact(path)
    elif path.is_file():
        model = _load_checkpoint(path)
    else:
        raise LmkitError(f"{path} is neither an lmkit model directory (with config.json) nor a checkpoint file")
    dtype = parse_dtype(dtype)
    compression = [r["plugin"] for r in model.config.get("compression") or []]
    if compression and dtype is not None:
        raise LmkitError(f"dtype={dtype_name(dtype)}: {path} is compressed ({'+'.join(compression)}) and keeps "
                         "the dtypes its plugins chose")
    if compression and device is not None and torch.device(device).type != "cpu":
        raise LmkitError(f"device={device}: compressed artifacts ({'+'.join(compression)}) load on the CPU here "
                         "(dynamic_int8 is CPU-only; int8 on a GPU is untested)")
    return model.to(device=device, dtype=dtype).eval() if dtype else model.to(device=device).eval()


def _build(model_cfg: dict[str, Any], where: str) -> torch.nn.Module:
    options = dict(model_cfg)
    try:
        return build_backbone(options.pop("kind"), options.pop("vocab_size"), **options)
    except (KeyError, ValueError, TypeError) as e:
        raise LmkitError(f"{where}: the model settings are not valid ({e})") from None


def _load_artifact(path: Path) -> InferenceModel:
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise LmkitError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    version = config.get("format_version")
    if config.get("format") != "lmkit" or not isinstance(version, int):
        raise LmkitError(f"{path / 'config.json'} is not an lmkit config (no format/format_version)")
    if version > FORMAT_VERSION:
        raise LmkitError(f"{path} uses artifact format {version}; this lmkit ({lmkit.__version__}) reads up to "
                         f"{FORMAT_VERSION}: upgrade lmkit")
    missing = [k for k in ("model", "tokenizer", "dtype") if k not in config]
    missing += [f"model.{k}" for k in ("kind", "vocab_size") if k not in config.get("model", {})]
    if missing:
        raise LmkitError(f"{path / 'config.json'} lacks {', '.join(missing)}")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise LmkitError(f"{path} has no model.safetensors")
    with torch.device("meta"):  # sizes first: config.json must not make us allocate what the file cannot fill
        planned = sum(p.numel() for p in _build(config["model"], str(path / "config.json")).parameters())
    if planned > 8 * weights.stat().st_size + 2**20:  # even all-zero tensors cost a bit each, as a bitmask
        raise LmkitError(f"{path / 'config.json'} describes a model of {planned:,} parameters, more than "
                         f"{weights.name} ({weights.stat().st_size:,} bytes) can hold")
    records = config.get("compression") or []
    if not isinstance(records, list) or not all(
            isinstance(r, dict) and isinstance(r.get("plugin"), str) and isinstance(r.get("settings", {}), dict)
            for r in records):
        raise LmkitError(f"{path / 'config.json'}: `compression` must be a list of {{plugin, settings}} records")
    steps = [(make(r["plugin"], r.get("settings")), r) for r in records]
    backbone = _build(config["model"], str(path / "config.json")).to(parse_dtype(config["dtype"]))
    try:
        for plugin, record in steps:  # the compressed structure; the stored tensors fill it below
            backbone = plugin.restore(backbone, record)
        tensors = load_file(weights)
        for plugin, record in reversed(steps):
            tensors = plugin.unpack(tensors, record)
        load_tensors(backbone, tensors)
    except (SafetensorError, OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise LmkitError(f"{weights} is corrupt, truncated or for another model ({reason})") from None
    tokenizer = None
    if config["tokenizer"] is not None:
        if not (path / "tokenizer.json").is_file():
            raise LmkitError(f"{path}: config.json names a {config['tokenizer']} tokenizer but tokenizer.json is missing")
        tokenizer = tokenizer_from_json((path / "tokenizer.json").read_text(encoding="utf-8"))
    return InferenceModel(backbone, tokenizer, config)


def _load_checkpoint(path: Path) -> InferenceModel:
    checkpoint = read_checkpoint(path)
    hp = checkpoint.get("hyper_parameters", {})
    if "model" not in hp or "vocab_size" not in hp:
        raise LmkitError(f"{path} is not an lmkit checkpoint (no model hyper-parameters)")
    model_cfg = {**hp["model"], "vocab_size": hp["vocab_size"]}
    backbone = _build(model_cfg, str(path))
    state = {k.removeprefix("backbone."): v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LmkitError(f"{path}: weights do not fit the model settings ({str(e).splitlines()[0][:160]})") from None
    tok_json = checkpoint.get("lmkit", {}).get("tokenizer")
    tokenizer = tokenizer_from_json(tok_json) if tok_json else None
    config = {"format": "lmkit", "format_version": FORMAT_VERSION, "model": model_cfg,
              "tokenizer": tokenizer.kind if tokenizer else None, "dtype": "float32",
              "data": hp.get("data"), "optim": hp.get("optim"),
              "source": {"checkpoint": str(path.resolve()), "step": checkpoint.get("global_step")}}
    return InferenceModel(backbone, tokenizer, config)


def save(model: InferenceModel, out: str | Path, dtype: str | torch.dtype | None = None, overwrite: bool = False,
         extra: dict[str, Any] | None = None, files: dict[str, bytes] | None = None,
         readme_extra: str | None = None) -> Path:
    """Write `model` as an lmkit artifact at `out` (float32 unless `dtype` says otherwise).

    `files` are written beside the model in the same atomic step (report.json, report.png)."""
    dtype = parse_dtype(dtype) or torch.float32
    config = {**model.config, "format": "lmkit", "format_version": FORMAT_VERSION, "lmkit_version": lmkit.__version__,
              "torch_version": torch.__version__.split("+")[0], "dtype": dtype_name(dtype),
              "tokenizer": model._tokenizer.kind if model.has_tokenizer else None, **(extra or {})}
    with atomic_directory(Path(out), overwrite) as tmp:
        backbone = model.backbone
        if config.get("compression"):
            if dtype != torch.float32:
                raise LmkitError(f"dtype={dtype_name(dtype)}: a compressed model keeps the dtypes its plugins chose")
        elif dtype != next(backbone.parameters()).dtype:
            backbone = copy.deepcopy(backbone).to(dtype)  # leave the caller's model as it was
        write_tensors(backbone, tmp / "model.safetensors", config.get("compression") or [])
        if model.has_tokenizer:
            (tmp / "tokenizer.json").write_text(model.tokenizer.to_json(), encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(config, backbone) + (readme_extra or ""))
        for name, content in (files or {}).items():
            (tmp / name).write_bytes(content)
    return Path(out)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def unique_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (a tied head is the embedding: stored once)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    tensors = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.nbytes, tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.contiguous()
    return tensors


def write_tensors(backbone: torch.nn.Module, path: Path, compression: list[dict[str, Any]]) -> None:
    tensors = unique_tensors(backbone)
    for record in compression:
        tensors = make(record["plugin"], record.get("settings")).pack(tensors, record)
    save_file(tensors, str(path), metadata={"format": "lmkit"})


def load_tensors(backbone: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into `backbone` in place; names it lacks must be aliases of ones it has (tied)."""
    missing, unexpected = backbone.load_state_dict(tensors, strict=False)
    own = backbone.state_dict()
    loaded = {(t.data_ptr(), t.nbytes) for name, t in own.items() if name in tensors}
    untied = [name for name in missing if (own[name].data_ptr(), own[name].nbytes) not in loaded]
    if untied or unexpected:
        raise ValueError(f"missing {untied[:3]}, unexpected {unexpected[:3]}")


BOOKKEEPING = ("SCB", "weight_format")  # quantization scales and format flags: not parameters of the model


def count_parameters(backbone: torch.nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters): each shared tensor once, quantization scales excluded."""
    tensors = [t for name, t in unique_tensors(backbone).items() if name.rsplit(".", 1)[-1] not in BOOKKEEPING]
    return sum(t.numel() for t in tensors), sum(int((t != 0).sum()) for t in tensors)


def model_card(config: dict[str, Any], backbone: torch.nn.Module) -> str:
    m = config["model"]
    n_params = count_parameters(backbone)[0]
    shape = ", ".join(f"{k}={v}" for k, v in m.items() if k not in ("kind",))
    tok = config["tokenizer"] or "none (token ids only)"
    steps = " -> ".join(r["plugin"] for r in config.get("compression") or [])
    dtype = f"{config['dtype']}, compressed: {steps}" if steps else config["dtype"]
    return (f"# lmkit {m['kind']} language model\n\n"
            f"- parameters: {n_params:,}\n- shape: {shape}\n- tokenizer: {tok}\n- dtype: {dtype}\n"
            f"- trained on: {json.dumps(config.get('data'))}\n- source: {json.dumps(config.get('source'))}\n\n"
            "## Use\n\n```python\nimport lmkit\n\nmodel = lmkit.load(\"PATH\")\n"
            "print(model.generate(\"ROMEO:\", max_new_tokens=200, temperature=0.8, top_k=50))\n```\n\n"
            "Loads with torch, safetensors and tokenizers; no Lightning, no Hydra, no pickle.\n")
