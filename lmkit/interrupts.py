"""SIGTERM and Ctrl-C during training: every rank stops after the same step, saves `last.ckpt`, and exits 143 or 130.

The whole protocol lives here, behind one door, `stop_on_interrupts(trainer)` around the trainer's calls
(lmkit.train.run):

- a signal only notes itself in the process it reaches (`CheckpointOnInterrupt`'s handlers);
- the ranks agree on the notes at the next step or evaluation batch end (an all-reduce of every rank's note), and
  only the agreed flag reaches Lightning's loops, which stop at that boundary: every rank stops after the same
  step, so the collective checkpoint save meets every rank there;
- the process exits with 128 + the signal's number: 130 after Ctrl-C, 143 after SIGTERM (SLURM's pre-emption).

Lightning's private classes are touched here and nowhere else: `_SignalConnector` (its SIGTERM handler is replaced)
and `trainer._signal_connector.received_sigterm` (the flag its loops read). Tested with lightning 2.6.6 (pyproject
allows >=2.4,<3; the SIGTERM runs of tests/test_train.py, test_distributed.py and test_parallel.py and the Ctrl-C
runs of tests/test_console.py are what breaks first if a release moves them). The checkpoint's loop key
`_batches_that_stepped` (which `CheckpointOnInterrupt` corrects) is Lightning's too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("lmkit")

EXIT_CODES = {"Ctrl-C": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}  # what a shell reports for each


@contextmanager
def stop_on_interrupts(trainer: L.Trainer) -> Iterator[None]:
    """Run the trainer's calls in the block under the protocol above (without a `CheckpointOnInterrupt` callback,
    a config that removed it, Lightning's own SIGTERM handling runs: see `sigterm_exits_143`)."""
    callback = next((c for c in trainer.callbacks if isinstance(c, CheckpointOnInterrupt)), None)
    if callback is None:
        yield
        return
    with callback.interrupts(trainer):
        yield


@contextmanager
def sigterm_exits_143() -> Iterator[None]:
    """Around a whole run: wherever Lightning's own SIGTERM handling stops it (a config without the callback, or a
    compression plugin's recovery fine-tune after training), its exit, a SystemExit with code 0, becomes 143: a
    terminated run says so."""
    try:
        yield
    except SIGTERMException:
        raise SystemExit(EXIT_CODES["SIGTERM"]) from None


class _NoCollectiveInTheHandler(_SignalConnector):
    """Lightning's signal connector without its SIGTERM handler. That handler broadcasts from inside the
    signal handler, so the broadcast runs on each rank wherever the signal found it and pairs with
    whatever collective the other rank is in (an FSDP all-gather, the next step's flag broadcast): under
    several ranks a SIGTERM hung about one run in four. `CheckpointOnInterrupt` handles the signal instead."""

    def _sigterm_notifier_fn(self, signum: Any, frame: Any) -> None:
        pass


class CheckpointOnInterrupt(L.Callback):
    """On SIGTERM (what SLURM sends before pre-emption) or Ctrl-C, save `last.ckpt` so `resume=true` continues.

    A Ctrl-C never lands inside a step (a half-applied optimizer step); a second Ctrl-C quits at once, saving
    nothing. (A flag each rank checks on its own, as Lightning's is, lets rank 0 stop while rank 1 waits in the next
    step's all-gather: hence the agreement.)

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
                raise SystemExit(EXIT_CODES["Ctrl-C"])
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
        return EXIT_CODES[self.signalled or "SIGTERM"]

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

