"""ModelRecord: the one typed description of a model, shared by everything that reads or writes one.

It is what `config.json` holds beside an artifact's tensors, what a checkpoint's hyper-parameters
describe, and what `InferenceModel.record` carries: the backbone's config (its kind, shape and
vocabulary), the tokenizer kind, the stored dtype, the compression steps applied, the corpus and
optimizer it was trained with, and where it came from. Validation happens here and nowhere else,
so a damaged or hostile `config.json` is one clear error before anything is allocated.

Plain data only: reading a record never imports code named by the file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmkit.backbones import BackboneConfig, backbone_config
from lmkit.errors import LmkitError
from lmkit.version import __version__

FORMAT_VERSION = 1  # bump when config.json changes in a way an older lmkit cannot read
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
TRAINING_ONLY = ("compile", "activation_checkpointing")  # model-group keys that say how to train, not what the model is


# What an imported tokenizer brings beyond its vocabulary (Hugging Face keeps these in generation_config.json and
# tokenizer_config.json): the token that starts a text, those that end one (generation stops at any of them), and
# the model's own Jinja chat template. A model lmkit trained from scratch has none of them.
TOKENS = {"bos_token_id": int, "eos_token_ids": list, "chat_template": str}


def check_tokens(tokens: Any, vocab_size: int, where: str) -> dict[str, Any]:
    """`tokens` as TOKENS describes it, or one LmkitError naming the first bad key."""
    if not isinstance(tokens, dict):
        raise LmkitError(f"{where}: `tokens` must be a mapping, got {tokens!r}")
    for key, value in tokens.items():
        if key not in TOKENS or not isinstance(value, TOKENS[key]) or isinstance(value, bool):
            raise LmkitError(f"{where}: tokens.{key}={value!r} is not one of lmkit's token settings "
                             f"({', '.join(f'{k}: {t.__name__}' for k, t in TOKENS.items())})")
    ids = [tokens["bos_token_id"]] if "bos_token_id" in tokens else []
    ids += tokens.get("eos_token_ids", [])
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size]
    if bad:
        raise LmkitError(f"{where}: token id {bad[0]!r} is not in the vocabulary [0, {vocab_size})")
    return tokens


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise LmkitError(f"dtype={name!r} is not one of fp32, bf16, fp16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class ModelRecord:
    backbone: BackboneConfig  # kind, shape and vocabulary: everything needed to build the dense network
    tokenizer: str | None = None  # the tokenizer's kind (char | bpe); None: the model takes token ids only
    dtype: str = "float32"  # the dtype of the stored tensors (compressed ones keep their plugins' dtypes)
    compression: list[dict[str, Any]] = field(default_factory=list)  # {plugin, settings, ...} per step, in order
    data: dict[str, Any] | None = None  # the corpus settings it was trained on (the data group, plain values)
    optim: dict[str, Any] | None = None  # the optimizer settings it was trained with (fine-tunes start there)
    source: dict[str, Any] | None = None  # provenance: a run, a checkpoint and step, a Hugging Face directory
    tokens: dict[str, Any] = field(default_factory=dict)  # an imported tokenizer's conventions: see TOKENS

    @property
    def kind(self) -> str:
        return self.backbone.kind

    @property
    def compressed(self) -> bool:
        return bool(self.compression)

    @property
    def model_settings(self) -> dict[str, Any]:
        """The model config group's keys (kind and shape, no vocabulary): what a training run is given."""
        settings = {"kind": self.kind, **dataclasses.asdict(self.backbone)}
        del settings["vocab_size"]
        return settings

    @classmethod
    def from_settings(cls, model: dict[str, Any], vocab_size: int, **fields: Any) -> ModelRecord:
        """From the `model` config group (keys that only steer training, like `compile`, are left out)."""
        options = {k: v for k, v in model.items() if k not in ("kind", *TRAINING_ONLY)}
        try:
            backbone = backbone_config(model.get("kind", ""), vocab_size, **options)
        except (ValueError, TypeError) as e:
            raise LmkitError(f"model: {e}") from None
        return cls(backbone=backbone, **fields)

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "config.json") -> ModelRecord:
        """From `config.json`'s contents, checked: any lmkit artifact written since format 1 reads here."""
        if not isinstance(config, dict) or config.get("format") != "lmkit" or \
                not isinstance(config.get("format_version"), int):
            raise LmkitError(f"{where} is not an lmkit config (no format/format_version)")
        version = config["format_version"]
        if version > FORMAT_VERSION:
            raise LmkitError(f"{where} uses artifact format {version}; this lmkit ({__version__}) reads up to "
                             f"{FORMAT_VERSION}: upgrade lmkit")
        model = config.get("model")
        missing = [k for k in ("model", "tokenizer", "dtype") if k not in config]
        missing += [f"model.{k}" for k in ("kind", "vocab_size") if not isinstance(model, dict) or k not in model]
        if missing:
            raise LmkitError(f"{where} lacks {', '.join(missing)}")
        records = config.get("compression") or []
        if not isinstance(records, list) or not all(
                isinstance(r, dict) and isinstance(r.get("plugin"), str) and isinstance(r.get("settings", {}), dict)
                for r in records):
            raise LmkitError(f"{where}: `compression` must be a list of {{plugin, settings}} records")
        if config["tokenizer"] not in (None, "char", "bpe"):
            raise LmkitError(f"{where}: tokenizer={config['tokenizer']!r} is not one of char, bpe, null")
        if config["dtype"] not in DTYPES:
            raise LmkitError(f"{where}: dtype={config['dtype']!r} is not one of {', '.join(DTYPES)}")
        plain = {k: config.get(k) if isinstance(config.get(k), dict) else None for k in ("data", "optim", "source")}
        options = {k: v for k, v in model.items() if k not in ("kind", "vocab_size")}
        try:
            backbone = backbone_config(model["kind"], model["vocab_size"], **options)
        except (ValueError, TypeError) as e:
            raise LmkitError(f"{where}: the model settings are not valid ({e})") from None
        tokens = check_tokens(config.get("tokens") or {}, backbone.vocab_size, where)
        return cls(backbone=backbone, tokenizer=config["tokenizer"], dtype=config["dtype"], compression=records,
                   tokens=tokens, **plain)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelRecord:
        """From a `config.json` file (or the artifact directory that holds one)."""
        path = Path(path)
        path = path / "config.json" if path.is_dir() else path
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise LmkitError(f"{path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LmkitError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(config, str(path))

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], path: str | Path) -> ModelRecord:
        """From a Lightning checkpoint written by lmkit (read with `lmkit.checkpoint.read_checkpoint`)."""
        hp = checkpoint.get("hyper_parameters", {})
        if not isinstance(hp.get("model"), dict) or "vocab_size" not in hp or "state_dict" not in checkpoint:
            raise LmkitError(f"{path} is not an lmkit checkpoint (no model hyper-parameters)")
        tokenizer = checkpoint.get("lmkit", {}).get("tokenizer")
        tokens = check_tokens(hp.get("tokens") or {}, hp["vocab_size"], str(path))
        record = cls.from_settings(hp["model"], hp["vocab_size"], data=hp.get("data"), optim=hp.get("optim"),
                                   tokens=tokens,
                                   source={"checkpoint": str(Path(path).resolve()),
                                           "step": checkpoint.get("global_step")})
        record.tokenizer = "char" if tokenizer and json.loads(tokenizer).get("lmkit_tokenizer") == "char" else \
            "bpe" if tokenizer else None  # tokenizer_from_json's rule, without building the tokenizer
        return record

    def to_dict(self) -> dict[str, Any]:
        """What `config.json` holds (the versions that wrote it included)."""
        return {"format": "lmkit", "format_version": FORMAT_VERSION, "lmkit_version": __version__,
                "torch_version": torch.__version__.split("+")[0],
                "model": {"kind": self.kind, **dataclasses.asdict(self.backbone)}, "tokenizer": self.tokenizer,
                "dtype": self.dtype, "compression": self.compression, "data": self.data, "optim": self.optim,
                "source": self.source, "tokens": self.tokens}

    def replace(self, **changes: Any) -> ModelRecord:
        """A copy with `changes` (a new backbone config after structured pruning, a dtype, a step more)."""
        return dataclasses.replace(self, **changes)
