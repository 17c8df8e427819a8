"""`prune`: unstructured or 2:4 pruning that really shrinks the artifact.

Targets are the weight matrices of linear layers and of `nn.LSTM`/`nn.GRU` (input and recurrent:
most of a recurrent model's parameters); embeddings and biases only when asked (by magnitude), norms
never. A tied head is the embedding: one tensor, pruned once or not at all. Which weights go:

- `criterion`: `magnitude` (smallest |w|); `wanda` (Sun et al. 2023: |w| times the norm of the
  input it multiplies, measured on `calibration_windows` windows of the model's own training
  split); `sparsegpt` (Frantar & Alistarh 2023: the weights whose removal changes the layer's
  output least on those windows, the remaining weights of each row updated to make up for them).
  The calibrated criteria go matrix by matrix in forward order, each measured on the model with
  the matrices before it already pruned. An LSTM's input-to-hidden matrix is measured on its
  layer's input sequence, its hidden-to-hidden matrix on the layer's own previous states.
- `scope`: which weights compete for the cut: all targets (`global`), each matrix (`layer`) or
  each output row (`row`); unset, the criterion's own (magnitude global, wanda row, sparsegpt
  layer). The count is exact: `amount` of the group, rounded down.
- `pattern: 2:4`: 2 of every 4 consecutive inputs of each row are kept, the pattern sparse tensor
  cores run (exactly half the weights).

Then a short recovery on the model's own training data (`finetune_steps`): plain fine-tuning or
distillation from the unpruned model (`recovery: distill`, KL on its softened logits plus the data
loss). Magnitude pruning of unstructured sparsity ramps up during it (cubic, Zhu & Gupta 2017, over
the first `ramp` of the steps, masks re-applied after every optimizer step); the other criteria and
2:4 prune at once, then hold their masks (the pruned weights' gradients zeroed). With
`during_training: true` the magnitude ramp runs inside `python train.py` instead. Either way the
zeros are permanent: there is no `weight_orig`/`weight_mask` reparametrization, so checkpoints stay
plain.

In `model.safetensors` each tensor that is mostly zeros is stored as a bitmask of its non-zeros
and their values, whatever its dtype (float, int8 after `int8`, int4 codes after `int4`), and
rebuilt on load.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lmkit.errors import LmkitError
from lmkit.plugins import CompressContext, Plugin, Teacher
from lmkit.builtin_plugins.calibrate import collect, owner

MASK, VALUES, SHAPE = ".__mask", ".__values", ".__shape"


def targets(backbone: nn.Module, embeddings: bool = False, biases: bool = False) -> dict[str, nn.Parameter]:
    """The parameters to prune, by name, each shared parameter once."""
    found: dict[int, tuple[str, nn.Parameter]] = {}
    for module_name, module in backbone.named_modules():
        if isinstance(module, (nn.Linear, nn.LSTM, nn.GRU)):
            kinds = ("weight",) + (("bias",) if biases else ())
        elif isinstance(module, nn.Embedding) and embeddings:
            kinds = ("weight",)
        else:
            continue
        for name, param in module.named_parameters(recurse=False):
            if name.split("_")[0] in kinds and param is not None and param.is_floating_point():
                found.setdefault(id(param), (f"{module_name}.{name}".lstrip("."), param))
    if not embeddings:  # a head tied to an embedding is that embedding
        tied = {id(m.weight) for m in backbone.modules() if isinstance(m, nn.Embedding)}
        found = {k: v for k, v in found.items() if k not in tied}
    return dict(found.values())


def groups(tensor: torch.Tensor) -> torch.Tensor:
    """A weight as (rows, inputs): each row is one output's weights (a 1-D tensor is one row)."""
    return tensor.reshape(-1, tensor.size(-1)) if tensor.dim() > 1 else tensor.reshape(1, -1)


def lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A keep-mask over the last dimension of `scores` that drops exactly its `k` lowest per row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep.scatter_(-1, scores.topk(k, dim=-1, largest=False).indices, False)
    return keep


