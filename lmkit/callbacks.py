"""Callbacks that belong to language modelling: text samples, tokens per second, a step-counting
progress bar; and how checkpoints reach the disk. (The checkpoint on SIGTERM or Ctrl-C: lmkit.interrupts.)"""

from __future__ import annotations

import io
import logging
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol  # (private; tested with lightning 2.6.6)
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from tqdm.contrib.logging import logging_redirect_tqdm

from lmkit.distributed import data_parallel
from lmkit.errors import LmkitError
from lmkit.files import atomic_write, cannot_write, check_writable
from lmkit.generate import generate
from lmkit.interrupts import CheckpointOnInterrupt
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
        self.step: int | None = None  # the global step `last` was sampled at

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if module.tokenizer is not None and not module.tokenizer.encode(self.prompt):
            raise LmkitError(f"callbacks.text_sampler.prompt={self.prompt!r} encodes to no tokens")

    def sample(self, backbone: torch.nn.Module, tokenizer: Any, sharded: bool = False) -> str:
        """Sample from `backbone`. A `sharded` backbone is sampled by every rank together, with the same seed, so
        all ranks draw the same tokens; it re-reads the text at each token rather than keeping a KV cache (a
        cache would have to hold each rank's share of the heads, in FSDP's compute dtype)."""
        device = next(backbone.parameters()).device
        ids = torch.tensor([tokenizer.encode(self.prompt)], device=device)
        # A private generator: sampling must not move the training RNG (exact resume depends on it).
        gen = torch.Generator(device=device).manual_seed(self.seed)
        was_training = backbone.training
        backbone.eval()
        try:
            out = generate(backbone, ids, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                           top_k=self.top_k, generator=gen, use_cache=not sharded)
        finally:
            backbone.train(was_training)
        return tokenizer.decode(out[0].tolist())

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        sharded = module.device_mesh is not None  # every rank holds a part of the model: all take part
        if not fitting or module.tokenizer is None or not (trainer.is_global_zero or sharded):
            return
        text, self.step = self.sample(module.backbone, module.tokenizer, sharded), trainer.global_step
        if not trainer.is_global_zero:
            return
        self.last = text
        log.info("Sample at step %d:\n%s", trainer.global_step, self.last)
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(f"=== step {trainer.global_step}\n{self.last}\n\n")
            except OSError as e:
                raise cannot_write(self.path, e) from None


class Throughput(L.Callback):
    """Training tokens per second (all data-parallel replicas together), with evaluation time left out."""

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
        # (a chat batch counts the tokens that are not padding: lmkit.data.chat_datamodule.ChatBatch.tokens)
        self.tokens += getattr(batch, "tokens", batch[0].numel()) * data_parallel(trainer)[1]
        if logging_step(trainer):
            module.log("tokens_per_s", self.tokens_per_s, prog_bar=True)

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._since is not None:
            self.elapsed += time.perf_counter() - self._since
            self._since = None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.on_validation_start(trainer, module)


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar, counting optimizer steps:
    `step 120/4000 |███  | [00:04<02:10, loss=2.190, tokens/s=31,812, val_loss=2.520]`.

    An lmkit run is one endless epoch stopped by `trainer.max_steps`, so Lightning's "Epoch 0: 3%" says
    nothing; the step is the number that means something (and a resumed run starts at its step).
    While the bars are up, console logging goes through `tqdm.write`, so a log line (a text sample,
    Lightning's "max_steps reached") is printed on a line of its own rather than glued to a bar.
    """

    BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}{postfix}]"
    NAMES = {"train_loss": "loss", "tokens_per_s": "tokens/s"}  # shown first, in this order

    def __init__(self, refresh_rate: int = 20, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate, process_position, leave)
        self._redirect: Any = None

    train_description = property(lambda self: "step")
    sanity_check_description = property(lambda self: "sanity check")
    validation_description = property(lambda self: "validation")
    test_description = property(lambda self: "test")

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, module, stage)
        if self.is_enabled and self._redirect is None:
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self._end_redirect()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._end_redirect()

    def _end_redirect(self) -> None:
        if self._redirect is not None:
            redirect, self._redirect = self._redirect, None
            redirect.__exit__(None, None, None)

    def init_test_tqdm(self) -> Any:  # Lightning's names its bar "Testing" whatever test_description says
        return Tqdm(desc=self.test_description, position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stdout, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.n = bar.initial = trainer.global_step
        bar.set_description_str(self.train_description)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if step != bar.n and self._should_update(step, bar.total):  # (accumulating batches repeat a step)
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, module))  # redraws

    def on_validation_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self.has_dataloader_changed(dataloader_idx):  # Lightning's, without "DataLoader 0" after the name
            desc = self.sanity_check_description if trainer.sanity_checking else self.validation_description
            self._start(self.val_progress_bar, desc, self.total_val_batches_current_dataloader, dataloader_idx)

    def on_test_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        if self.has_dataloader_changed(dataloader_idx):
            self._start(self.test_progress_bar, self.test_description, self.total_test_batches_current_dataloader,
                        dataloader_idx)

    def _start(self, bar: Any, desc: str, total: float, dataloader_idx: int) -> None:
        bar.set_description_str(desc if dataloader_idx == 0 else f"{desc} (data loader {dataloader_idx})",
                                refresh=False)
        bar.reset(total=convert_inf(total))

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, int | str | float]:
        metrics = super().get_metrics(trainer, module)
        metrics.pop("v_num", None)  # the logger's version: lmkit's loggers write into the run folder
        if isinstance(metrics.get("tokens_per_s"), (int, float)):
            metrics["tokens_per_s"] = f"{metrics['tokens_per_s']:,.0f}"
        first = {self.NAMES[k]: metrics.pop(k) for k in self.NAMES if k in metrics}
        return {**first, **metrics}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing local files the way every lmkit file is written (lmkit.files).

    Lightning's own writes the checkpoint to a temporary file and moves it into place, which across
    file systems is a copy: a full disk then leaves a truncated `last.ckpt` where the previous good one
    was, and prints a traceback. Here the file is written beside its destination and renamed over it;
    a refused write is one `cannot write PATH: ...` line, and the previous checkpoint stays whole.
    `use_atomic_checkpoints(trainer)` puts it in place of Lightning's default writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()  # torch.save straight into a file turns a full disk into a bare RuntimeError
        torch.save(checkpoint, buffer)
        atomic_write(Path(path), lambda fh: fh.write(buffer.getbuffer()))

    def remove_checkpoint(self, path: Any) -> None:
        try:
            super().remove_checkpoint(path)
        except OSError as e:
            raise cannot_write(path, e) from None


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Write the trainer's checkpoints with `AtomicCheckpointIO`, and check their folders can be written
    before training starts rather than at the first validation.

    A checkpoint writer the user configured (`trainer.plugins`) is left alone."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    folders = {str(c.dirpath) for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath}
    folders |= {str(c.path.parent) for c in trainer.callbacks if isinstance(c, CheckpointOnInterrupt)}
    for folder in sorted(folders):
        if _is_local_file_protocol(folder):
            check_writable(Path(folder))


# Configs written before lmkit.interrupts name the callback here, and by its name from before Ctrl-C saved too
CheckpointOnSigterm = CheckpointOnInterrupt
