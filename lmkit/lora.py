"""LoRA (Hu et al. 2021): low-rank adapters trained on a frozen model; QLoRA (Dettmers et al. 2023): the same on a
base that lmkit's own int4 (or int8) plugin has quantized.

Each adapted projection computes `base(x) + alpha / r * B @ A @ dropout(x)`; only A and B train, and B starts at
zero, so training starts from the base model exactly. The fused q/k/v projection gets one A/B pair per part
(`q`, `k`, `v`, as Hugging Face's separate q_proj, k_proj, v_proj would), each adding to its own rows.

Written here (about a hundred lines) rather than taken from peft: peft needs transformers and accelerate at run
time, cannot wrap lmkit's quantized layers, and re-quantizes a QLoRA base when it merges (DESIGN.md, LoRA).
Merging here dequantizes: the merged model is dense, `dequantized base + B @ A`, the function the adapters were
trained on. An adapter on a tied head adds to the head only, so a merge unties the head from the embedding
(and says so) rather than move the embedding too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmkit.errors import LmkitError

log = logging.getLogger("lmkit")

TARGETS = ("q", "k", "v", "o", "mlp", "head")  # o: attention's output projection; mlp: every MLP projection
BASES = ("int4", "int8")  # the plugins a QLoRA base may be quantized with


@dataclass(frozen=True)
class LoRASettings:
    """The `finetune=lora` config group, checked."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q", "k", "v", "o", "mlp")
    base: str | None = None  # None: a float base; int4 | int8: QLoRA, the base quantized by that plugin

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LoRASettings:
        options = {k: v for k, v in cfg.items() if k != "kind"}
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise LmkitError(f"finetune.{unknown[0]} is not a LoRA setting ({', '.join(cls.__dataclass_fields__)})")
        settings = cls(**{**options, "targets": tuple(options.get("targets", cls.targets))})
        if not isinstance(settings.r, int) or settings.r < 1:
            raise LmkitError(f"finetune.r={settings.r!r} must be an integer of at least 1")
        if isinstance(settings.alpha, bool) or not isinstance(settings.alpha, (int, float)) or settings.alpha <= 0:
            raise LmkitError(f"finetune.alpha={settings.alpha!r} must be a positive number")
        if not 0 <= settings.dropout < 1:
            raise LmkitError(f"finetune.dropout={settings.dropout!r} must be in [0, 1)")
        bad = [t for t in settings.targets if t not in TARGETS]
        if bad or not settings.targets:
            raise LmkitError(f"finetune.targets={list(settings.targets)!r}: each must be one of {', '.join(TARGETS)}")
        if settings.base not in (None, *BASES):
            raise LmkitError(f"finetune.base={settings.base!r} is not one of null (a float base), int4, int8")
        return settings


class LoRALinear(nn.Module):
    """A frozen linear-like `base` (nn.Linear, or a quantized plugin layer) plus low-rank updates of its output
    `parts` (name -> rows), of which those in `adapted` get an A/B pair."""

    def __init__(self, base: nn.Module, parts: dict[str, int], adapted: list[str], r: int, alpha: float,
                 dropout: float) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.parts = dict(parts)
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        ref = next(itertools.chain(base.parameters(), base.buffers()), None)
        device = ref.device if ref is not None else None  # (the meta device, for a base built there)
        self.lora_a = nn.ParameterDict({p: nn.Parameter(torch.empty(r, self.in_features, device=device))
                                        for p in adapted})
        self.lora_b = nn.ParameterDict({p: nn.Parameter(torch.empty(parts[p], r, device=device)) for p in adapted})
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if ".lora_" not in f".{name}" or parameter.is_meta:
                    continue
                self.init_parameter(name, parameter)

    def init_parameter(self, name: str, value: torch.Tensor) -> None:
        """An adapter's initial value: A as nn.Linear initialises its weight (and peft its A), B zero, so training
        starts from the base exactly. (A base's parameters are its model's to initialise.)"""
        if name.startswith("lora_a."):
            nn.init.kaiming_uniform_(value, a=math.sqrt(5))
        elif name.startswith("lora_b."):
            nn.init.zeros_(value)
        else:
            raise LookupError(f"{name} is the base's, not the adapter's")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x)
        updates = [F.linear(F.linear(h, self.lora_a[p]), self.lora_b[p]) if p in self.lora_a else
                   h.new_zeros(*h.shape[:-1], rows) for p, rows in self.parts.items()]
        update = updates[0] if len(updates) == 1 else torch.cat(updates, dim=-1)
        return self.base(x) + self.scale * update.to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update as a weight (out, in): what a merge adds to the base's."""
        a = next(iter(self.lora_a.values()))
        rows = [self.lora_b[p] @ self.lora_a[p] if p in self.lora_a else a.new_zeros(n, self.in_features)
                for p, n in self.parts.items()]
        return self.scale * torch.cat(rows)


