"""`prune_structured`: remove whole FFN neurons, attention heads or recurrent hidden units.

In the Llama block the units are a SwiGLU unit (its gate row, its up row and its down column
together) and a key/value group (a kv head with the n_head / n_kv_head query heads it serves: their
q, k and v rows and the query heads' output-projection columns), so the block stays a valid
grouped-query block; with plain multi-head attention a group is one head.

The least important units are cut out and the layers rebuilt smaller, so the model has fewer
parameters and runs faster with ordinary dense kernels. `amount` is the fraction of the model's
parameters to remove (at least). Importance (`criterion`):

- `activation` (default): measured on `calibration_windows` windows of the model's training split:
  the energy a unit adds to the residual stream (a neuron's activation, a head's output, times the
  norm of the output-projection columns it owns), or for a recurrent unit the energy its state
  sends on (to its own recurrence and to the next layer or head). These compare across layers, so
  the Transformer's layers lose different amounts: the units with the lowest importance per
  parameter go first, neurons in groups of 8 (kept widths stay multiples of 8: fast kernels), heads
  one at a time (one stays per layer).
- `magnitude`: the norm of what a unit reads times the norm of what it writes, from the weights
  alone (no corpus); the same fraction of neurons and heads in every layer.

With `activation`, the matrices that read the removed units are also refit by least squares on the
calibration activations (the Gram matrix of what they read, with a constant for the bias): what a cut
unit contributed is taken over by the kept units it correlates with, and its mean by the bias. At
30%, one-shot, this takes the default LSTM from +15.3% perplexity to +5.6%, the Transformer from
+2.6% to +1.7%.

The new widths are per-layer config keys (`layer_ffn`, `layer_heads`), so the artifact is an
ordinary model with a different config.json. `nn.LSTM` needs one hidden size for all its layers, so
every LSTM layer keeps the same number of units (its own most important ones): per-layer amounts
are the Transformer's only. The LSTM keeps the widest hidden size that fits, not a multiple of 8
(measured: 213 units run as fast as 208, batched and at batch 1). With a tied head and no
projection the last layer's units are the embedding's dimensions: those are cut from the
embedding, the head and the first layer's input too.

Then a short recovery (`finetune_steps`), by fine-tuning or by distillation from the unpruned model,
at a learning rate and KL weight measured best for the backbone (RECOVERY) unless given.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn

from lmkit.backbones import LSTMConfig, TransformerConfig, build_backbone
from lmkit.errors import LmkitError
from lmkit.plugins import CompressContext, Plugin, Teacher
from lmkit.builtin_plugins.calibrate import collect


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


# Recovery measured best at amount=0.3 on the default models (bench/README.md, prune_structured): the LSTM loses far
# more to the cut (+5.6% one-shot, the Transformer +1.7%) and recovers best at half its trained peak learning rate,
# the KL weighing 0.9 (+2.6%; +3.6% at the Transformer's settings, which keep the Transformer at +0.06%; +0.6% at the
# LSTM's). Without a recorded optimizer the fine-tune's own default applies (a tenth of conf/optim/adamw.yaml's).
RECOVERY = {"transformer": {"lr_fraction": 0.1, "distill_weight": 0.5},
            "lstm": {"lr_fraction": 0.5, "distill_weight": 0.9}}
DAMP = 0.01  # of the Gram matrix's mean diagonal, as SparseGPT damps its Hessian


def least_squares(weight: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """W C G^-1: the weight over new inputs x' whose outputs best match `weight`'s over the old inputs x
    on the calibration tokens, for cross C = sum x x'^T and gram G = sum x' x'^T (damped)."""
    gram = gram.double().clone()
    gram.diagonal().add_(DAMP * gram.diagonal().mean())
    return torch.linalg.solve(gram, (weight.double() @ cross.double()).t()).t().to(weight.dtype)


