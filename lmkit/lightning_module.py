"""LitLanguageModel: the LightningModule that trains any backbone on next-token prediction."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric

from lmkit.activation_checkpointing import apply_activation_checkpointing, check_activation_checkpointing
from lmkit.backbones import build_backbone
from lmkit.data.tokenizer import Tokenizer, tokenizer_from_json
from lmkit.record import ModelRecord

if TYPE_CHECKING:
    from lmkit.parallel.materialize import PretrainedTensors


def warmup_cosine(warmup_steps: int, total_steps: int | None, min_lr_ratio: float):
    """Learning-rate multiplier: linear warm-up, then cosine decay to `min_lr_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not total_steps or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def logging_step(trainer: L.Trainer) -> bool:
    """Whether the loggers write this step (and the last step, for the final train loss).

    Logging only on the loggers' steps: each `self.log` costs Python time on every step it runs,
    a visible share of a small model's step on a CPU (bench/README.md, throughput: Lightning
    overhead)."""
    step, every = trainer.global_step + 1, trainer.log_every_n_steps
    return (every > 0 and step % every == 0) or step == trainer.max_steps


class LitLanguageModel(L.LightningModule):
    """Next-token cross-entropy over any backbone from `lmkit.backbones`.

    Perplexity is exp of the token-weighted mean NLL, accumulated with torchmetrics (so it is
    reduced across ranks); it equals `torchmetrics.text.Perplexity` without a second softmax.
    """

    def __init__(self, model: dict[str, Any], optim: dict[str, Any], vocab_size: int,
                 data: dict[str, Any] | None = None, compile: bool = False,
                 tokens: dict[str, Any] | None = None, finetune: dict[str, Any] | None = None,
                 meta_init: bool = False, activation_checkpointing: int = 0) -> None:
        """`data` records the corpus settings, so `lmkit eval` can find the model's own test split; `tokens`, an
        imported tokenizer's conventions (`lmkit.record.TOKENS`), travel on to the checkpoint and its exports;
        `compile` runs the backbone through torch.compile for training and evaluation (compiled in place when the
        trainer configures the model: under sharding, block by block); `meta_init` builds the backbone on the meta
        device, to be made real shard by shard when the trainer configures it (trainer=fsdp: no rank ever holds the
        whole model), from its own initialisation or from `self.pretrained`; `activation_checkpointing` K
        recomputes every K-th block's activations in the backward pass (0: off; lmkit.activation_checkpointing), a
        training setting like `compile`, kept in the hyper-parameters and never in the model's record."""
        super().__init__()
        if optim.get("name") not in ("adamw", "adamw8bit"):
            raise ValueError(f"optim.name={optim.get('name')!r} is not one of adamw, adamw8bit")
        self.save_hyperparameters(ignore=["meta_init"])  # plain values: a checkpoint loads with weights_only=True
        with torch.device("meta") if meta_init else nullcontext():
            self.backbone = build_backbone(ModelRecord.from_settings(model, vocab_size).backbone)
        check_activation_checkpointing(activation_checkpointing, self.backbone.config)  # (one line if it cannot)
        # init_from under meta_init (lmkit.parallel.materialize): the tensors the backbone's shards are filled from
        self.pretrained: PretrainedTensors | None = None
        self.tokenizer: Tokenizer | None = None  # attached by train.run, restored from checkpoints
        # finetune=lora (lmkit.lora): the base the adapters train on, {path, fingerprint}, set by train.run.
        # Checkpoints then hold the adapters alone, and restoring one leaves the base as loaded.
        self.lora_base: dict[str, str] | None = None
        self.strict_loading = (finetune or {}).get("kind", "full") == "full"
        self.val_nll = MeanMetric()
        self.test_nll = MeanMetric()

    @property
    def record(self) -> ModelRecord:
        """The model's description, as an artifact or a loaded checkpoint records it."""
        hp = self.hparams
        return ModelRecord.from_settings(hp.model, hp.vocab_size, data=hp.data, optim=hp.optim, tokens=hp.tokens or {},
                                         tokenizer=self.tokenizer.kind if self.tokenizer else None)

    def configure_model(self) -> None:
        # Lightning calls this at every fit, validate and test, before it wraps the model: act once.
        if self.device_mesh is not None:  # trainer=fsdp (lmkit.parallel): shard, and split over tensor-parallel ranks
            from lmkit.parallel.parallelize import is_parallelized, parallelize

            if not is_parallelized(self.backbone):
                param_dtype = getattr(self.trainer.strategy, "param_dtype", None)
                parallelize(self.backbone, self.device_mesh, param_dtype=param_dtype, compile=self.hparams.compile,
                            activation_checkpointing=self.hparams.get("activation_checkpointing", 0))
            self._materialize()
        else:  # one process or DDP: checkpointing, then compile (torchtitan's order)
            every = self.hparams.get("activation_checkpointing", 0)
            apply_activation_checkpointing(self.backbone, every)  # (again at the next fit: leaves it as it is)
            # Compiled in place: parameter names (and so checkpoints) stay as they are. With checkpointing, block by
            # block: the whole model compiled traces through the blocks' checkpoint hooks, and its backward fails
            # (torch 2.13: CheckpointError, "recomputed tensors have different metadata")
            parts = list(self.backbone.transformer.h) if every else [self.backbone]
            if self.hparams.compile and not getattr(parts[0], "_compiled_call_impl", None):
                for part in parts:
                    part.compile()

    def _materialize(self) -> None:
        """A meta-built backbone's shards, allocated and filled (once: the next fit, validate or test finds them)."""
        from lmkit.parallel.materialize import initial_values, is_on_meta, materialize

        if is_on_meta(self.backbone):
            materialize(self.backbone, self.trainer.strategy.root_device, initial_values(self.backbone, self.pretrained))
            self.pretrained = None  # (its files are closed with it)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone(ids)[0]

    def _loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean cross-entropy over the targets; a target of -100 (F.cross_entropy's ignore_index) is not learned: a
        chat batch's prompts and padding (lmkit.data.chat_datamodule.ChatBatch, whose packed rows also say which
        conversation each position belongs to, so that none attends across to another)."""
        inputs, targets = batch[0], batch[1]
        documents = batch[2] if len(batch) > 2 else None
        if documents is not None and self.backbone.config.kind == "transformer":
            logits, _ = self.backbone(inputs, documents=documents)
        else:  # (an LSTM reads a packed row's conversations one after another, as it reads text)
            logits, _ = self.backbone(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    @staticmethod
    def _weight(batch: tuple[torch.Tensor, ...]) -> int | torch.Tensor:
        """How many targets a batch's mean loss is over: all of a text batch's; a chat batch's learned ones (a
        tensor, so no host sync), so that perplexity stays the token-weighted mean over learned tokens."""
        return batch[1].numel() if len(batch) == 2 else (batch[1] != -100).sum()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        if logging_step(self.trainer):
            # Over several ranks, the mean: the loss of the global batch (an all-reduce of one scalar).
            self.log("train_loss", loss, prog_bar=True, sync_dist=self.trainer.world_size > 1)
            self.log("train_ppl", loss.detach().exp())
            self.log("lr", self.lr_schedulers().get_last_lr()[0])  # works with any logger, or none
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_nll.update(self._loss(batch), weight=self._weight(batch))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.test_nll.update(self._loss(batch), weight=self._weight(batch))

    def _log_eval(self, stage: str, metric: MeanMetric) -> None:
        nll = metric.compute()  # synced across ranks by torchmetrics
        metric.reset()
        # already reduced; sync_dist only tells Lightning so (the mean of equal values is exact)
        self.log(f"{stage}_loss", nll, prog_bar=True, sync_dist=True)
        self.log(f"{stage}_ppl", nll.exp(), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_nll)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_nll)

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.hparams.optim
        # Weight decay on matrices and embeddings only; biases and norm gains stay undecayed.
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o["weight_decay"]},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        kwargs = dict(lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"])
        if o["name"] == "adamw":
            # Fused on the CPU too (torch >= 2.4): one kernel per parameter group instead of a dozen ops
            # per tensor (bench/README.md, throughput). Not under fp16, whose fused step unscales the
            # gradients and hides them from clipping.
            fused = self.device.type in ("cuda", "cpu") and self.trainer.precision not in ("16-mixed", "16-true")
            optimizer = torch.optim.AdamW(groups, fused=fused, **kwargs)
        elif o["name"] == "adamw8bit":
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(groups, **kwargs)
        else:
            raise ValueError(f"optim.name={o['name']!r} is not one of adamw, adamw8bit")
        total = o.get("decay_steps") or (self.trainer.max_steps if self.trainer.max_steps > 0 else None)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(o["warmup_steps"], total, o["min_lr_ratio"]))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Clipping here rather than through Trainer(gradient_clip_val): Lightning refuses that with a
        # fused AdamW under mixed precision, and under bf16 (no loss scaling) clipping is safe here.
        clip = self.hparams.optim.get("grad_clip")
        if not clip:
            return
        if self.device_mesh is not None:  # sharded gradients: the global norm over every shard and mesh
            from lmkit.parallel.clip import clip_grad_norm

            norm = clip_grad_norm(self.parameters(), clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), clip)
        if logging_step(self.trainer):
            self.log("grad_norm", norm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The tokenizer travels in the checkpoint, so the checkpoint alone rebuilds model and tokenizer.
        checkpoint["lmkit"] = {"tokenizer": self.tokenizer.to_json() if self.tokenizer else None,
                               "torch_rng": torch.get_rng_state()}
        if self.lora_base is not None:
            from lmkit.lora import adapter_state

            checkpoint["state_dict"] = adapter_state(checkpoint["state_dict"], self.backbone)  # what trains
            checkpoint["lmkit"]["lora_base"] = self.lora_base

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("lmkit", {})
        if extra.get("tokenizer"):
            self.tokenizer = tokenizer_from_json(extra["tokenizer"])
        if "torch_rng" in extra:  # CPU dropout continues as if never interrupted (CUDA RNG is not saved)
            torch.set_rng_state(extra["torch_rng"])