def adapt(backbone: nn.Module, settings: LoRASettings) -> None:
    """Freeze `backbone` and wrap the projections `settings.targets` name in LoRALinear, in place."""
    cfg = getattr(backbone, "config", None)
    if getattr(cfg, "kind", None) != "transformer":
        raise LmkitError(f"finetune=lora adapts a Transformer's projections; this model is model.kind="
                         f"{getattr(cfg, 'kind', '?')} (fine-tune it with finetune=full)")
    for p in backbone.parameters():
        p.requires_grad_(False)
    wrap = dict(r=settings.r, alpha=settings.alpha, dropout=settings.dropout)
    targets = set(settings.targets)
    for block in backbone.transformer.h:
        attn = block.attn
        qkv = [p for p in ("q", "k", "v") if p in targets]
        if qkv:
            q = attn.n_head * attn.head_dim
            kv = q // attn.kv_group
            attn.c_attn = LoRALinear(attn.c_attn, {"q": q, "k": kv, "v": kv}, qkv, **wrap)
        if "o" in targets:
            attn.c_proj = LoRALinear(attn.c_proj, {"w": attn.c_proj.out_features}, ["w"], **wrap)
        if "mlp" in targets:
            for name, layer in list(block.mlp.named_children()):
                if hasattr(layer, "in_features"):
                    setattr(block.mlp, name, LoRALinear(layer, {"w": layer.out_features}, ["w"], **wrap))
    if "head" in targets:
        backbone.lm_head = LoRALinear(backbone.lm_head, {"w": backbone.lm_head.out_features}, ["w"], **wrap)


def is_adapted(backbone: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in backbone.modules())


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters' entries of a state dict: what a LoRA checkpoint keeps."""
    return {k: v for k, v in state.items() if ".lora_a." in k or ".lora_b." in k}