def refit(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor,
          kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`weight` (and `bias`) cut down to the `kept` input columns, refit so their outputs stay closest to
    the full weight's over the calibration inputs. `gram` is the inputs' affine Gram matrix (of [x, 1]):
    with a bias, the mean of what the removed columns contributed moves into it."""
    if bias is None:
        return least_squares(weight, gram[:-1, kept], gram[kept][:, kept]), None
    cols = torch.cat([kept, kept.new_tensor([gram.size(0) - 1])])
    new = least_squares(torch.cat([weight, bias[:, None]], dim=1), gram[:, cols], gram[cols][:, cols])
    return new[:, :-1].contiguous(), new[:, -1].contiguous()


def mlp_inputs(cfg: TransformerConfig) -> tuple[str, ...]:
    """The MLP's projections whose rows are its units: c_fc, or SwiGLU's gate and up."""
    return ("mlp.gate", "mlp.up") if cfg.mlp == "swiglu" else ("mlp.c_fc",)


def unit_reads(state: dict[str, torch.Tensor], prefix: str, cfg: TransformerConfig) -> torch.Tensor:
    """How strongly each MLP unit reads the residual stream: the norm of its c_fc row, or for a SwiGLU unit
    the product of its gate and up rows' norms (its output silu(g.x) * (u.x) grows with both at once)."""
    norms = [state[f"{prefix}{name}.weight"].norm(dim=1) for name in mlp_inputs(cfg)]
    return norms[0] if len(norms) == 1 else norms[0] * norms[1]


def group_reads(attn: torch.Tensor, cfg: TransformerConfig, n_kv: int) -> torch.Tensor:
    """The norm of each kv group's rows of the fused [q | k | v] weight: its query heads', its k and v head's."""
    d, g = cfg.head_size, cfg.kv_group
    q, k, v = attn.split([n_kv * g * d, n_kv * d, n_kv * d])
    per_group = lambda t: t.reshape(n_kv, -1).norm(dim=1) ** 2  # noqa: E731
    return (per_group(q) + per_group(k) + per_group(v)).sqrt()


def weight_scores(state: dict[str, torch.Tensor], cfg: TransformerConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(MLP unit scores, kv group scores) of each layer from the weights alone: the norm of what a unit
    reads times the norm of what it writes."""
    out = []
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        attn_out = state[p + "attn.c_proj.weight"]
        n_kv = attn_out.size(1) // (cfg.head_size * cfg.kv_group)
        writes = attn_out.t().reshape(n_kv, -1).norm(dim=1)  # c_proj's columns, query head by query head
        out.append((unit_reads(state, p, cfg) * state[p + "mlp.c_proj.weight"].norm(dim=0),
                    group_reads(state[p + "attn.c_attn.weight"], cfg, n_kv) * writes))
    return out


def output_projections(cfg: TransformerConfig) -> list[str]:
    """The matrices that read each layer's neurons and heads: what activation scoring measures the inputs of."""
    return [f"transformer.h.{i}.{part}.c_proj.weight" for i in range(cfg.n_layer) for part in ("mlp", "attn")]


@torch.no_grad()
def measure(backbone: nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The affine Gram matrix of what each named weight reads, over the calibration windows `ids`."""
    return {name: collect(backbone, name, ids, "affine_gram") for name in names}


def energy(gram: torch.Tensor) -> torch.Tensor:
    """sum_t x_j^2 for each input j: the affine Gram matrix's diagonal without the constant."""
    return gram.diagonal()[:-1]


def activation_scores(backbone: nn.Module, cfg: TransformerConfig,
                      grams: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(MLP unit scores, kv group scores) of each layer, measured: the energy each unit adds to the residual
    stream over the calibration tokens, sum_t x_j^2 * ||W_proj[:, j]||^2 over the columns j of the
    output projection it owns (a SwiGLU unit's x_j is its gated product, silu(g.x) * (u.x); a kv group owns
    its query heads' columns). Units of different layers and kinds compare in the same currency."""
    names = output_projections(cfg)
    per_column = [energy(grams[name]) * backbone.get_parameter(name).detach().pow(2).sum(0) for name in names]
    return [(neurons, columns.view(-1, cfg.head_size * cfg.kv_group).sum(1))
            for neurons, columns in zip(per_column[0::2], per_column[1::2])]


@torch.no_grad()
def cut_columns(state: dict[str, torch.Tensor], weight: str, kept: torch.Tensor,
                grams: dict[str, torch.Tensor] | None) -> None:
    """Keep the `kept` input columns of `state[weight]`: refit with its bias when its inputs were
    measured, cut plainly otherwise."""
    if grams is None:
        state[weight] = state[weight][:, kept]
        return
    module, _, attr = weight.rpartition(".")
    bias = f"{module}.{attr.replace('weight', 'bias', 1)}"  # c_proj.weight: c_proj.bias; rnn.weight_hh_l0: rnn.bias_hh_l0
    state[weight], new_bias = refit(state[weight], state.get(bias), grams[weight], kept)
    if new_bias is not None:
        state[bias] = new_bias


def cut_rows(state: dict[str, torch.Tensor], module: str, rows: torch.Tensor) -> None:
    """Keep the `rows` outputs of `module`'s weight (and bias)."""
    for name in (f"{module}.weight", f"{module}.bias"):
        if name in state:
            state[name] = state[name][rows]


def group_indices(kept: torch.Tensor, n_kv: int, cfg: TransformerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the fused [q | k | v] weight, columns of the output projection) of the `kept` kv groups:
    group j is kv head j and query heads j*g .. j*g+g-1."""
    d, g = cfg.head_size, cfg.kv_group
    head_span = lambda heads: torch.cat([h * d + torch.arange(d) for h in heads])  # noqa: E731
    queries = head_span([j * g + h for j in kept.tolist() for h in range(g)])
    kv = head_span(kept.tolist())
    inner = n_kv * g * d
    return torch.cat([queries, inner + kv, inner + n_kv * d + kv]), queries


@torch.no_grad()
def shrink_transformer(state: dict[str, torch.Tensor], cfg: TransformerConfig,
                       scores: list[tuple[torch.Tensor, torch.Tensor]],
                       grams: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Cut each layer down to `cfg.layer_ffn` MLP units and `cfg.layer_heads` query heads (whole kv groups),
    the highest scoring; with `grams` (of the output projections' inputs), the output projections are refit."""
    for i, (unit_scores, group_scores) in enumerate(scores):
        p = f"transformer.h.{i}."
        kept = keep_top(unit_scores, cfg.layer_ffn[i])
        for name in mlp_inputs(cfg):
            cut_rows(state, p + name, kept)
        cut_columns(state, p + "mlp.c_proj.weight", kept, grams)
        kept_groups = keep_top(group_scores, cfg.layer_heads[i] // cfg.kv_group)
        rows, cols = group_indices(kept_groups, len(group_scores), cfg)
        cut_rows(state, p + "attn.c_attn", rows)
        cut_columns(state, p + "attn.c_proj.weight", cols, grams)
    return state


def reader(state: dict[str, torch.Tensor], layer: int, n_layer: int) -> str:
    """The weight that reads layer `layer`'s hidden state besides its own recurrence."""
    if layer + 1 < n_layer:
        return f"rnn.weight_ih_l{layer + 1}"
    return "proj.weight" if "proj.weight" in state else "head.weight"


def rnn_measured(state: dict[str, torch.Tensor], n_layer: int) -> list[str]:
    """The weights whose inputs activation scoring measures: each layer's recurrence and its reader."""
    return [name for layer in range(n_layer) for name in (f"rnn.weight_hh_l{layer}", reader(state, layer, n_layer))]


def rnn_weight_scores(state: dict[str, torch.Tensor], cfg: LSTMConfig, tied_to_embedding: bool) -> list[torch.Tensor]:
    """Each layer's hidden-unit scores from the weights: the norm of what a unit reads times what it writes."""
    gates, units = 4 if cfg.cell == "lstm" else 3, []
    hidden = state["rnn.weight_hh_l0"].size(1)
    for layer in range(cfg.n_layer):
        w_ih, w_hh = state[f"rnn.weight_ih_l{layer}"], state[f"rnn.weight_hh_l{layer}"]
        reads = w_ih.reshape(gates, hidden, -1).norm(dim=(0, 2)) ** 2 + w_hh.reshape(gates, hidden, -1).norm(dim=(0, 2)) ** 2
        writes = w_hh.norm(dim=0) ** 2 + state[reader(state, layer, cfg.n_layer)].norm(dim=0) ** 2
        if layer == cfg.n_layer - 1 and tied_to_embedding:  # these units are the embedding's dimensions
            writes = writes + state["embedding.weight"].norm(dim=0) ** 2 + state["rnn.weight_ih_l0"].norm(dim=0) ** 2
        units.append(reads.sqrt() * writes.sqrt())
    return units


def rnn_activation_scores(state: dict[str, torch.Tensor], cfg: LSTMConfig, grams: dict[str, torch.Tensor],
                          token_counts: torch.Tensor, tied_to_embedding: bool) -> list[torch.Tensor]:
    """Each layer's hidden-unit scores, measured: the energy a unit's state sends on over the calibration
    tokens, sum_t h_j^2 * (||W_hh[:, j]||^2 + ||W_next[:, j]||^2); when the last layer's units are the
    tied embedding's dimensions, also the energy of that dimension entering the first layer."""
    units = []
    for layer in range(cfg.n_layer):
        w_hh = state[f"rnn.weight_hh_l{layer}"]  # reads h_{t-1}: every state but the last
        score = energy(grams[f"rnn.weight_hh_l{layer}"]) * (
            w_hh.pow(2).sum(0) + state[reader(state, layer, cfg.n_layer)].pow(2).sum(0))
        if layer == cfg.n_layer - 1 and tied_to_embedding:
            embedded = token_counts @ state["embedding.weight"].pow(2)
            score = score + embedded * state["rnn.weight_ih_l0"].pow(2).sum(0)
        units.append(score)
    return units


@torch.no_grad()
def shrink_rnn(state: dict[str, torch.Tensor], cfg: LSTMConfig, keep: int, tied_to_embedding: bool,
               scores: list[torch.Tensor], grams: dict[str, torch.Tensor] | None = None,
               token_counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Keep the `keep` highest-scoring hidden units of every layer (the embedding's dimensions too when
    tied). With `grams` (of `rnn_measured`'s inputs) and the calibration `token_counts`, every matrix that
    read a removed unit is refit; a tied embedding is refit as the head, then the first layer's input
    weights to what the new embedding feeds them."""
    n_layer = cfg.n_layer
    gates = 4 if cfg.cell == "lstm" else 3
    hidden = state["rnn.weight_hh_l0"].size(1)
    units = [keep_top(layer_scores, keep) for layer_scores in scores]
    for layer, kept in enumerate(units):
        rows = gate_rows(kept, hidden, gates)
        for name in (f"rnn.weight_ih_l{layer}", f"rnn.weight_hh_l{layer}", f"rnn.bias_ih_l{layer}", f"rnn.bias_hh_l{layer}"):
            if name in state:
                state[name] = state[name][rows]  # the removed units' gates are gone, exactly
        cut_columns(state, f"rnn.weight_hh_l{layer}", kept, grams)
        if layer > 0:
            cut_columns(state, f"rnn.weight_ih_l{layer}", units[layer - 1], grams)
    last = units[-1]
    if not tied_to_embedding:
        cut_columns(state, reader(state, n_layer - 1, n_layer), last, grams)
        return state
    embedding = state["embedding.weight"]
    cut_columns(state, "head.weight", last, grams)  # the head is the embedding
    new = state["head.weight"]
    if grams is None:
        state["rnn.weight_ih_l0"] = state["rnn.weight_ih_l0"][:, last]
    else:  # over the calibration tokens, the first layer read embedding[token] and now reads new[token]
        counted = token_counts[:, None].to(new.dtype) * new
        state["rnn.weight_ih_l0"] = least_squares(state["rnn.weight_ih_l0"], embedding.t() @ counted, new.t() @ counted)
    state["embedding.weight"] = new
    return state


def unit_costs(cfg: TransformerConfig) -> tuple[int, int]:
    """Parameters of one MLP unit and of one kv group (its query heads, k and v heads and c_proj columns)."""
    d, bias, g = cfg.n_embd, int(cfg.bias), cfg.kv_group
    unit = (d + bias) * (2 if cfg.mlp == "swiglu" else 1) + d
    group = cfg.head_size * ((g + 2) * (d + int(cfg.attn_bias)) + g * d)
    return unit, group


def smallest(cfg: TransformerConfig, heads: bool) -> TransformerConfig:
    """The model cut as far as structured pruning goes: 8 MLP units and one kv group in every layer."""
    return replace(cfg, layer_ffn=[min(8, cfg.ffn(i)) for i in range(cfg.n_layer)],
                   layer_heads=[cfg.kv_group if heads else cfg.heads(i) for i in range(cfg.n_layer)])


def check_budget(cfg: TransformerConfig, budget: int, amount: float, heads: bool) -> None:
    floor = smallest(cfg, heads).num_parameters()
    if floor > budget:
        keeps = f"8 MLP units and one kv group ({cfg.kv_group} query heads)" if heads else "8 MLP units"
        raise LmkitError(f"compression.prune_structured.amount={amount} asks for at most {budget:,} of "
                         f"{cfg.num_parameters():,} parameters, but cutting every layer to {keeps} leaves "
                         f"{floor:,}: lower the amount")


def transformer_plan(cfg: TransformerConfig, budget: int, heads: bool) -> TransformerConfig:
    """The smallest uniform cut (MLP units and kv groups) that brings the model within `budget` parameters."""
    ffn = [cfg.ffn(i) for i in range(cfg.n_layer)]
    groups = [cfg.kv_heads(i) for i in range(cfg.n_layer)]
    for percent in range(0, 101):
        cut = percent / 100
        plan = replace(cfg, layer_ffn=[min(f, multiple_of_8(f * (1 - cut))) for f in ffn],
                       layer_heads=[cfg.kv_group * (max(1, round(n * (1 - cut))) if heads else n) for n in groups])
        if plan.num_parameters() <= budget:
            return plan
    raise LmkitError("compression.prune_structured: the amount asks for more than cutting every layer removes")


def importance_plan(cfg: TransformerConfig, budget: int, heads: bool,
                    scores: list[tuple[torch.Tensor, torch.Tensor]]) -> TransformerConfig:
    """Per-layer widths by measured importance: remove the units with the lowest score per parameter,
    across all layers and both kinds (MLP units 8 at a time, so widths stay multiples of 8; kv groups one
    at a time, one kept per layer), until the model fits in `budget` parameters."""
    neuron_cost, group_cost = unit_costs(cfg)
    ffn = [cfg.ffn(i) for i in range(cfg.n_layer)]
    head_counts = [cfg.heads(i) for i in range(cfg.n_layer)]
    candidates = []  # (score per parameter, layer, kind, units removed)
    for i, (neuron_scores, group_scores) in enumerate(scores):
        ranked, start = neuron_scores.sort().values, 0
        odd = ffn[i] % 8  # an odd width first loses its lowest few, then groups of 8; 8 always stay
        for size in ([odd] if odd else []) + [8] * max(0, ffn[i] // 8 - 1):
            group = ranked[start:start + size]
            start += size
            candidates.append((float(group.sum()) / (size * neuron_cost), i, "ffn", size))
        if heads:
            candidates += [(float(v) / group_cost, i, "group", 1) for v in group_scores.sort().values[:-1]]
    total = cfg.num_parameters()
    for _, i, kind, count in sorted(candidates):
        if total <= budget:
            break
        if kind == "ffn":
            ffn[i] -= count
            total -= count * neuron_cost
        else:
            head_counts[i] -= cfg.kv_group
            total -= group_cost
    plan = replace(cfg, layer_ffn=ffn, layer_heads=head_counts)
    if plan.num_parameters() > budget:
        raise LmkitError("compression.prune_structured: the amount asks for more than cutting every layer to "
                         "8 MLP units and one kv group removes")
    return plan


def rnn_plan(cfg: LSTMConfig, budget: int, tied_to_embedding: bool) -> tuple[LSTMConfig, int]:
    """The widest hidden size whose model fits in `budget` parameters."""
    hidden = cfg.hidden_size or cfg.n_embd
    for keep in range(hidden, 7, -1):
        plan = replace(cfg, n_embd=keep, hidden_size=None) if tied_to_embedding else replace(cfg, hidden_size=keep)
        if not tied_to_embedding and cfg.tie_weights and keep == cfg.n_embd:
            continue  # the tied head needs its projection, which hidden == n_embd would drop
        if plan.num_parameters() <= budget:
            return plan, keep
    raise LmkitError("compression.prune_structured: the amount asks for fewer than 8 hidden units")


class PruneStructured(Plugin):
    name = "prune_structured"
    finetunes = True
    summary = ("removes FFN neurons (SwiGLU units), attention heads (kv groups) and LSTM hidden units: a smaller "
               "dense model, no sparse kernels needed")
    defaults = {"amount": 0.3, "heads": True, "criterion": "activation", "calibration_windows": 128,
                "finetune_steps": 200, "finetune_lr": None, "recovery": "distill", "temperature": 2.0,
                "distill_weight": None}
    introduced = {"criterion": "magnitude", "calibration_windows": 128, "recovery": "finetune", "temperature": 2.0,
                  "distill_weight": 0.5}  # lmkit 0.1's prune_structured ranked units by weight norm

    def check(self) -> None:
        s = self.settings
        key = "compression.prune_structured"
        if not 0 <= s["amount"] < 1:
            raise LmkitError(f"{key}.amount={s['amount']} must be in [0, 1)")
        if s["criterion"] not in ("activation", "magnitude"):
            raise LmkitError(f"{key}.criterion={s['criterion']!r} is not one of activation, magnitude")
        if s["recovery"] not in ("finetune", "distill"):
            raise LmkitError(f"{key}.recovery={s['recovery']!r} is not one of finetune, distill")
        weight = s["distill_weight"]
        if s["finetune_steps"] < 0 or s["calibration_windows"] < 1 or s["temperature"] <= 0 \
                or not (weight is None or 0 <= weight <= 1):
            raise LmkitError(f"{key}: finetune_steps={s['finetune_steps']} must be >= 0, calibration_windows="
                             f"{s['calibration_windows']} >= 1, temperature={s['temperature']} > 0 and "
                             f"distill_weight={s['distill_weight']} in [0, 1] (or null)")

    def needs_corpus(self) -> tuple[str, str] | None:
        s = self.settings
        tunes = super().needs_corpus()
        if s["criterion"] == "magnitude":
            return tunes
        return ("measures unit importance (criterion=activation)" + (" and fine-tunes" if tunes else ""),
                "criterion=magnitude" + (" finetune_steps=0" if tunes else ""))

    def describe(self) -> str:
        s = self.settings
        steps = s["finetune_steps"]
        return f"{s['criterion']}, " + (f"{s['recovery']} {steps} steps" if steps else "no recovery")

    def check_model(self, model: Any) -> None:
        cfg = model.record.backbone
        if isinstance(cfg, TransformerConfig):  # before minutes of calibration
            amount = self.settings["amount"]
            check_budget(cfg, int((1 - amount) * cfg.num_parameters()), amount, self.settings["heads"])

    def apply(self, model: Any, context: CompressContext) -> dict[str, Any]:
        s = self.settings
        cfg = model.record.backbone
        steps, recovery = s["finetune_steps"], RECOVERY.get(cfg.kind, RECOVERY["transformer"])
        trained_lr = (model.record.optim or {}).get("lr")
        lr = s["finetune_lr"] or (recovery["lr_fraction"] * trained_lr if trained_lr else None)
        weight = s["distill_weight"] if s["distill_weight"] is not None else recovery["distill_weight"]
        teacher = (Teacher(copy.deepcopy(model.backbone).eval(), temperature=s["temperature"], weight=weight)
                   if s["recovery"] == "distill" and steps else None)
        ids = context.calibration(model, s["calibration_windows"]).to(model.device) \
            if s["criterion"] == "activation" else None
        state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        budget = int((1 - s["amount"]) * cfg.num_parameters())
        backbone = model.backbone
        if isinstance(cfg, TransformerConfig):
            if ids is None:  # weight norms do not compare across layers: the same cut everywhere
                scores, grams = weight_scores(state, cfg), None
                cfg = transformer_plan(cfg, budget, s["heads"])
            else:
                grams = measure(backbone, output_projections(cfg), ids)
                scores = activation_scores(backbone, cfg, grams)
                cfg = importance_plan(cfg, budget, s["heads"], scores)
            state = shrink_transformer(state, cfg, scores, grams)
        elif isinstance(cfg, LSTMConfig):
            tied = backbone.proj is None and backbone.head.weight is backbone.embedding.weight
            if ids is None:
                scores, grams, counts = rnn_weight_scores(state, cfg, tied), None, None
            else:
                grams = measure(backbone, rnn_measured(state, cfg.n_layer), ids)
                counts = torch.bincount(ids.flatten(), minlength=cfg.vocab_size).float()
                scores = rnn_activation_scores(state, cfg, grams, counts, tied)
            cfg, keep = rnn_plan(cfg, budget, tied)  # nn.LSTM has one hidden size for all its layers
            state = shrink_rnn(state, cfg, keep, tied, scores, grams, counts)
        else:
            raise LmkitError(f"compression.prune_structured does not know the {cfg.kind} backbone")
        smaller = build_backbone(cfg).to(model.device)
        smaller.load_state_dict(state, strict=True)
        model.backbone = smaller.eval()
        model.record = model.record.replace(backbone=cfg)
        context.finetune(model, steps=steps, lr=lr, teacher=teacher)
        return {"finetuned_steps": steps, **({"finetune_lr": lr} if steps else {}),
                **({"distill_weight": weight} if teacher else {})}
