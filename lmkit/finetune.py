"""A short fine-tune of an `InferenceModel` in place on its own training data: how compression plugins recover.

Same LitLanguageModel, data pipeline and optimizer as training, driven by a plain single-device
Lightning Trainer with no logging, checkpoints or validation.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from lmkit.conf import group_option
from lmkit.evaluate import own_datamodule
from lmkit.inference import InferenceModel
from lmkit.lightning_module import LitLanguageModel

log = logging.getLogger("lmkit")

def finetune(model: InferenceModel, *, steps: int, lr: float | None = None, callbacks: list[Any] | None = None,
             cache_dir: str, seed: int, device: str | None = None) -> None:
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
    module = LitLanguageModel(model=record.model_settings, optim=optim, vocab_size=record.backbone.vocab_size)
    module.backbone = model.backbone  # train the given weights, not the fresh ones the constructor built
    module.tokenizer = model.tokenizer
    home, target = model.device, torch.device(device) if device else model.device
    trainer = L.Trainer(max_steps=steps, accelerator=target.type, devices=[target.index or 0] if target.type == "cuda"
                        else 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=callbacks or [])
    log.info("Fine-tuning %d steps at lr %.2g on %s", steps, optim["lr"], target)
    model.backbone.train()
    trainer.fit(module, datamodule=datamodule)
    model.backbone.to(home).eval()  # Lightning leaves it on the CPU after fit; measure and export where it was
