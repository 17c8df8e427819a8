"""Callbacks that belong to language modelling: text samples, tokens per second, a step-counting
progress bar, a checkpoint on SIGTERM or Ctrl-C; and how checkpoints reach the disk."""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tqdm.contrib.logging import logging_redirect_tqdm

from lmkit.distributed import data_parallel
from lmkit.errors import LmkitError
from lmkit.files import atomic_write, cannot_write, check_writable
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


class _NoCollectiveInTheHandler(_SignalConnector):
    """Lightning's signal connector without its SIGTERM handler. That handler broadcasts from inside the
    signal handler, so the broadcast runs on each rank wherever the signal found it and pairs with
    whatever collective the other rank is in (an FSDP all-gather, the next step's flag broadcast): under
    several ranks a SIGTERM hung about one run in four. `CheckpointOnInterrupt` handles the signal instead."""

    def _sigterm_notifier_fn(self, signum: Any, frame: Any) -> None:
        pass


class CheckpointOnInterrupt(L.Callback):
    """On SIGTERM (what SLURM sends before pre-emption) or Ctrl-C, save `last.ckpt` so `resume=true` continues.

    A signal only notes itself in this process. The ranks then agree on it at the next step or
    evaluation batch end (an all-reduce of every rank's note), and only the agreed flag reaches
    Lightning's loops, which stop at that boundary: every rank stops after the same step, so the
    collective checkpoint save meets every rank there. (A flag each rank checks on its own, as
    Lightning's is, lets rank 0 stop while rank 1 waits in the next step's all-gather.) A Ctrl-C
    likewise never lands inside a step (a half-applied optimizer step). A second Ctrl-C quits at
    once, saving nothing. The process exits with 130 after Ctrl-C, 143 (128 + 15) after SIGTERM
    (`interrupts`, around the trainer calls in `lmkit.train.run`).

    Other exceptions save nothing: after a crash a peer rank may be gone, and the collective
    checkpoint save would wait for it. (Not Lightning's OnExceptionCheckpoint: its presence makes
    every `fit` silently resume from the newest checkpoint in the folder.)
    """

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.signalled: str | None = None  # "SIGTERM" or "Ctrl-C", as this process's handler noted it
        self._saving = False
        self._validated_at: int | None = None  # the step whose end ran the last in-training validation

    @contextmanager
    def interrupts(self, trainer: L.Trainer) -> Iterator[None]:
        """While the block runs, SIGTERM and Ctrl-C stop the trainer at the next agreed boundary and exit
        with 143 and 130; a signal that came after the last boundary exits when the block ends."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        self.signalled = None
        trainer._signal_connector = _NoCollectiveInTheHandler(trainer)

        def on_sigint(signum: int, frame: Any) -> None:
            if self.signalled == "Ctrl-C":  # the second Ctrl-C: out now, through every `finally`
                if trainer.is_global_zero:
                    os.write(2, b"\nCtrl-C again: quitting without saving\n")
                raise SystemExit(130)
            self.signalled = "Ctrl-C"
            if trainer.is_global_zero:  # os.write: print() in a signal handler can meet a half-done print
                os.write(2, b"\nCtrl-C: stopping at the end of this step (Ctrl-C again to quit at once, "
                            b"saving nothing)\n")

        def on_sigterm(signum: int, frame: Any) -> None:
            if self.signalled is None and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)  # the ranks this process started, as Lightning does
            self.signalled = self.signalled or "SIGTERM"

        previous = {signal.SIGINT: signal.signal(signal.SIGINT, on_sigint),
                    signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}
        try:
            yield
        except SIGTERMException:
            raise SystemExit(self.exit_code) from None
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if self.signalled:  # noted after the last boundary, where no loop was there to stop
            raise SystemExit(self.exit_code)

    @property
    def exit_code(self) -> int:
        return 130 if self.signalled == "Ctrl-C" else 143

    def _agree(self, trainer: L.Trainer, *_: Any) -> None:
        signalled = self.signalled is not None
        if trainer.world_size > 1:  # (one rank alone needs no tensor, nor the device sync of reading it back)
            flags = torch.tensor([signalled], dtype=torch.int32, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            signalled = bool(flags.item())
        if signalled:
            trainer._signal_connector.received_sigterm = True  # Lightning's loops stop at their next check
            if self.signalled is None:  # another rank was signalled: this one stops with it
                self.signalled = "SIGTERM"

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = _agree

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validated_at = trainer.global_step

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        what = self.signalled or "SIGTERM"
        if trainer.state.fn != "fit" or trainer.sanity_checking:  # nothing trained since the last checkpoint
            if trainer.is_global_zero:
                log.info("%s: stopped outside training; nothing new to save", what)
            return
        self._saving = True
        try:
            trainer.save_checkpoint(self.path, weights_only=False)  # (explicit: Lightning logs its default)
        finally:
            self._saving = False
        if trainer.is_global_zero:
            log.warning("%s: saved %s at step %d; to continue, run the same command with resume=true "
                        "hydra.run.dir=%s", what, self.path, trainer.global_step, trainer.default_root_dir)


    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._saving and self._validated_at == trainer.global_step:
            # Stopped in a step that validated: Lightning's restart replays that step's end (its
            # validation) and so counts the step for the loggers again, as for ModelCheckpoint's
            # checkpoint saved inside the validation, before the count moved on. Saved with that count,
            # the resumed run logs each step at its own number instead of one past it.
            checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1


CheckpointOnSigterm = CheckpointOnInterrupt  # its name in configs written before Ctrl-C saved too


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
