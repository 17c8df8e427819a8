"""`prune`: unstructured magnitude pruning that really shrinks the artifact.

The smallest-magnitude weights are set to zero, over all targeted weights at once (`scope:
global`) or the same fraction in each (`scope: layer`). Targets are the weight matrices of linear
layers and of `nn.LSTM`/`nn.GRU` (input and recurrent: most of a recurrent model's parameters);
embeddings and biases only when asked, norms never. A tied head is the embedding: one tensor,
pruned once or not at all.

Post-training the prune is followed by a short recovery fine-tune on the model's own training
data, during which sparsity ramps up (cubic, as in Zhu & Gupta 2017) over the first `ramp` of the
steps and the masks are re-applied after every optimizer step. With `during_training: true` the
same schedule runs inside `python train.py` instead. Either way the zeros are permanent: there is
no `weight_orig`/`weight_mask` reparametrization, so checkpoints stay plain.

In `model.safetensors` each tensor that is mostly zeros is stored as a bitmask of its non-zeros
and their values, whatever its dtype (float, or int8 after `int8`), and rebuilt on load.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lmkit.errors import LmkitError
from lmkit.plugins import CompressContext, Plugin

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


@torch.no_grad()
def magnitude_masks(params: dict[str, torch.Tensor], amount: float, scope: str) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that zero the `amount` fraction of smallest |w|, globally or per tensor."""
    if amount <= 0:
        return {name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()}
    if scope == "global":
        scores = torch.cat([p.detach().abs().flatten().float() for p in params.values()])
        k = int(amount * scores.numel())
        threshold = torch.kthvalue(scores, k).values if k > 0 else scores.new_tensor(-1.0)
        return {name: p.detach().abs() > threshold for name, p in params.items()}
    masks = {}
    for name, p in params.items():
        k = int(amount * p.numel())
        threshold = torch.kthvalue(p.detach().abs().flatten().float(), k).values if k > 0 else -1.0
        masks[name] = p.detach().abs() > threshold
    return masks


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


class Prune(Plugin):
    name = "prune"
    sparsifies = True
    finetunes = True
    summary = "magnitude pruning (global or per layer, LSTM weights too), recovery fine-tune, compact bitmask storage"
    defaults = {"amount": 0.5, "scope": "global", "embeddings": False, "biases": False,
                "finetune_steps": 200, "finetune_lr": None, "ramp": 0.5, "during_training": False, "every": 10}

    def check(self) -> None:
        s = self.settings
        if not 0 <= s["amount"] < 1:
            raise LmkitError(f"compression.prune.amount={s['amount']} must be in [0, 1)")
        if s["scope"] not in ("global", "layer"):
            raise LmkitError(f"compression.prune.scope={s['scope']!r} is not one of global, layer")
        if not 0 <= s["ramp"] <= 1 or s["finetune_steps"] < 0 or s["every"] < 1:
            raise LmkitError(f"compression.prune: ramp={s['ramp']} must be in [0, 1], finetune_steps="
                             f"{s['finetune_steps']} >= 0 and every={s['every']} >= 1")

    def _targets(self, backbone: nn.Module) -> dict[str, nn.Parameter]:
        return targets(backbone, self.settings["embeddings"], self.settings["biases"])

    def _schedule(self) -> Any:
        s = self.settings
        return make_schedule(self._targets, s["amount"], s["scope"], s["ramp"], s["every"])

    def callbacks(self, module: Any) -> list[Any]:
        return [self._schedule()] if self.settings["during_training"] else []

    def apply(self, model: Any, context: CompressContext) -> dict[str, Any]:
        s = self.settings
        steps = 0 if s["during_training"] else s["finetune_steps"]
        context.finetune(model, steps=steps, lr=s["finetune_lr"], callbacks=[self._schedule()])
        params = self._targets(model.backbone)
        with torch.no_grad():  # the exact final sparsity (a no-op after a schedule)
            for name, mask in magnitude_masks(params, s["amount"], s["scope"]).items():
                params[name].mul_(mask)
        return {"pruned": sorted(params), "finetuned_steps": steps}

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
