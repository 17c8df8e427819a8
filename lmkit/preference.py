"""Preference tuning: DPO (Rafailov et al. 2023), `finetune.objective=dpo` on `data=preference` pairs.

The policy is the model being trained (finetune=full: every weight; finetune=lora: its adapters); the reference is
the model it started from, frozen. For a pair of responses to one prompt, chosen and rejected, each scored by the sum
of its tokens' log-probabilities (the response's tokens, as lmkit.data.preference labels them),

    z = beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))
    loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)

with beta `finetune.beta` and eps `finetune.label_smoothing` (cDPO: each preference taken as flipped with probability
eps; 0 is DPO). `finetune.sft_weight` (w) adds w times the chosen responses' mean negative log-likelihood per token to
the training loss (RPO, Pang et al. 2024; TRL's rpo_alpha): DPO alone can lower the likelihood of the chosen responses
with the rejected ones when the two differ in a token or two, and the model's own answers with them (bench/instruct.py
measures it). z is the reward margin (the implicit rewards, beta * log pi/ref, of chosen minus rejected), logged
with the preference accuracy (the fraction of pairs with z > 0). At step 0 the policy is the reference: z = 0 and
the loss is log 2.

The reference's log-probabilities are computed once, before training (`finetune.reference=precomputed`, the
default): one forward pass over every pair a split reads, two numbers kept per pair (`reference_logps`, which
checkpoints carry, so that a resumed run scores against the model it started from); no reference model is held
while training. Or on the fly (`live`): one more forward pass on every training and evaluation batch, through the
base with its adapters off (finetune=lora: no copy) or a frozen copy of init_from's model (finetune=full). The
precomputed reference is the default: one forward pass per pair once, against one per pair per visit (cheaper from
about one epoch on, measured by bench/dpo.py; docs/fine-tuning.md, "Preference tuning"), and no second model held.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from torchmetrics.aggregation import MeanMetric

from lmkit.distributed import data_parallel
from lmkit.errors import LmkitError
from lmkit.lightning_module import LitLanguageModel, logging_step

log = logging.getLogger("lmkit")

OBJECTIVES = ("lm", "dpo")
REFERENCES = ("precomputed", "live")
METRICS = ("loss", "reward_margin", "preference_accuracy")


@dataclass(frozen=True)
class DPOSettings:
    """The DPO keys of the `finetune` config group (conf/finetune/*.yaml), checked."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    reference: str = "precomputed"
    sft_weight: float = 0.0

    @classmethod
    def from_config(cls, finetune: dict[str, Any]) -> DPOSettings:
        settings = cls(**{f.name: finetune[f.name] for f in fields(cls) if finetune.get(f.name) is not None})
        beta, eps = settings.beta, settings.label_smoothing
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or not math.isfinite(beta):
            raise LmkitError(f"finetune.beta={beta!r} must be a positive number")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 0.5:
            raise LmkitError(f"finetune.label_smoothing={eps!r} must be in [0, 0.5)")
        w = settings.sft_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or not math.isfinite(w):
            raise LmkitError(f"finetune.sft_weight={w!r} must be a number >= 0")
        if settings.reference not in REFERENCES:
            raise LmkitError(f"finetune.reference={settings.reference!r} is not one of {', '.join(REFERENCES)}")
        return settings


def objective_settings(finetune: dict[str, Any], data: dict[str, Any]) -> DPOSettings | None:
    """The run's DPO settings (None: the next-token objective), refused in one line where objective and data do
    not go together."""
    objective, source = finetune.get("objective") or "lm", data.get("source")
    if objective not in OBJECTIVES:
        raise LmkitError(f"finetune.objective={objective!r} is not one of {', '.join(OBJECTIVES)}")
    if objective == "lm":
        if source == "preference":
            raise LmkitError("data=preference holds preference pairs, which finetune.objective=dpo learns from "
                             "(finetune.objective=lm learns text: data=chat or data=text)")
        return None
    if source != "preference":
        raise LmkitError(f"finetune.objective=dpo learns from preference pairs, not from data={source}: use "
                         "data=preference data.path=FILE (records with prompt, chosen and rejected fields)")
    return DPOSettings.from_config(finetune)


def check_reference(settings: DPOSettings, *, lora: Any, sharded: bool, init_from: str | None) -> None:
    """Refuse, before anything is built, a live reference the run cannot have."""
    if settings.reference != "live":
        return
    if lora is None and not init_from:
        raise LmkitError("finetune.reference=live with finetune=full scores with a frozen copy of init_from's model: "
                         "give init_from=MODEL, or use finetune.reference=precomputed")
    if lora is None and sharded:
        raise LmkitError("finetune.reference=live with finetune=full under trainer=fsdp would hold a second, unsharded "
                         "model on every rank: use finetune.reference=precomputed (or finetune=lora)")
    if lora is not None and lora.train_embeddings:
        raise LmkitError("finetune.reference=live with finetune.train_embeddings=true: the embedding trains in place, "
                         "so no copy of the base's is left to score with: use finetune.reference=precomputed")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, *, beta: float,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: the (c)DPO loss and the reward margin z (see the module's docstring)."""
    z = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, z


def sequence_logps(backbone: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of the log-probabilities of its targets (those not IGNORE, -100), in fp32."""
    logits = backbone(inputs)[0]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")  # 0 where ignored
    return -nll.view(targets.shape).sum(-1)


@contextmanager
def adapters_off(backbone: nn.Module) -> Iterator[None]:
    """`backbone` computing its LoRA base (lmkit.lora) exactly: each adapted layer, and each layer of trained token
    rows, runs its base alone (called as a module: its hooks run, and a wrapper inside a wrapper is off too). No
    copy: the reference of finetune=lora."""
    from lmkit.lora import LoRALinear, TokenHead, TrainableTokens

    wrapped = [m for m in backbone.modules() if isinstance(m, (LoRALinear, TrainableTokens, TokenHead))]
    try:
        for m in wrapped:
            m.forward = m.base.__call__  # (an instance attribute, not a submodule: a bound method)
        yield
    finally:
        for m in wrapped:
            m.__dict__.pop("forward", None)


class PreferenceModel(LitLanguageModel):
    """LitLanguageModel whose loss is DPO's, on batches of preference pairs (lmkit.data.preference.PairBatch).

    lmkit.train.run builds it for finetune.objective=dpo with LitLanguageModel's arguments; the DPO settings are read
    from its `finetune` hyper-parameters. The precomputed reference log-probabilities, (pairs, 2), are a plain
    attribute carried by checkpoints; a live reference model for finetune=full is held in a tuple: not a submodule,
    so the optimizer, state dict and .train() skip it (as DistillingModel's teacher)."""

    reference_logps: torch.Tensor | None = None
    init_from: str | None = None  # set by train.run: the model a live reference for finetune=full is loaded from
    _reference: tuple[nn.Module, ...] = ()

    @property
    def dpo(self) -> DPOSettings:
        return DPOSettings.from_config(self.hparams.finetune or {})

    def setup(self, stage: str) -> None:
        if not hasattr(self, "preference_metrics"):  # (reduced across ranks by torchmetrics)
            self.preference_metrics = nn.ModuleDict({f"{split}_{name}": MeanMetric() for split in ("val", "test")
                                                     for name in METRICS})

    def on_fit_start(self) -> None:
        self._prepare_reference()

    def on_validation_start(self) -> None:
        self._prepare_reference()

    def on_test_start(self) -> None:
        self._prepare_reference()

    def _prepare_reference(self) -> None:
        if self.dpo.reference == "live":
            if self.lora_base is None and not self._reference:
                from lmkit.backbones.init import rng_untouched
                from lmkit.export import load

                with rng_untouched():  # (as train.run loads init_from: the run's random stream goes on untouched)
                    reference = load(self.init_from).backbone
                dtype = next(self.backbone.parameters()).dtype  # (the file's dtype may be another: bf16)
                self._reference = (reference.requires_grad_(False).to(self.device, dtype).eval(),)
            return
        pairs = self.trainer.datamodule.cache.pairs
        if self.reference_logps is None:
            self.reference_logps = self._precompute()
        elif len(self.reference_logps) != pairs:
            raise LmkitError(f"the checkpoint's reference log-probabilities are for {len(self.reference_logps)} "
                             f"preference pairs, and data.path holds {pairs}: resume with the data it trained on")
        else:  # (a table from a checkpoint scored the pairs that run read: more evaluation windows read others)
            datamodule = self.trainer.datamodule
            read = np.concatenate([datamodule.evaluated_pairs(split) for split in ("train", "val", "test")])
            missing = int(torch.isnan(self.reference_logps[torch.from_numpy(read)]).any(-1).sum())
            if missing:
                raise LmkitError(f"the checkpoint's reference log-probabilities lack {missing} of the pairs this run "
                                 "reads (other data.val_windows / data.test_windows than it trained with): resume "
                                 "with the settings it trained with")
        self.reference_logps = self.reference_logps.to(self.device)

    @torch.no_grad()
    def _precompute(self) -> torch.Tensor:
        """The reference's log-probabilities of every pair a split reads, (pairs, 2): each data-parallel rank scores
        its share, then all gather them."""
        datamodule, started = self.trainer.datamodule, time.perf_counter()
        rank, world = data_parallel(self.trainer)
        pairs, values = [], []
        training = self.backbone.training
        self.backbone.eval()
        try:  # (finetune=lora: the base itself, which the adapters, still zero, do not change)
            with self.trainer.precision_plugin.forward_context(), adapters_off(self.backbone):
                for batch in datamodule.reference_batches(rank, world):
                    batch = move_data_to_device(batch, self.device)
                    scores = sequence_logps(self.backbone, batch.inputs, batch.targets).float()
                    pairs.append(batch.pairs)
                    values.append(scores.view(2, -1).t())
        finally:
            self.backbone.train(training)
        pairs, values = torch.cat(pairs), torch.cat(values)
        if self.trainer.world_size > 1:  # (every rank the same count: reference_batches evens the shares up)
            pairs, values = _all_gathered(pairs), _all_gathered(values)
        table = torch.full((datamodule.cache.pairs, 2), float("nan"))
        table[pairs.cpu()] = values.cpu()
        if self.trainer.is_global_zero:
            log.info("DPO: the reference model's log-probabilities of %s preference pairs, computed in %.1f s "
                     "(finetune.reference=precomputed)", f"{len(pairs.unique()):,}", time.perf_counter() - started)
        return table

    def _reference_scores(self, batch: Any) -> torch.Tensor:
        """The reference's log-probabilities of the batch's rows (chosen, then rejected), (2B,)."""
        if self.dpo.reference == "precomputed":
            table = self.reference_logps[batch.pairs]
            return torch.cat([table[:, 0], table[:, 1]])
        with torch.no_grad():
            if self._reference:
                return sequence_logps(self._reference[0], batch.inputs, batch.targets)
            training = self.backbone.training
            self.backbone.eval()  # (no dropout: the reference is the base itself)
            try:
                with adapters_off(self.backbone):
                    return sequence_logps(self.backbone, batch.inputs, batch.targets)
            finally:
                self.backbone.train(training)

    def _dpo(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pair of the batch: the loss and the reward margin."""
        return self._scores(batch)[:2]

    def _scores(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per pair of the batch: the DPO loss, the reward margin, and the chosen response's mean negative
        log-likelihood per token."""
        settings, n = self.dpo, len(batch.pairs)
        reference = self._reference_scores(batch)
        policy = sequence_logps(self.backbone, batch.inputs, batch.targets)
        losses, margins = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], beta=settings.beta,
                                   label_smoothing=settings.label_smoothing)
        chosen_tokens = (batch.targets[:n] != -100).sum(-1).clamp(min=1)
        return losses, margins, -policy[:n] / chosen_tokens

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        losses, margins, chosen_nll = self._scores(batch)
        loss = losses.mean()
        if self.dpo.sft_weight:
            loss = loss + self.dpo.sft_weight * chosen_nll.mean()
        if logging_step(self.trainer):
            # Over several ranks, the means over the global batch (an all-reduce of each scalar).
            sync = self.trainer.world_size > 1
            self.log("train_loss", loss, prog_bar=True, sync_dist=sync)
            self.log("train_reward_margin", margins.detach().mean(), sync_dist=sync)
            self.log("train_preference_accuracy", (margins.detach() > 0).float().mean(), sync_dist=sync)
            self.log("train_chosen_nll", chosen_nll.detach().mean(), sync_dist=sync)
            self.log("lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def _update(self, stage: str, batch: Any) -> None:
        losses, margins = self._dpo(batch)
        for name, values in zip(METRICS, (losses, margins, (margins > 0).float())):
            self.preference_metrics[f"{stage}_{name}"].update(values)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._update("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._update("test", batch)

    def _log_pairs(self, stage: str) -> None:
        for name in METRICS:
            metric = self.preference_metrics[f"{stage}_{name}"]
            value = metric.compute()  # synced across ranks by torchmetrics
            metric.reset()
            # already reduced; sync_dist only tells Lightning so
            self.log(f"{stage}_{name}", value, prog_bar=name == "loss", sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_pairs("val")

    def on_test_epoch_end(self) -> None:
        self._log_pairs("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.reference_logps is not None:  # (a resumed run scores against the model it started from)
            checkpoint["lmkit"]["reference_logps"] = self.reference_logps.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "reference_logps" in checkpoint.get("lmkit", {}):
            self.reference_logps = checkpoint["lmkit"]["reference_logps"]


def _all_gathered(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (each of the same shape), one after another along the first dimension."""
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
