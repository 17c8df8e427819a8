"""What every Hugging Face folder lmkit reads or writes shares, whatever the family: the weights (one file, shards,
or a pickle), the tokenizer it brings (with its start and end tokens and chat template), the JSON files
(`config.json`, `tokenizer_config.json`, `generation_config.json`) and the atomic write of the whole folder that
`from_pretrained` reads. The family modules (`lmkit.hf.gpt2`, `lmkit.hf.llama`) map names and convert tensors; the
files are this module's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lmkit.backbones import TransformerConfig
from lmkit.data.tokenizer import BPETokenizer, Tokenizer, byte_level
from lmkit.errors import LmkitError
from lmkit.files import atomic_directory
from lmkit.inference import InferenceModel
from lmkit.record import ModelRecord

# lmkit's tensors with a row per token: `pad_vocab_to` rounds them up (for fast matmuls), HF's vocab_size does not
VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")
BLOCK = "transformer.h.{}"  # a block's prefix in lmkit's Transformer (and in GPT-2's HF names)


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards model.safetensors.index.json names, or (`save_pretrained` with
    safe_serialization=False) pytorch_model.bin, read without unpickling anything but tensors."""
    index = src / "model.safetensors.index.json"
    if (src / "model.safetensors").is_file():
        return load_file(src / "model.safetensors")
    if index.is_file():
        weights = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            if not (src / shard).is_file():
                raise LmkitError(f"src={src}: model.safetensors.index.json names {shard}, which is missing")
            weights.update(load_file(src / shard))
        return weights
    if (src / "pytorch_model.bin").is_file():
        return torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise LmkitError(f"src={src} has none of model.safetensors, model.safetensors.index.json, pytorch_model.bin")


def without_padding(state: dict[str, Any], cfg: TransformerConfig) -> dict[str, Any]:
    """`state` without the rows that pad the vocabulary (`VOCAB_ROWS`), which config.json's vocab_size leaves out.
    Only row slicing: a quantized layer's rows (`lmkit.hf.quantized.GridRows`) are cut the same way."""
    return {name: value[: cfg.vocab_size] if name in VOCAB_ROWS else value for name, value in state.items()}


def read_tokenizer(src: Path) -> Tokenizer | None:
    """The byte-level BPE tokenizer of a Hugging Face folder (tokenizer.json, or vocab.json + merges.txt), or None."""
    from tokenizers import Tokenizer as HFTokenizer, models

    if (src / "tokenizer.json").is_file():
        return BPETokenizer(HFTokenizer.from_file(str(src / "tokenizer.json")))
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        return BPETokenizer(byte_level(HFTokenizer(models.BPE.from_file(str(src / "vocab.json"),
                                                                        str(src / "merges.txt")))))
    return None


def imported_model(src: Path, backbone: nn.Module, hf_config: dict[str, Any]) -> InferenceModel:
    """A loaded Hugging Face backbone with the tokenizer (and its conventions) its folder brings, and its record."""
    tokenizer = read_tokenizer(src)
    cfg = backbone.config
    record = ModelRecord(backbone=cfg, tokenizer=tokenizer.kind if tokenizer else None,
                         tokens=read_tokens(src, tokenizer, cfg.vocab_size),
                         source={"hf": str(src.resolve()), "architectures": hf_config.get("architectures")})
    return InferenceModel(backbone.eval(), tokenizer, record)


def read_tokens(src: Path, tokenizer: Tokenizer | None, vocab_size: int) -> dict[str, Any]:
    """The tokenizer's conventions a Hugging Face folder states (`lmkit.record.TOKENS`): the start and end ids from
    generation_config.json, else config.json, plus tokenizer_config.json's `eos_token`; the chat template from
    chat_template.jinja (transformers 5) or tokenizer_config.json. Ids outside the vocabulary are left out: a model
    never generates them (transformers' default configs name GPT-2's 50256 in tiny vocabularies)."""
    config, generation, tok_config = (_json(src / name) for name in
                                      ("config.json", "generation_config.json", "tokenizer_config.json"))
    tokens: dict[str, Any] = {}
    bos = generation.get("bos_token_id", config.get("bos_token_id"))
    if isinstance(bos, int) and 0 <= bos < vocab_size:
        tokens["bos_token_id"] = bos
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    eos = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    eos_token = tok_config.get("eos_token")
    eos_token = eos_token.get("content") if isinstance(eos_token, dict) else eos_token
    if isinstance(eos_token, str) and tokenizer is not None and tokenizer.kind == "bpe":
        eos.append(tokenizer.tokenizer.token_to_id(eos_token))
    eos = list(dict.fromkeys(i for i in eos if isinstance(i, int) and 0 <= i < vocab_size))
    if eos:
        tokens["eos_token_ids"] = eos
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one is the chat template
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str) and template:
        tokens["chat_template"] = template
    return tokens


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmkitError(f"{path} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def json_files(model: InferenceModel, hf_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """config.json with the start and end ids; generation_config.json with them too, when there are any; and for a
    BPE tokenizer, tokenizer_config.json naming them and holding the chat template: what `read_tokens` reads."""
    tokens = model.record.tokens
    ids = {k: v for k, v in (("bos_token_id", tokens.get("bos_token_id")),
                             ("eos_token_id", tokens.get("eos_token_ids"))) if v is not None}
    files = {"config.json": {**hf_config, **ids}}
    if ids:
        files["generation_config.json"] = ids
    if model.has_tokenizer and model.tokenizer.kind == "bpe":
        vocab, eos = model.tokenizer.tokenizer, tokens.get("eos_token_ids") or [None]
        named = {key: vocab.id_to_token(token) for key, token in
                 (("bos_token", tokens.get("bos_token_id")), ("eos_token", eos[0])) if token is not None}
        template = {"chat_template": tokens["chat_template"]} if "chat_template" in tokens else {}
        files["tokenizer_config.json"] = {"tokenizer_class": "PreTrainedTokenizerFast", **named, **template}
    return files


def write_folder(out: Path, tensors: dict[str, torch.Tensor], hf_config: dict[str, Any], model: InferenceModel,
                 overwrite: bool = False) -> Path:
    """Write a `save_pretrained`-style folder atomically: the weights, the JSON files of `json_files` and (for
    BPE) tokenizer.json."""
    files = json_files(model, hf_config)
    with atomic_directory(Path(out), overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if model.has_tokenizer and model.tokenizer.kind == "bpe":
            (tmp / "tokenizer.json").write_text(model.tokenizer.to_json(), encoding="utf-8")
    return Path(out)
