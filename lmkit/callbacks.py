"""Callbacks that belong to language modelling: text samples and tokens per second."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmkit.errors import LmkitError
from lmkit.generate import generate
from lmkit.lightning_module import logging_step

log = logging.getLogger("lmkit")


class TextSampler(L.Callback):
    """After each validation, sample a short text and log it (and append it to `samples.txt`)."""

    def __init__(self, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 40, seed: int = 0, path: str | None = None) -> None:
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.path = Path(path) if path else None
        self.last: str | None = None
        self.enabled = True

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        # Under FSDP, rank zero alone cannot run the sharded model; skip rather than hang.
        self.enabled = not isinstance(trainer.strategy, FSDPStrategy)
        if self.enabled and module.tokenizer is not None and not module.tokenizer.encode(self.prompt):
            raise LmkitError(f"callbacks.text_sampler.prompt={self.prompt!r} encodes to no tokens")

    def sample(self, module: L.LightningModule) -> str:
        tok = module.tokenizer
        ids = torch.tensor([tok.encode(self.prompt)], device=module.device)
        # A private generator: sampling must not move the training RNG (exact resume depends on it).
        gen = torch.Generator(device=module.device).manual_seed(self.seed)
        was_training = module.training
        module.eval()
        try:
            out = generate(module.backbone, ids, self.max_new_tokens, self.temperature, self.top_k, generator=gen)
        finally:
            module.train(was_training)
        return tok.decode(out[0].tolist())

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if not fitting or not self.enabled or not trainer.is_global_zero or module.tokenizer is None:
            return
        self.last = self.sample(module)
        log.info("Sample at step %d:\n%s", trainer.global_step, self.last)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(f"=== step {trainer.global_step}\n{self.last}\n\n")


class Throughput(L.Callback):
    """Training tokens per second (all ranks together), with evaluation time left out."""

    def __init__(self) -> None:
        self.tokens = 0
        self.elapsed = 0.0
        self._since: float | None = None

    @property
    def tokens_per_s(self) -> float:
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        total = self.elapsed + running
        return self.tokens / total if total > 0 else 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.tokens += batch[0].numel() * trainer.world_size
        if logging_step(trainer):
            module.log("tokens_per_s", self.tokens_per_s, prog_bar=True)

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._since is not None:
            self.elapsed += time.perf_counter() - self._since
            self._since = None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.on_validation_start(trainer, module)


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (what SLURM sends before pre-emption) save `last.ckpt`, so `resume=true` continues.

    Other exceptions save nothing: after a crash a peer rank may be gone, and the collective
    checkpoint save would wait for it. (Not Lightning's OnExceptionCheckpoint: its presence makes
    every `fit` silently resume from the newest checkpoint in the folder.)
    """

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            log.warning("SIGTERM: saved %s at step %d; continue with resume=true", self.path, trainer.global_step)
