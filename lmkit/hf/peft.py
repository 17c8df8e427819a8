"""`lmkit export format=peft`: a LoRA checkpoint's adapters alone, in PEFT's LoRA format, for the base model's
`format=hf` export (`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), peft_dir)`; vLLM and
HF's own loaders read the same two files).

The folder holds `adapter_config.json` and `adapter_model.safetensors` (keys
`base_model.model.<HF module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)), written with json and
safetensors: lmkit does not import peft. The HF module names are the family modules' (`MODULES`, `QKV`).

How lmkit's adapters become PEFT's, exactly (PEFT computes `base(x) + lora_alpha / r * B @ A @ x`, as lmkit does):
- Llama and Qwen2 split the fused q/k/v projection as lmkit's adapters are split: each part's pair is the adapter of
  q_proj, k_proj or v_proj as it stands.
- GPT-2 fuses q/k/v too (one Conv1D, c_attn), so the parts' pairs become one adapter of rank parts * r: A is the
  parts' A rows stacked, B is block-diagonal (each part's B in its own rows and columns; a part without an adapter
  has zero rows). Its lora_alpha is parts * alpha, so alpha / r is unchanged; `rank_pattern` and `alpha_pattern`
  say so for c_attn alone. PEFT's A and B keep nn.Linear's layout on a Conv1D; `fan_in_fan_out` only tells its merge
  that the base weight is stored transposed.
- A head adapter on a tied head: PEFT adds it to lm_head's output only, as lmkit does, so the adapted model is exact.
  (PEFT's `merge_and_unload` then adds B @ A to the one tied tensor, moving the embedding too; lmkit's merge unties.)
- Trained embedding rows. Named tokens (`finetune.trainable_tokens`) are PEFT's `trainable_token_indices` (the ids, and
  the rows as `<embedding>.token_adapter.trainable_tokens_delta`, which holds the rows' values, not a difference);
  PEFT ties them to a tied head itself. Every row (`finetune.train_embeddings`) is PEFT's `modules_to_save` of the
  embedding (its whole `weight`) where the head is untied; with a tied head, every id as `trainable_token_indices`:
  PEFT ties a module to save to the head only when it is named `embed_tokens` (not GPT-2's `wte`), and refuses one
  beside a head adapter, while token rows it ties to the head whatever the names and composes with a head adapter.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import save_file

from lmkit.checkpoint import read_checkpoint
from lmkit.errors import LmkitError
from lmkit.files import atomic_directory
from lmkit.hf.folder import BLOCK
from lmkit.lora import LoRALinear, TrainableTokens, is_adapted
from lmkit.record import ModelRecord

log = logging.getLogger("lmkit")

KEY_PREFIX = "base_model.model."  # where PeftModel keeps the model it wraps


@dataclass(frozen=True)
class PeftAdapter:
    """One PEFT LoRA adapter: the HF module it adapts, A (r, in), B (out, r), and lora_alpha (scale * r)."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    alpha: float

    @property
    def r(self) -> int:
        return self.a.shape[0]


def export_peft(model: Any, out: str | Path, *, base_model: str | None = None, overwrite: bool = False) -> Path:
    """Write the adapters of `model` (an InferenceModel loaded from a LoRA checkpoint) as a PEFT LoRA folder at
    `out`, for its base's `format=hf` export; `base_model` is written as base_model_name_or_path."""
    from lmkit.hf import FAMILIES, hf_model_type  # the door, which imports this module to re-export export_peft

    if not is_adapted(model.backbone):
        raise LmkitError("format=peft writes LoRA adapters; this model has none (give a finetune=lora checkpoint, "
                         "or export it with format=hf)")
    family = FAMILIES[hf_model_type(model)]  # the base's format=hf export must exist for the adapters to apply to
    adapters = peft_adapters(model.backbone, family)
    if any(type(m.base) is not torch.nn.Linear for m in _lora_modules(model.backbone).values()):
        log.warning("format=peft: these adapters were trained on a quantized base (QLoRA); on the float base that "
                    "format=hf writes they compute the float base plus the same updates, as a merge does")
    config = adapter_config(adapters, family, dropout=_dropout(model.backbone), base_model=base_model)
    embedding_config, tensors = embedding_entries(model.backbone, family)
    config.update(embedding_config)
    for adapter in adapters:
        tensors[f"{KEY_PREFIX}{adapter.module}.lora_A.weight"] = adapter.a.contiguous()
        tensors[f"{KEY_PREFIX}{adapter.module}.lora_B.weight"] = adapter.b.contiguous()
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def peft_adapters(backbone: torch.nn.Module, family: ModuleType) -> list[PeftAdapter]:
    """lmkit's adapters as PEFT's, under the module names of the base's format=hf export: `family` (lmkit.hf.gpt2 or
    lmkit.hf.llama) maps lmkit's projections to HF's (MODULES) and, where HF splits q/k/v, their parts (QKV)."""
    cfg = backbone.config
    adapters = []
    for name, module in _lora_modules(backbone).items():
        if name == "lm_head":  # its rows past the vocabulary pad the embedding; format=hf drops them
            adapters.append(_single(module, "lm_head", rows=cfg.vocab_size))
            continue
        layer, local = _split_layer_name(name)
        prefix = family.LAYER.format(layer)
        if local == "attn.c_attn" and family.QKV:
            adapters.extend(_split(module, prefix, family.QKV))
        elif local == "attn.c_attn":
            adapters.append(_fused(module, f"{prefix}.{family.MODULES[local]}"))
        else:
            adapters.append(_single(module, f"{prefix}.{family.MODULES[local]}"))
    return adapters