@torch.no_grad()
def score_masks(scores: dict[str, torch.Tensor], amount: float, scope: str,
                pattern: str = "unstructured") -> dict[str, torch.Tensor]:
    """Boolean keep-masks that drop exactly the lowest-scoring `amount` of each comparison group.

    scope global: one group over every tensor; layer: each tensor; row: each output row. pattern
    2:4: the 2 lowest of every 4 consecutive inputs of a row (what sparse tensor cores run)."""
    if pattern == "2:4":
        return {name: lowest(groups(s).reshape(groups(s).size(0), -1, 4), 2).reshape(s.shape)
                for name, s in scores.items()}
    if scope == "global":
        flat = torch.cat([s.flatten().float() for s in scores.values()])
        pieces = lowest(flat, int(amount * flat.numel())).split([s.numel() for s in scores.values()])
        return {name: piece.reshape(s.shape) for (name, s), piece in zip(scores.items(), pieces)}
    if scope == "layer":
        return {name: lowest(s.flatten(), int(amount * s.numel())).reshape(s.shape) for name, s in scores.items()}
    return {name: lowest(groups(s), int(amount * groups(s).size(1))).reshape(s.shape) for name, s in scores.items()}


def magnitude_masks(params: dict[str, torch.Tensor], amount: float, scope: str,
                    pattern: str = "unstructured") -> dict[str, torch.Tensor]:
    """Keep-masks that zero the `amount` fraction of smallest |w| (see score_masks)."""
    return score_masks({name: p.detach().abs() for name, p in params.items()}, amount, scope, pattern)


def cubic_amount(step: int, start: int, end: int, amount: float) -> float:
    """Sparsity at `step`: 0 before `start`, `amount` from `end`, a cubic ramp between."""
    if step >= end:
        return amount
    if step <= start:
        return 0.0
    return amount * (1 - (1 - (step - start) / (end - start)) ** 3)