def parameter_counts(backbone: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters: the adapters', and the base's as its config counts them (a quantized base
    holds its weights in buffers, which `parameters()` does not list) plus the adapters'."""
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    return trainable, backbone.config.num_parameters() + trainable


def fingerprint(backbone: nn.Module) -> str:
    """A short hash of a model's weights: a LoRA checkpoint names its base by path, and checks it by this."""
    return fingerprint_of(sorted(backbone.state_dict().items()))


def fingerprint_of(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """`fingerprint` of (name, tensor) pairs in name order, read one at a time (a base that no rank holds whole)."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def merge(backbone: nn.Module) -> nn.Module:
    """A plain float backbone computing what the adapted one computes: every layer dequantized (a QLoRA base),
    each adapter's B @ A added to its base's weight. The adapted backbone is left as it is."""
    from lmkit.backbones import build_backbone

    cfg = backbone.config
    untied = cfg.tie_weights and isinstance(backbone.lm_head, LoRALinear)
    if untied:
        cfg = dataclasses.replace(cfg, tie_weights=False)
    dense = build_backbone(cfg)
    modules = dict(backbone.named_modules())
    state = {}
    with torch.no_grad():
        for name, target in dense.named_modules():
            source = modules.get(name)
            if isinstance(target, nn.Linear):
                state[f"{name}.weight"] = _dense_weight(source)
                if target.bias is not None:
                    state[f"{name}.bias"] = _bias(source)
            elif isinstance(target, nn.Embedding):  # a quantized one's rows, dequantized
                state[f"{name}.weight"] = source(torch.arange(target.num_embeddings)).float()
            elif not list(target.children()):  # norms
                for key, _ in target.named_parameters(recurse=False):
                    state[f"{name}.{key}"] = getattr(source, key).detach().float()
    dense.load_state_dict(state, strict=True)
    if untied:
        log.info("LoRA merge: the head's adapter unties it from the embedding (model.tie_weights=false); the "
                 "embedding stays the base's")
    return dense.eval()


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The float weight (out, in) of a linear-like module: an nn.Linear's own, a LoRALinear's base plus its update,
    or what a quantized layer computes on the identity (its dequantized weight, with no bias)."""
    if isinstance(module, LoRALinear):
        return _dense_weight(module.base) + module.delta_weight()
    if type(module) is nn.Linear:  # (not a subclass: bitsandbytes' Linear8bitLt is one, holding int8 codes)
        return module.weight.detach().float()
    eye = torch.eye(module.in_features)
    return (module(eye).float() - _bias(module)).t().contiguous()


def _bias(module: nn.Module) -> torch.Tensor:
    if isinstance(module, LoRALinear):
        module = module.base
    bias = getattr(module, "bias", None)
    return bias.detach().float() if bias is not None else torch.zeros(module.out_features)


def merged(model: Any) -> Any:
    """An InferenceModel with adapters as the dense InferenceModel it computes (its record's shape updated); any
    other model as it is. What every export of a LoRA checkpoint writes (format=peft aside)."""
    if not is_adapted(model.backbone):
        return model
    from lmkit.inference import InferenceModel

    backbone = merge(model.backbone)
    record = model.record.replace(backbone=backbone.config, compression=[])
    return InferenceModel(backbone, model.tokenizer if model.has_tokenizer else None, record)


def quantize_base(model: Any, base: str) -> None:
    """QLoRA's base: `model` (an InferenceModel) quantized in place by lmkit's `base` plugin, which checks it can."""
    from lmkit.plugins import CompressContext, make

    plugin = make(base)
    plugin.check_model(model)
    plugin.apply(model, CompressContext(cache_dir=""))  # (int4 and int8 read no corpus)


def lora_settings(finetune: dict[str, Any], init_from: str | None) -> LoRASettings | None:
    """The `finetune` group's LoRA settings (None for a full fine-tune), refused without a base to adapt."""
    kind = finetune.get("kind")
    if kind not in ("full", "lora"):
        raise LmkitError(f"finetune.kind={kind!r} is not one of full, lora")
    if kind == "full":
        return None
    settings = LoRASettings.from_config(finetune)
    if not init_from:
        raise LmkitError("finetune=lora trains adapters on a pretrained model: give init_from=PATH (an lmkit model "
                         "folder or checkpoint, e.g. one `lmkit import-hf` wrote)")
    return settings


def attach(module: Any, lora: LoRASettings, *, base: str, base_fingerprint: str | None = None) -> None:
    """Freeze the base loaded into `module` (a LitLanguageModel; quantized first for QLoRA), wrap its projections in
    trainable adapters, and record the base's path and fingerprint for its checkpoints (`base_fingerprint`: that
    of a base still on the meta device, to be read into shards)."""
    from lmkit.inference import InferenceModel

    module.lora_base = {"path": str(Path(base).resolve()),
                        "fingerprint": base_fingerprint or fingerprint(module.backbone)}
    if lora.base is not None:
        model = InferenceModel(module.backbone, module.tokenizer, module.record)
        quantize_base(model, lora.base)
        module.backbone = model.backbone
    adapt(module.backbone, lora)
    trainable, total = parameter_counts(module.backbone)
    log.info("LoRA (r=%d on %s%s): %s of %s parameters train (%.2f%%)", lora.r, ",".join(lora.targets),
             f", {lora.base} base" if lora.base else "", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
