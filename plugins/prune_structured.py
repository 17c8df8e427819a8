"""`prune_structured`: remove whole FFN neurons, attention heads or recurrent hidden units.

The least important units (by weight magnitude: the norm of what a unit reads times the norm of
what it writes) are cut out and the layers rebuilt smaller, so the model has fewer parameters and
runs faster with ordinary dense kernels. `amount` is the fraction of the model's parameters to
remove (at least): the plan is the smallest cut that gets there. A short recovery fine-tune follows.

- Transformer: the same fraction of the MLP neurons and (with `heads`) of the attention heads in
  every layer, at least one head kept; embeddings stay. Kept widths are multiples of 8 (fast kernels). The new widths are per-layer config keys (`layer_ffn`,
  `layer_heads`), so the artifact is an ordinary model with a different config.json.
- LSTM/GRU: `nn.LSTM` needs one hidden size for all layers, so every layer keeps the same number
  of units (its own most important ones). With a tied head and no projection the last layer's
  units are the embedding's dimensions: those are cut from the embedding, the head and the first
  layer's input too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn

from lmkit.backbones import LSTMConfig, TransformerConfig, build_backbone
from lmkit.errors import LmkitError
from lmkit.plugins import CompressContext, Plugin


def multiple_of_8(n: float) -> int:
    """Kept widths round down to a multiple of 8: odd widths fall off the fast GEMM paths, so a pruned
    model could run slower than the wider one it came from (bench/README.md, prune_structured)."""
    return max(8, int(n) // 8 * 8)


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in their original order."""
    return scores.topk(keep).indices.sort().values


def gate_rows(units: torch.Tensor, hidden: int, gates: int) -> torch.Tensor:
    """Rows of a stacked-gate weight (gates * hidden, ...) that belong to `units`."""
    return torch.cat([g * hidden + units for g in range(gates)])


