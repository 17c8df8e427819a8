"""A short fine-tune of an `InferenceModel` in place on its own training data: how compression plugins recover.

Same LitLanguageModel, data pipeline and optimizer as training, driven by a plain single-device
Lightning Trainer with no logging, checkpoints or validation. With a `Teacher` (the model before
compression) the loss also pulls the student's softened logits towards the teacher's: distillation.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from lmkit.conf import group_option
from lmkit.evaluate import own_datamodule
from lmkit.inference import InferenceModel
from lmkit.lightning_module import LitLanguageModel
from lmkit.plugins import Teacher

log = logging.getLogger("lmkit")


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the logits softened by T, averaged over tokens (T^2 keeps the
    gradient's scale independent of T, Hinton et al. 2015)."""
    student = F.log_softmax(logits.flatten(0, 1).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.flatten(0, 1).float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


class DistillingModel(LitLanguageModel):
    """LitLanguageModel whose training loss mixes the data loss with distillation from a teacher.

    The teacher is set after construction (not an __init__ argument, which save_hyperparameters would
    record) and held in a tuple: not a submodule, so the optimizer, state dict and .train() skip it."""

    _teacher: tuple[Teacher, ...] = ()

    def on_fit_start(self) -> None:
        self._teacher[0].backbone.to(self.device).eval()

    def _loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs, targets = batch[0], batch[1]
        documents = batch[2] if len(batch) > 2 else None  # a chat batch's packed rows (LitLanguageModel._loss)
        apart = {"documents": documents} if documents is not None and self.backbone.config.kind == "transformer" \
            else {}
        teacher = self._teacher[0]
        logits, _ = self.backbone(inputs, **apart)
        with torch.no_grad():
            teacher_logits, _ = teacher.backbone(inputs, **apart)
        data = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return (1 - teacher.weight) * data + teacher.weight * distillation_loss(logits, teacher_logits,
                                                                                teacher.temperature)


def finetune(model: InferenceModel, *, steps: int, lr: float | None = None, callbacks: list[Any] | None = None,
             teacher: Teacher | None = None, cache_dir: str, seed: int, device: str | None = None) -> None:
    """Train `model.backbone` for `steps` steps on `device` (default: where it is), then put it back.

    `lr` None: a tenth of the learning rate the model was trained with. A model that does not
    record its optimizer (exported before lmkit recorded it) gets conf/optim/adamw.yaml's."""
    if steps <= 0:
        return
    optim = dict(model.record.optim or group_option("optim", "adamw"))
    optim["lr"] = lr if lr is not None else optim["lr"] / 10
    optim.update(warmup_steps=min(steps // 10, 50), decay_steps=steps)
    datamodule = own_datamodule(model, cache_dir, seed=seed)
    record = model.record
    settings = dict(model=record.model_settings, optim=optim, vocab_size=record.backbone.vocab_size)
    module = DistillingModel(**settings) if teacher else LitLanguageModel(**settings)
    if teacher:
        module._teacher = (teacher,)
    module.backbone = model.backbone  # train the given weights, not the fresh ones the constructor built
    module.tokenizer = model.tokenizer
    home, target = model.device, torch.device(device) if device else model.device
    trainer = L.Trainer(max_steps=steps, accelerator=target.type, devices=[target.index or 0] if target.type == "cuda"
                        else 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=callbacks or [])
    log.info("Fine-tuning %d steps at lr %.2g on %s%s", steps, optim["lr"], target,
             f", distilling at temperature {teacher.temperature:g}" if teacher else "")
    model.backbone.train()
    trainer.fit(module, datamodule=datamodule)
    model.backbone.to(home).eval()  # Lightning leaves it on the CPU after fit; measure and export where it was
