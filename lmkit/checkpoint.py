"""Reading Lightning checkpoints safely (`weights_only=True`) and checking they fit this run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmkit.errors import LmkitError, first_line
from lmkit.sharded_checkpoint import is_sharded_checkpoint, read_sharded_checkpoint
from lmkit.record import ModelRecord


def read_checkpoint(path: str | Path, *, weights: bool = True) -> dict[str, Any]:
    """A Lightning checkpoint as a dict: a `.ckpt` file, or a sharded folder consolidated in memory (its model
    tensors only; `weights=False` reads a folder's hyper-parameters and loop state alone)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return read_sharded_checkpoint(path, weights=weights)
    if not path.is_file():
        raise LmkitError(f"checkpoint not found: {path}")
    try:
        # mmap: checking a resume checkpoint reads its hyper-parameters, not every optimizer tensor,
        # before Lightning loads it for real
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for a bad file
        raise LmkitError(f"checkpoint {path} is corrupt or truncated ({first_line(e)})") from None


def check_compatible(path: str | Path, checkpoint: dict[str, Any], record: ModelRecord, tokenizer_json: str) -> None:
    """Refuse a checkpoint whose model shape or tokenizer differs from this run's."""
    saved = ModelRecord.from_checkpoint(checkpoint, path)
    saved_tok = checkpoint.get("lmkit", {}).get("tokenizer")
    if saved.backbone.vocab_size != record.backbone.vocab_size or (saved_tok and saved_tok != tokenizer_json):
        raise LmkitError(f"checkpoint {path} was trained with a different tokenizer (vocab {saved.backbone.vocab_size}) "
                         f"than this run's (vocab {record.backbone.vocab_size})")
    ours, theirs = record.model_settings, saved.model_settings
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    if diff:
        shown = ", ".join(f"model.{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(diff.items()))
        raise LmkitError(f"checkpoint {path} is for a different model: {shown}")


def check_same_base(path: str | Path, checkpoint: dict[str, Any], lora_base: dict[str, str] | None) -> None:
    """Refuse resuming a LoRA checkpoint as a full fine-tune (or the reverse), or onto another base model."""
    saved = checkpoint.get("lmkit", {}).get("lora_base")
    if (saved is None) != (lora_base is None):
        raise LmkitError(f"checkpoint {path} is a {'LoRA' if saved else 'full'} fine-tune, this run finetune="
                         f"{'lora' if lora_base else 'full'}: resume it with the finetune setting it was trained with")
    if saved and saved["fingerprint"] != lora_base["fingerprint"]:
        raise LmkitError(f"checkpoint {path} holds adapters for the base {saved['path']} (weights {saved['fingerprint']}),"
                         f" not init_from={lora_base['path']} (weights {lora_base['fingerprint']})")