@torch.no_grad()
def shrink_transformer(state: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    """Cut each layer down to `cfg.layer_ffn` neurons and `cfg.layer_heads` heads, the most important."""
    n_layer, d = cfg.n_layer, cfg.head_dim
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        # MLP neurons: what each reads (c_fc row) times what it writes (c_proj column)
        fc, proj = state[p + "mlp.c_fc.weight"], state[p + "mlp.c_proj.weight"]
        neuron_scores = fc.norm(dim=1) * proj.norm(dim=0)
        kept = keep_top(neuron_scores, cfg.layer_ffn[i])
        state[p + "mlp.c_fc.weight"], state[p + "mlp.c_proj.weight"] = fc[kept], proj[:, kept]
        if p + "mlp.c_fc.bias" in state:
            state[p + "mlp.c_fc.bias"] = state[p + "mlp.c_fc.bias"][kept]
        # attention heads: the norm of a head's q, k, v rows times that of its output columns
        attn, out = state[p + "attn.c_attn.weight"], state[p + "attn.c_proj.weight"]
        n_head = out.size(1) // d
        inner = n_head * d
        per_head = lambda t: t.reshape(n_head, -1).norm(dim=1)  # noqa: E731
        head_scores = (sum(per_head(attn[j * inner:(j + 1) * inner]) ** 2 for j in range(3)).sqrt()
                       * per_head(out.t().contiguous()))
        kept_heads = keep_top(head_scores, cfg.layer_heads[i])
        cols = torch.cat([h * d + torch.arange(d) for h in kept_heads.tolist()])
        rows = torch.cat([j * inner + cols for j in range(3)])
        state[p + "attn.c_attn.weight"], state[p + "attn.c_proj.weight"] = attn[rows], out[:, cols]
        if p + "attn.c_attn.bias" in state:
            state[p + "attn.c_attn.bias"] = state[p + "attn.c_attn.bias"][rows]
    return state


@torch.no_grad()
def shrink_rnn(state: dict[str, torch.Tensor], cfg: LSTMConfig, keep: int,
               tied_to_embedding: bool) -> dict[str, torch.Tensor]:
    """Keep the `keep` most important hidden units of every layer (the embedding's dimensions too when tied)."""
    n_layer = cfg.n_layer
    gates = 4 if cfg.cell == "lstm" else 3
    hidden = state["rnn.weight_hh_l0"].size(1)
    units = []
    for layer in range(n_layer):
        w_ih, w_hh = state[f"rnn.weight_ih_l{layer}"], state[f"rnn.weight_hh_l{layer}"]
        reads = w_ih.reshape(gates, hidden, -1).norm(dim=(0, 2)) ** 2 + w_hh.reshape(gates, hidden, -1).norm(dim=(0, 2)) ** 2
        nxt = state[f"rnn.weight_ih_l{layer + 1}"] if layer + 1 < n_layer else (
            state["proj.weight"] if "proj.weight" in state else state["head.weight"])
        writes = w_hh.norm(dim=0) ** 2 + nxt.norm(dim=0) ** 2
        if layer == n_layer - 1 and tied_to_embedding:  # these units are the embedding's dimensions
            writes = writes + state["embedding.weight"].norm(dim=0) ** 2 + state["rnn.weight_ih_l0"].norm(dim=0) ** 2
        units.append(keep_top(reads.sqrt() * writes.sqrt(), keep))
    for layer, kept in enumerate(units):
        rows = gate_rows(kept, hidden, gates)
        state[f"rnn.weight_hh_l{layer}"] = state[f"rnn.weight_hh_l{layer}"][rows][:, kept]
        for name in (f"rnn.bias_ih_l{layer}", f"rnn.bias_hh_l{layer}"):
            if name in state:
                state[name] = state[name][rows]
        w_ih = state[f"rnn.weight_ih_l{layer}"][rows]
        inputs = units[layer - 1] if layer > 0 else (units[-1] if tied_to_embedding else None)
        state[f"rnn.weight_ih_l{layer}"] = w_ih[:, inputs] if inputs is not None else w_ih
    last = units[-1]
    if tied_to_embedding:
        state["embedding.weight"] = state["embedding.weight"][:, last]
        state["head.weight"] = state["embedding.weight"]
    else:
        reader = "proj.weight" if "proj.weight" in state else "head.weight"
        state[reader] = state[reader][:, last]
    return state


def transformer_plan(cfg: TransformerConfig, budget: int, heads: bool) -> TransformerConfig:
    """The smallest uniform cut (neurons and heads) that brings the model within `budget` parameters."""
    ffn = [cfg.ffn(i) for i in range(cfg.n_layer)]
    head_counts = [cfg.heads(i) for i in range(cfg.n_layer)]
    for percent in range(0, 96):
        cut = percent / 100
        plan = replace(cfg, layer_ffn=[min(f, multiple_of_8(f * (1 - cut))) for f in ffn],
                       layer_heads=[max(1, round(h * (1 - cut))) if heads else h for h in head_counts])
        if plan.num_parameters() <= budget:
            return plan
    raise LmkitError("compression.prune_structured: the amount asks for more than cutting 95% of every layer removes")


def rnn_plan(cfg: LSTMConfig, budget: int, tied_to_embedding: bool) -> tuple[LSTMConfig, int]:
    """The widest hidden size (a multiple of 8) whose model fits in `budget` parameters."""
    hidden = cfg.hidden_size or cfg.n_embd
    for keep in [hidden, *range(hidden // 8 * 8, 7, -8)]:
        plan = replace(cfg, n_embd=keep, hidden_size=None) if tied_to_embedding else replace(cfg, hidden_size=keep)
        if not tied_to_embedding and cfg.tie_weights and keep == cfg.n_embd:
            continue  # the tied head needs its projection, which hidden == n_embd would drop
        if plan.num_parameters() <= budget:
            return plan, keep
    raise LmkitError("compression.prune_structured: the amount asks for fewer than 8 hidden units")


class PruneStructured(Plugin):
    name = "prune_structured"
    finetunes = True
    summary = "removes FFN neurons, attention heads and LSTM hidden units: a smaller dense model, no sparse kernels needed"
    defaults = {"amount": 0.3, "heads": True, "finetune_steps": 200, "finetune_lr": None}

    def check(self) -> None:
        s = self.settings
        if not 0 <= s["amount"] < 1:
            raise LmkitError(f"compression.prune_structured.amount={s['amount']} must be in [0, 1)")
        if s["finetune_steps"] < 0:
            raise LmkitError(f"compression.prune_structured.finetune_steps={s['finetune_steps']} must be >= 0")

    def apply(self, model: Any, context: CompressContext) -> dict[str, Any]:
        cfg = model.record.backbone
        state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        budget = int((1 - self.settings["amount"]) * cfg.num_parameters())
        if isinstance(cfg, TransformerConfig):
            cfg = transformer_plan(cfg, budget, self.settings["heads"])
            state = shrink_transformer(state, cfg)
        elif isinstance(cfg, LSTMConfig):
            backbone = model.backbone
            tied = backbone.proj is None and backbone.head.weight is backbone.embedding.weight
            cfg, keep = rnn_plan(cfg, budget, tied)
            state = shrink_rnn(state, cfg, keep, tied)
        else:
            raise LmkitError(f"compression.prune_structured does not know the {cfg.kind} backbone")
        smaller = build_backbone(cfg).to(model.device)
        smaller.load_state_dict(state, strict=True)
        model.backbone = smaller.eval()
        model.record = model.record.replace(backbone=cfg)
        context.finetune(model, steps=self.settings["finetune_steps"], lr=self.settings["finetune_lr"])
        return {"finetuned_steps": self.settings["finetune_steps"]}
