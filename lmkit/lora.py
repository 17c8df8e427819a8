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

Token embeddings can train beside the adapters: every row (`train_embeddings`, PEFT's `modules_to_save`), or the rows
of named tokens only (`trainable_tokens`, PEFT's `trainable_token_indices`), which a frozen base cannot otherwise move:
the tokens a new domain leans on, or tokens added for a chat format. A tied head is the same tensor and moves with
them, as in full fine-tuning and as PEFT ties them: a token's input and output rows stay one. An untied head is a
projection like the others (`head` in targets). A LoRA checkpoint keeps whatever trains (the adapters and those rows),
never the rest of the base.

QLoRA's base is quantized as it is read (`quantized_base`): built on the meta device, then filled and quantized one
part at a time (a block; then the embedding, norm and head), so no moment holds the whole float model.
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
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmkit.errors import LmkitError

if TYPE_CHECKING:
    from lmkit.parallel.materialize import PretrainedTensors

log = logging.getLogger("lmkit")

TARGETS = ("q", "k", "v", "o", "mlp", "head")  # o: attention's output projection; mlp: every MLP projection
BASES = ("int4", "int8")  # the plugins a QLoRA base may be quantized with
# `finetune` keys that say what the model learns, not what trains (lmkit.preference checks them)
OBJECTIVE_KEYS = ("objective", "beta", "label_smoothing", "reference", "sft_weight")


@dataclass(frozen=True)
class LoRASettings:
    """The `finetune=lora` config group, checked."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q", "k", "v", "o", "mlp")
    base: str | None = None  # None: a float base; int4 | int8: QLoRA, the base quantized by that plugin
    train_embeddings: bool = False  # every row of the token embedding trains too (a tied head with it)
    trainable_tokens: tuple[int | str, ...] = ()  # or only these tokens' rows: token texts or ids

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LoRASettings:
        options = {k: v for k, v in cfg.items() if k != "kind" and k not in OBJECTIVE_KEYS}
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise LmkitError(f"finetune.{unknown[0]} is not a LoRA setting ({', '.join(cls.__dataclass_fields__)})")
        settings = cls(**{**options, "targets": tuple(options.get("targets", cls.targets)),
                          "trainable_tokens": tuple(options.get("trainable_tokens") or ())})
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
        if not isinstance(settings.train_embeddings, bool):
            raise LmkitError(f"finetune.train_embeddings={settings.train_embeddings!r} must be true or false")
        for token in settings.trainable_tokens:
            if isinstance(token, bool) or not isinstance(token, (int, str)) or token == "" or \
                    isinstance(token, int) and token < 0:
                raise LmkitError(f"finetune.trainable_tokens: {token!r} is neither a token's text nor a token id")
        if settings.train_embeddings and settings.trainable_tokens:
            raise LmkitError("finetune.train_embeddings=true trains every row of the embedding, and finetune."
                             "trainable_tokens names some: set one of them (trainable_tokens=[] or "
                             "train_embeddings=false)")
        return settings

    @property
    def trains_embeddings(self) -> bool:
        return self.train_embeddings or bool(self.trainable_tokens)


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


class TrainableTokens(nn.Module):
    """A frozen token embedding (float or quantized) whose rows `ids` are trainable values, `rows`, that start as the
    base's own (PEFT's TrainableTokensLayer): those tokens learn, the rest of the vocabulary stays as it was."""

    def __init__(self, base: nn.Module, ids: list[int]) -> None:
        super().__init__()
        self.base = base
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        index = torch.tensor(ids, dtype=torch.long)
        slot = torch.full((self.num_embeddings,), -1, dtype=torch.long)
        slot[index] = torch.arange(len(ids))
        self.register_buffer("ids", index, persistent=False)  # (the settings and tokenizer give them again on load)
        self.register_buffer("slot", slot, persistent=False)  # each token's row of `rows`; -1: the base's
        with torch.no_grad():
            self.rows = nn.Parameter(base(index).float())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        slot = self.slot[ids]
        return torch.where((slot >= 0).unsqueeze(-1), self.rows[slot.clamp(min=0)].to(out.dtype), out)


class TokenHead(nn.Module):
    """A head tied to a TrainableTokens embedding: the trained tokens' logits come from their trained rows (the same
    Parameter as the embedding's, so the tie holds), the others' from the base head."""

    def __init__(self, base: nn.Module, tokens: TrainableTokens) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rows = tokens.rows
        self.register_buffer("ids", tokens.ids, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.base(x)
        bias = getattr(self.base, "bias", None)
        trained = F.linear(x.to(self.rows.dtype), self.rows, bias[self.ids] if bias is not None else None)
        return logits.index_copy(-1, self.ids, trained.to(logits.dtype))


def token_ids(tokens: Iterable[int | str], tokenizer: Any, vocab_size: int) -> list[int]:
    """`finetune.trainable_tokens` as ids, each once, in the order given: an id as it is; a text as the token it is in
    the tokenizer's vocabulary (a BPE entry in its own spelling, e.g. `Ġdef`, or an added special token) or the one
    token it encodes to."""
    ids = []
    for token in tokens:
        if isinstance(token, int):
            if token >= vocab_size:
                raise LmkitError(f"finetune.trainable_tokens: id {token} is outside this model's vocabulary "
                                 f"(0..{vocab_size - 1})")
            ids.append(token)
        elif tokenizer is None:
            raise LmkitError(f"finetune.trainable_tokens: {token!r} names a token by its text, and this model has no "
                             "tokenizer: give its id")
        else:
            ids.append(_token_id(tokenizer, token))
            if ids[-1] >= vocab_size:  # (a token added to the tokenizer, not to the model's embedding)
                raise LmkitError(f"finetune.trainable_tokens: {token!r} is token {ids[-1]} of the tokenizer, outside "
                                 f"this model's embedding (0..{vocab_size - 1}): resize the model's vocabulary first")
    return list(dict.fromkeys(ids))


def _token_id(tokenizer: Any, text: str) -> int:
    vocabulary = getattr(getattr(tokenizer, "tokenizer", None), "token_to_id", None)  # a BPE tokenizer's own
    found = vocabulary(text) if vocabulary is not None else None
    if found is not None:
        return found
    try:
        encoded = tokenizer.encode(text)
    except LmkitError:  # (a character tokenizer refuses characters it does not have)
        encoded = []
    if len(encoded) == 1:
        return encoded[0]
    how = f"it encodes to {len(encoded)} tokens" if encoded else "it has no such character"
    raise LmkitError(f"finetune.trainable_tokens: {text!r} is not a token of this model's tokenizer ({how}): name a "
                     "token it has, by its text or id, or add the token to the tokenizer first")


def check_adaptable(config: Any, settings: LoRASettings) -> None:
    """Refuse, in one line, a model finetune=lora cannot adapt."""
    kind = getattr(config, "kind", "?")
    if kind == "transformer":
        return
    if settings.trains_embeddings:
        key = "train_embeddings=true" if settings.train_embeddings else "trainable_tokens"
        raise LmkitError(f"finetune.{key} is part of finetune=lora, which adapts a Transformer; this model is "
                         f"model.kind={kind} (finetune=full trains its embedding with every other weight)")
    raise LmkitError(f"finetune=lora adapts a Transformer's projections; this model is model.kind={kind} "
                     "(fine-tune it with finetune=full)")


def adapt(backbone: nn.Module, settings: LoRASettings, tokenizer: Any = None) -> None:
    """Freeze `backbone`, make the token embedding's rows trainable as `settings` says (named tokens resolved by
    `tokenizer`), and wrap the projections `settings.targets` name in LoRALinear, in place."""
    cfg = getattr(backbone, "config", None)
    check_adaptable(cfg, settings)
    for p in backbone.parameters():
        p.requires_grad_(False)
    if settings.train_embeddings:
        embedding = backbone.transformer.wte
        if not isinstance(embedding, nn.Embedding):  # (quantized_base keeps it float when it trains)
            raise LmkitError("finetune.train_embeddings=true needs a float token embedding; this one is "
                             f"{type(embedding).__name__}")
        embedding.weight.requires_grad_(True)  # a tied head is the same Parameter: it moves with it
    elif settings.trainable_tokens:
        tokens = TrainableTokens(backbone.transformer.wte, token_ids(settings.trainable_tokens, tokenizer,
                                                                     cfg.vocab_size))
        backbone.transformer.wte = tokens
        if cfg.tie_weights:
            backbone.lm_head = TokenHead(backbone.lm_head, tokens)
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


def trained_names(backbone: nn.Module) -> set[str]:
    """The names of what an adapted backbone trains (its adapters, trained embedding rows), each alias of a tied one
    included: the state a LoRA checkpoint keeps."""
    return {name for name, p in backbone.named_parameters(remove_duplicate=False) if p.requires_grad}


def adapter_state(state: dict[str, Any], backbone: nn.Module, prefix: str = "backbone.") -> dict[str, Any]:
    """The entries of `state` (a LightningModule's, `backbone` under `prefix`) that train: what a LoRA checkpoint
    keeps."""
    keep = {prefix + name for name in trained_names(backbone)}
    return {k: v for k, v in state.items() if k in keep}


def parameter_counts(backbone: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters: what trains (a tied tensor once), and the base's as its config counts them (a
    quantized base holds its weights in buffers, which `parameters()` does not list) plus what adapting added."""
    trainable = sum({id(p): p.numel() for p in backbone.parameters() if p.requires_grad}.values())
    added = sum(p.numel() for m in backbone.modules() if isinstance(m, LoRALinear)
                for p in (*m.lora_a.values(), *m.lora_b.values()))
    added += sum(m.rows.numel() for m in backbone.modules() if isinstance(m, TrainableTokens))
    return trainable, backbone.config.num_parameters() + added


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
    if isinstance(module, TokenHead):
        return _dense_weight(module.base).index_copy(0, module.ids, module.rows.detach().float())
    if type(module) is nn.Linear:  # (not a subclass: bitsandbytes' Linear8bitLt is one, holding int8 codes)
        return module.weight.detach().float()
    eye = torch.eye(module.in_features)
    return (module(eye).float() - _bias(module)).t().contiguous()


def _bias(module: nn.Module) -> torch.Tensor:
    while isinstance(module, (LoRALinear, TokenHead)):
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


def quantize_base(model: Any, base: str, *, float_embedding: bool = False) -> None:
    """QLoRA's base: `model` (an InferenceModel) quantized in place by lmkit's `base` plugin (`quantized_base`)."""
    model.backbone = quantized_base(model.backbone, base, float_embedding=float_embedding)


def quantized_base(backbone: nn.Module, base: str, *, float_embedding: bool = False,
                   pretrained: PretrainedTensors | None = None) -> nn.Module:
    """QLoRA's frozen base: `backbone` (a Transformer) with its weights quantized by lmkit's `base` plugin (int4,
    int8), part by part: each block, then the rest (token and position embeddings, final norm, head), as the plugin
    quantizes a whole model; the token embedding stays float where it trains (`float_embedding`; a tied head with it).

    With `pretrained` (init_from's tensors, `lmkit.parallel.materialize.read_pretrained`), `backbone` is on the meta
    device and each part is read from those files, one tensor at a time, just before it is quantized: no moment holds
    the whole float model, only one block's weights (or the embedding) beside the parts already quantized."""
    from lmkit.inference import InferenceModel
    from lmkit.parallel.materialize import fill_part, reset_meta_buffers
    from lmkit.plugins import make
    from lmkit.record import ModelRecord

    plugin = make(base)
    plugin.check_model(InferenceModel(backbone, None, ModelRecord(backbone=backbone.config)))
    blocks = backbone.transformer.h
    for i in range(len(blocks)):
        if pretrained is not None:
            fill_part(blocks[i], pretrained, f"transformer.h.{i}.")
        blocks[i] = plugin.quantize_part(blocks[i])
    # the rest, quantized together so that a tied head keeps sharing its embedding's quantized weight
    paths = {"wte": "transformer.wte", "wpe": "transformer.wpe", "ln_f": "transformer.ln_f", "lm_head": "lm_head"}
    kept = ({"wte", "lm_head"} if backbone.config.tie_weights else {"wte"}) if float_embedding else set()
    present = {key: path for key, path in paths.items() if _has_submodule(backbone, path)}
    for keys, quantize in (([k for k in present if k not in kept], True), ([k for k in present if k in kept], False)):
        part = nn.ModuleDict({key: backbone.get_submodule(present[key]) for key in keys})
        if pretrained is not None:
            fill_part(part, pretrained, lambda name: present[name.split(".")[0]] + name[name.index("."):])
        if quantize and keys:
            part = plugin.quantize_part(part)
        for key in keys:
            owner, _, leaf = present[key].rpartition(".")
            setattr(backbone.get_submodule(owner), leaf, part[key])
    if pretrained is not None:
        reset_meta_buffers(backbone)  # the RoPE / sinusoid tables, computed
    return backbone


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def lora_settings(finetune: dict[str, Any], init_from: str | None) -> LoRASettings | None:
    """The `finetune` group's LoRA settings (None for a full fine-tune), refused without a base to adapt."""
    kind = finetune.get("kind")
    if kind not in ("full", "lora"):
        raise LmkitError(f"finetune.kind={kind!r} is not one of full, lora")
    if kind == "full":
        extra = [key for key in ("train_embeddings", "trainable_tokens") if finetune.get(key)]
        if extra:
            raise LmkitError(f"finetune.{extra[0]} is a finetune=lora setting; finetune=full trains every weight "
                             "already, the embedding's included")
        return None
    settings = LoRASettings.from_config(finetune)
    if not init_from:
        raise LmkitError("finetune=lora trains adapters on a pretrained model: give init_from=PATH (an lmkit model "
                         "folder or checkpoint, e.g. one `lmkit import-hf` wrote)")
    return settings


def attach(module: Any, lora: LoRASettings, *, base: str, base_fingerprint: str | None = None,
           pretrained: PretrainedTensors | None = None) -> None:
    """Freeze the base in `module` (a LitLanguageModel; quantized first for QLoRA), make its embedding rows trainable
    and wrap its projections in trainable adapters as `lora` says, and record the base's path and fingerprint for its
    checkpoints (`base_fingerprint`: that of a base on the meta device, read later into shards or, with `pretrained`,
    now, quantized part by part as it is read: QLoRA)."""
    check_adaptable(module.backbone.config, lora)
    module.lora_base = {"path": str(Path(base).resolve()),
                        "fingerprint": base_fingerprint or fingerprint(module.backbone)}
    if lora.base is not None:
        module.backbone = quantized_base(module.backbone, lora.base, float_embedding=lora.train_embeddings,
                                         pretrained=pretrained)
    adapt(module.backbone, lora, module.tokenizer)
    trainable, total = parameter_counts(module.backbone)
    embeddings = (", every embedding row" if lora.train_embeddings else
                  f", the rows of {len(lora.trainable_tokens)} tokens" if lora.trainable_tokens else "")
    log.info("LoRA (r=%d on %s%s%s): %s of %s parameters train (%.2f%%)", lora.r, ",".join(lora.targets), embeddings,
             f", {lora.base} base" if lora.base else "", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
