"""What every Hugging Face family lmkit converts shares on disk: the tokenizer it brings, and the folder
(`model.safetensors`, `config.json`, `tokenizer.json`) that `from_pretrained` reads. The per-family weight maps
live in `lmkit.hf` (GPT-2) and `lmkit.hf_llama` (Llama, Qwen2); both import this, neither imports the other's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmkit.data.tokenizer import BPETokenizer, Tokenizer, byte_level
from lmkit.files import atomic_directory
from lmkit.inference import InferenceModel


def read_hf_tokenizer(src: Path) -> Tokenizer | None:
    """The byte-level BPE tokenizer of a Hugging Face folder (tokenizer.json, or vocab.json + merges.txt), or None."""
    from tokenizers import Tokenizer as HFTokenizer, models

    if (src / "tokenizer.json").is_file():
        return BPETokenizer(HFTokenizer.from_file(str(src / "tokenizer.json")))
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        return BPETokenizer(byte_level(HFTokenizer(models.BPE.from_file(str(src / "vocab.json"),
                                                                        str(src / "merges.txt")))))
    return None


def write_hf_folder(out: Path, tensors: dict[str, torch.Tensor], hf_config: dict[str, Any], model: InferenceModel,
                    overwrite: bool = False) -> Path:
    """Write a `save_pretrained`-style folder atomically: the weights, config.json and (for BPE) tokenizer.json."""
    with atomic_directory(Path(out), overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if model.has_tokenizer and model.tokenizer.kind == "bpe":
            (tmp / "tokenizer.json").write_text(model.tokenizer.to_json(), encoding="utf-8")
    return Path(out)