def make_schedule(select: Any, amount: float, scope: str, ramp: float, every: int):
    """A Lightning callback that prunes `select(backbone)` on a cubic schedule and keeps it pruned.

    Sparsity reaches `amount` after `ramp` of `trainer.max_steps` (at once when `ramp` is 0)."""
    import lightning as L

    class PruningSchedule(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.max_steps < 1:
                raise LmkitError("compression.prune during training needs trainer.max_steps (it ramps over them)")
            self.params = select(pl_module.backbone)
            self.end = int(ramp * trainer.max_steps)
            self.masks: dict[str, torch.Tensor] = {}
            if self.end == 0 or trainer.global_step > 0:  # at once, or where a resumed run had got to
                self._prune(cubic_amount(trainer.global_step, 0, self.end, amount))

        def _prune(self, current: float) -> None:
            self.masks = magnitude_masks(self.params, current, scope)
            self._apply()

        @torch.no_grad()
        def _apply(self) -> None:
            for name, mask in self.masks.items():
                self.params[name].mul_(mask)

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            step = trainer.global_step
            if step <= self.end and (step % every == 0 or step == self.end):
                self._prune(cubic_amount(step, 0, self.end, amount))
            else:
                self._apply()  # the optimizer step just moved the pruned weights off zero

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self._prune(amount)  # the final sparsity, whatever step training stopped at

    return PruningSchedule()


def make_fixed_masks(select: Any, masks: dict[str, torch.Tensor]):
    """A Lightning callback that keeps `masks` (chosen before the fine-tune) on `select(backbone)`.

    The gradients of pruned weights are zeroed too, so AdamW's moments stay zero for them and the
    optimizer step never moves them off zero in the first place."""
    import lightning as L

    class FixedMasks(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.params = select(pl_module.backbone)
            self.masks = {name: mask.to(self.params[name].device) for name, mask in masks.items()}

        def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            for name, mask in self.masks.items():
                if self.params[name].grad is not None:
                    self.params[name].grad.mul_(mask)

        @torch.no_grad()
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            for name, mask in self.masks.items():
                self.params[name].mul_(mask)

    return FixedMasks()


@torch.no_grad()
def wanda_scores(weight: torch.Tensor, input_norms_sq: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2023): |W_ij| * ||X_j||, the weight times the norm of the input it multiplies."""
    return weight.detach().abs().float() * input_norms_sq.sqrt().unsqueeze(0)


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, gram: torch.Tensor, amount: float, scope: str, pattern: str,
              block: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune `weight` (rows, inputs) column block by column block,
    choosing in each block the weights whose removal costs least (w^2 / [H^-1]_jj^2) and moving the
    error of each removed weight onto the row's not yet visited weights (the OBS update), with
    H = X^T X of the layer's calibration inputs. Returns (new weight, keep-mask).

    scope layer: each block drops the same share of its weights, across rows (the paper's choice);
    row: each row of each block drops that share. The per-block counts add up to exactly `amount` of
    the tensor (of each row)."""
    W = weight.detach().clone().float()
    rows, cols = W.shape
    H = gram.clone().float()
    dead = H.diagonal() == 0  # inputs that were always zero: their weights do nothing
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        d = Hinv1.diagonal()
        if pattern == "unstructured":
            cost = W1 ** 2 / d.unsqueeze(0) ** 2
            if scope == "row":  # exact per row: the columns before i2 hold int(amount * i2) pruned
                k = int(amount * i2) - int(amount * i1)
                keep[:, i1:i2] = lowest(cost, k)
            else:
                k = int(amount * rows * i2) - int(amount * rows * i1)
                keep[:, i1:i2] = lowest(cost.flatten(), k).reshape(cost.shape)
        for i in range(i2 - i1):
            if pattern == "2:4" and i % 4 == 0:
                cost = W1[:, i:i + 4] ** 2 / d[i:i + 4].unsqueeze(0) ** 2
                keep[:, i1 + i:i1 + i + 4] = lowest(cost, 2)
            w = W1[:, i]
            q = w * keep[:, i1 + i]
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return (W * keep).to(weight.dtype), keep


def pack(tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Bitmask + non-zero values, if that is smaller than the dense tensor."""
    keep = tensor != 0
    nonzero = int(keep.sum())
    if math.ceil(tensor.numel() / 8) + nonzero * tensor.element_size() >= tensor.nbytes:
        return None
    bits = np.packbits(keep.flatten().cpu().numpy())
    return {MASK: torch.from_numpy(bits), VALUES: tensor[keep].contiguous(),
            SHAPE: torch.tensor(tensor.shape, dtype=torch.int64)}


def unpack(mask: torch.Tensor, values: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    shape = tuple(shape.tolist())
    if mask.numel() != math.ceil(math.prod(shape) / 8):  # checked before allocating what a file claims
        raise ValueError(f"a bitmask of {mask.numel()} bytes does not fit the shape {shape}")
    keep = np.unpackbits(mask.numpy(), count=math.prod(shape)).astype(bool)
    if int(keep.sum()) != values.numel():
        raise ValueError(f"{values.numel()} stored values for {int(keep.sum())} non-zeros")
    dense = torch.zeros(math.prod(shape), dtype=values.dtype)
    dense[torch.from_numpy(keep)] = values
    return dense.view(shape)


CRITERIA = ("magnitude", "wanda", "sparsegpt")
OWN_SCOPE = {"magnitude": "global", "wanda": "row", "sparsegpt": "layer"}  # each criterion's measured best


def is_matrix(backbone: nn.Module, name: str) -> bool:
    """A weight matrix that multiplies activations (a Linear's or an RNN's): what the calibrated criteria score."""
    module, attr = owner(backbone, name)
    return isinstance(module, (nn.Linear, nn.LSTM, nn.GRU)) and attr.startswith("weight")


class Prune(Plugin):
    name = "prune"
    sparsifies = True
    finetunes = True
    summary = ("unstructured or 2:4 pruning by magnitude, Wanda or SparseGPT (LSTM weights too), recovery "
               "by fine-tune or distillation, compact bitmask storage")
    defaults = {"amount": 0.5, "criterion": "sparsegpt", "pattern": "unstructured", "scope": None,
                "calibration_windows": 128, "embeddings": False, "biases": False, "finetune_steps": 200,
                "finetune_lr": None, "recovery": "distill", "temperature": 2.0, "distill_weight": 0.5,
                "ramp": 0.5, "every": 10, "during_training": False}
    introduced = {"criterion": "magnitude", "pattern": "unstructured", "calibration_windows": 128,
                  "recovery": "finetune", "temperature": 2.0, "distill_weight": 0.5}  # lmkit 0.1's prune

    def check(self) -> None:
        s = self.settings
        key = "compression.prune"
        if not 0 <= s["amount"] < 1:
            raise LmkitError(f"{key}.amount={s['amount']} must be in [0, 1)")
        if s["criterion"] not in CRITERIA:
            raise LmkitError(f"{key}.criterion={s['criterion']!r} is not one of {', '.join(CRITERIA)}")
        if s["pattern"] not in ("unstructured", "2:4"):
            raise LmkitError(f"{key}.pattern={s['pattern']!r} is not one of unstructured, 2:4")
        if s["scope"] not in (None, "global", "layer", "row"):
            raise LmkitError(f"{key}.scope={s['scope']!r} is not one of global, layer, row (or null: the criterion's own)")
        if s["pattern"] == "2:4" and s["scope"] is not None:
            raise LmkitError(f"{key}.pattern=2:4 keeps 2 of every 4 consecutive weights of each row, so "
                             f"scope={s['scope']} means nothing with it: leave scope unset")
        if s["pattern"] == "2:4" and s["amount"] != 0.5:
            raise LmkitError(f"{key}.pattern=2:4 removes exactly half the weights: amount={s['amount']} does not apply")
        if s["criterion"] == "sparsegpt" and s["scope"] == "global":
            raise LmkitError(f"{key}.criterion=sparsegpt compares weights by the error they cause in their own "
                             "layer's output, which one threshold across layers cannot: scope=layer or row")
        if s["recovery"] not in ("finetune", "distill"):
            raise LmkitError(f"{key}.recovery={s['recovery']!r} is not one of finetune, distill")
        if s["calibration_windows"] < 1 or s["temperature"] <= 0 or not 0 <= s["distill_weight"] <= 1:
            raise LmkitError(f"{key}: calibration_windows={s['calibration_windows']} must be >= 1, temperature="
                             f"{s['temperature']} > 0 and distill_weight={s['distill_weight']} in [0, 1]")
        if not 0 <= s["ramp"] <= 1 or s["finetune_steps"] < 0 or s["every"] < 1:
            raise LmkitError(f"{key}: ramp={s['ramp']} must be in [0, 1], finetune_steps="
                             f"{s['finetune_steps']} >= 0 and every={s['every']} >= 1")

    @property
    def scope(self) -> str:
        return self.settings["scope"] or OWN_SCOPE[self.settings["criterion"]]

    @property
    def gradual(self) -> bool:
        """Magnitude pruning of free (unstructured) sparsity ramps up during the fine-tune; the calibrated
        criteria and 2:4 prune in one shot, then recover with the masks held."""
        return self.settings["criterion"] == "magnitude" and self.settings["pattern"] == "unstructured"

    def needs_corpus(self) -> tuple[str, str] | None:
        s = self.settings
        tunes = super().needs_corpus() if not s["during_training"] else None
        if s["criterion"] == "magnitude":
            return tunes
        why = f"calibrates (criterion={s['criterion']})" + (" and fine-tunes" if tunes else "")
        return why, "criterion=magnitude" + (" finetune_steps=0" if tunes else "")

    def describe(self) -> str:
        s = self.settings
        steps = 0 if s["during_training"] else s["finetune_steps"]
        recovery = f"{s['recovery']} {steps} steps" if steps else "one-shot"
        return f"{s['criterion']}, {s['pattern']}, {recovery}"

    def check_model(self, model: Any) -> None:
        if self.settings["pattern"] != "2:4":
            return
        odd = [f"{name} ({p.size(-1)} inputs)" for name, p in self._targets(model.backbone).items()
               if p.size(-1) % 4]
        if odd:
            raise LmkitError(f"compression.prune.pattern=2:4 needs rows whose length divides by 4: {', '.join(odd[:3])}")

    def _targets(self, backbone: nn.Module) -> dict[str, nn.Parameter]:
        return targets(backbone, self.settings["embeddings"], self.settings["biases"])

    def _schedule(self) -> Any:
        s = self.settings
        return make_schedule(self._targets, s["amount"], self.scope, s["ramp"], s["every"])

    def callbacks(self, module: Any) -> list[Any]:
        if not self.settings["during_training"]:
            return []
        if not self.gradual:
            raise LmkitError("compression.prune.during_training ramps unstructured magnitude sparsity up: set "
                             "compression.prune.criterion=magnitude (and pattern=unstructured)")
        return [self._schedule()]

    def _teacher(self, model: Any, steps: int) -> Teacher | None:
        s = self.settings
        if s["recovery"] != "distill" or steps == 0:
            return None
        return Teacher(copy.deepcopy(model.backbone).eval(), temperature=s["temperature"], weight=s["distill_weight"])

    @torch.no_grad()
    def one_shot(self, model: Any, context: CompressContext) -> dict[str, torch.Tensor]:
        """Prune `model` to the final sparsity now; returns the keep-masks."""
        s = self.settings
        params = self._targets(model.backbone)
        if s["criterion"] == "magnitude":
            masks = magnitude_masks(params, s["amount"], self.scope, s["pattern"])
        else:
            masks = self._calibrated(model, params, context)
        for name, mask in masks.items():
            params[name].mul_(mask)
        return masks

    def _calibrated(self, model: Any, params: dict[str, nn.Parameter],
                    context: CompressContext) -> dict[str, torch.Tensor]:
        """Wanda or SparseGPT, weight matrix by weight matrix in forward order, each measured on the model
        with the matrices before it already pruned (as both papers do). Embeddings and biases, when
        asked for, have no input to measure: they go by magnitude."""
        s = self.settings
        ids = context.calibration(model, s["calibration_windows"]).to(model.device)
        backbone, masks = model.backbone, {}
        if s["criterion"] == "wanda" and self.scope == "global":  # one threshold: every score first, then cut
            scores = {name: wanda_scores(p, collect(backbone, name, ids, "norm")) if is_matrix(backbone, name)
                      else p.detach().abs() for name, p in params.items()}
            return score_masks(scores, s["amount"], "global", s["pattern"])
        for name, p in params.items():
            if not is_matrix(backbone, name):
                masks.update(magnitude_masks({name: p}, s["amount"], "layer" if self.scope == "global" else self.scope,
                                             s["pattern"]))
            elif s["criterion"] == "wanda":
                scores = wanda_scores(p, collect(backbone, name, ids, "norm"))
                masks.update(score_masks({name: scores}, s["amount"], self.scope, s["pattern"]))
            else:
                weight, masks[name] = sparsegpt(p, collect(backbone, name, ids, "gram"), s["amount"], self.scope,
                                                s["pattern"])
                p.copy_(weight)
            p.mul_(masks[name])
        return masks

    def apply(self, model: Any, context: CompressContext) -> dict[str, Any]:
        s = self.settings
        steps = 0 if s["during_training"] else s["finetune_steps"]
        teacher = self._teacher(model, steps)
        if self.gradual:  # sparsity ramps up while it fine-tunes; then the exact final sparsity
            context.finetune(model, steps=steps, lr=s["finetune_lr"], callbacks=[self._schedule()], teacher=teacher)
            self.one_shot(model, context)
        else:
            masks = self.one_shot(model, context)
            context.finetune(model, steps=steps, lr=s["finetune_lr"],
                             callbacks=[make_fixed_masks(self._targets, masks)], teacher=teacher)
            with torch.no_grad():
                for name, p in self._targets(model.backbone).items():
                    p.mul_(masks[name].to(p.device))
        return {"pruned": sorted(self._targets(model.backbone)), "finetuned_steps": steps}

    def pack(self, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in tensors.items():
            packed = pack(tensor) if tensor.dim() >= 1 else None
            out.update({name + k: v for k, v in packed.items()} if packed else {name: tensor})
        return out

    def unpack(self, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {name: t for name, t in tensors.items() if not name.endswith((MASK, VALUES, SHAPE))}
        for name in tensors:
            if name.endswith(MASK):
                base = name.removesuffix(MASK)
                out[base] = unpack(tensors[name], tensors[base + VALUES], tensors[base + SHAPE])
        return out