def embedding_entries(backbone: torch.nn.Module, family: ModuleType) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The trained rows of the token embedding in PEFT's terms (see the module's docstring): adapter_config.json's
    entries, and the tensors (under KEY_PREFIX)."""
    hf = family.EMBEDDING
    embedding = backbone.transformer.wte
    vocab = backbone.config.vocab_size  # (format=hf drops the rows that pad a vocabulary)
    if isinstance(embedding, TrainableTokens):
        ids, rows = embedding.ids.tolist(), embedding.rows.detach().float()
    elif embedding.weight.requires_grad:  # finetune.train_embeddings: every row
        ids, rows = list(range(vocab)), embedding.weight.detach().float()[:vocab]
        if not backbone.config.tie_weights:
            return {"modules_to_save": [hf.rpartition(".")[2]]}, {f"{KEY_PREFIX}{hf}.weight": rows.contiguous()}
    else:
        return {}, {}
    key = f"{KEY_PREFIX}{hf}.token_adapter.trainable_tokens_delta"  # (the rows' values, not a difference)
    return {"trainable_token_indices": ids}, {key: rows.contiguous()}


def adapter_config(adapters: list[PeftAdapter], family: ModuleType, *, dropout: float,
                   base_model: str | None) -> dict[str, Any]:
    """adapter_config.json: the most common rank and alpha as `r` and `lora_alpha`, any other module's (GPT-2's
    fused c_attn) in `rank_pattern` / `alpha_pattern`, keyed by the target_modules entry."""
    targets = sorted({_target(a.module) for a in adapters})
    r, alpha = _most_common([(a.r, a.alpha) for a in adapters])
    rank_pattern = {_target(a.module): a.r for a in adapters if a.r != r}
    alpha_pattern = {_target(a.module): a.alpha for a in adapters if a.alpha != alpha}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets, "bias": "none",
        "fan_in_fan_out": family.CONV1D,  # GPT-2's Conv1D stores its weight (in, out)
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "trainable_token_indices": None,
        "layers_to_transform": None,
    }


def _lora_modules(backbone: torch.nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in backbone.named_modules() if isinstance(m, LoRALinear)}


def _split_layer_name(name: str) -> tuple[int, str]:
    """`transformer.h.3.attn.c_attn` (lmkit.hf.folder.BLOCK) -> (3, "attn.c_attn")."""
    layer, local = name.removeprefix(BLOCK.format("")).split(".", 1)
    return int(layer), local


def _target(module: str) -> str:
    """The target_modules entry of an HF module: its name within the layer (lm_head: itself). The parent is kept as
    the short name is ambiguous (attn.c_proj against mlp.c_proj), and PEFT matches an entry against the end of each
    module's name."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 else module


def _alpha(module: LoRALinear) -> float:
    return module.scale * next(iter(module.lora_a.values())).shape[0]


def _single(module: LoRALinear, hf_name: str, rows: int | None = None) -> PeftAdapter:
    a, b = module.lora_a["w"].detach().float(), module.lora_b["w"].detach().float()
    return PeftAdapter(hf_name, a, b[:rows], _alpha(module))


def _split(module: LoRALinear, prefix: str, qkv: dict[str, str]) -> list[PeftAdapter]:
    """Llama's q_proj, k_proj, v_proj: one adapter per adapted part, as lmkit holds them."""
    return [PeftAdapter(f"{prefix}.{qkv[part]}", module.lora_a[part].detach().float(),
                        module.lora_b[part].detach().float(), _alpha(module)) for part in module.lora_a]


def _fused(module: LoRALinear, hf_name: str) -> PeftAdapter:
    """GPT-2's c_attn: the parts' pairs as one adapter of rank parts * r (see the module's docstring)."""
    adapted = [p for p in module.parts if p in module.lora_a]
    r = module.lora_a[adapted[0]].shape[0]
    a = torch.cat([module.lora_a[p].detach().float() for p in adapted])
    b = torch.zeros(module.out_features, r * len(adapted))
    row = 0
    for part, rows in module.parts.items():
        if part in module.lora_a:
            column = adapted.index(part) * r
            b[row:row + rows, column:column + r] = module.lora_b[part].detach().float()
        row += rows
    return PeftAdapter(hf_name, a, b, _alpha(module) * len(adapted))


def _dropout(backbone: torch.nn.Module) -> float:
    return next(iter(_lora_modules(backbone).values())).dropout.p


def _most_common(pairs: list[tuple[int, float]]) -> tuple[int, float]:
    return max(set(pairs), key=lambda pair: (pairs.count(pair), -pair[0]))


def hf_source_of_base(checkpoint_path: str | Path) -> str | None:
    """The Hugging Face folder a LoRA checkpoint's base was imported from (`lmkit import-hf`), or None: that folder is
    the model the adapters apply to, so it is the base_model_name_or_path to write. A base trained in lmkit has no
    such folder until `format=hf` writes one, wherever the user chooses."""
    base = read_checkpoint(checkpoint_path, weights=False).get("lmkit", {}).get("lora_base") or {}
    if not base.get("path") or not (Path(base["path"]) / "config.json").is_file():
        return None
    source = ModelRecord.from_file(base["path"]).source or {}
    return source.get("hf")
