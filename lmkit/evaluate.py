"""Loss, perplexity and bits per character (or byte) of a model over a token split."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmkit.data.windows import EvalBatches
from lmkit.errors import LmkitError
from lmkit.inference import InferenceModel
from lmkit.tensors import count_parameters


def own_datamodule(model: InferenceModel, cache_dir: str, data: dict[str, Any] | None = None, seed: int = 0):
    """The data module over `data`, or over the corpus `model` recorded it was trained on.

    The recorded settings are plain values: the data module is built directly, never through a
    class path (`_target_`) read from the model file, so a stranger's model runs no code of theirs.
    Keys a record lacks take their conf/data defaults. The model's own tokenizer is passed inline."""
    import inspect

    from lmkit.conf import group_option
    from lmkit.data.datamodule import LMDataModule

    data = data or model.record.data
    if not data:
        raise LmkitError("the model records no training corpus: name one, e.g. data=text data.path=FILE")
    source = data.get("source")
    if source not in ("shakespeare", "text", "chat", "preference"):
        raise LmkitError(f"data.source={source!r} is not one of shakespeare, text, chat, preference")
    extra: dict[str, Any] = {}
    if source == "chat":  # conversations rendered with the model's chat template (the one it learned)
        from lmkit.data.chat_datamodule import ChatDataModule as LMDataModule

        extra["model_tokens"] = model.record.tokens
    elif source == "preference":  # preference pairs, whose splits read as their prompt + chosen conversations
        from lmkit.data.preference import PreferenceDataModule as LMDataModule

        extra["model_tokens"] = model.record.tokens
    parameters = inspect.signature(LMDataModule).parameters
    known = set(parameters) - {"tokenizer", "cache_dir", "seed", "model_tokens"}
    if any(parameters[k].default is inspect.Parameter.empty for k in known - data.keys()):
        data = {**group_option("data", source), **data}  # a partial record (lmkit writes whole ones)
    settings = {k: v for k, v in data.items() if k in known}
    return LMDataModule(**settings, tokenizer={"kind": "json", "json": model.tokenizer.to_json()},
                        cache_dir=cache_dir, seed=seed, **extra)


@torch.no_grad()
def evaluate(model: InferenceModel, tokens: np.ndarray, *, seq_len: int, batch_size: int,
             max_windows: int | None = None) -> dict[str, Any]:
    """Evaluate on non-overlapping windows of `tokens`; bits are per character for a char tokenizer,
    per UTF-8 byte otherwise (so BPE models compare with char models)."""
    context = model.backbone.max_seq_len
    seq_len = min(seq_len, context) if context else seq_len
    nll, count, n_bytes, elapsed = 0.0, 0, 0, 0.0
    per_char = model.has_tokenizer and model.tokenizer.kind == "char"
    for inputs, targets in EvalBatches(tokens, seq_len, batch_size, max_windows):
        inputs, targets = inputs.to(model.device), targets.to(model.device)
        started = time.perf_counter()
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        nll += loss.item()  # .item() waits for the device, so the time below is real
        elapsed += time.perf_counter() - started
        count += targets.numel()
        if model.has_tokenizer and not per_char:
            n_bytes += sum(len(model.tokenizer.decode(row).encode("utf-8")) for row in targets.tolist())
    loss = nll / count
    result = {"loss": loss, "perplexity": math.exp(loss), "tokens": count,
              "tokens_per_s": count / elapsed if elapsed else None,
              "parameters": count_parameters(model.backbone)[0]}  # int8 weights held as buffers count too
    if per_char:
        result["bits_per_char"] = loss / math.log(2)
    elif n_bytes:
        result["bits_per_byte"] = nll / math.log(2) / n_bytes
    return result
