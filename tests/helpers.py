"""Callbacks that tests add to real runs with `+callbacks.<name>._target_=tests.helpers...`."""

import lightning as L


class CrashOnRank(L.Callback):
    """Make one rank fail mid-training, as a bad node or an out-of-memory error would."""

    def __init__(self, rank: int = 1, step: int = 3) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank}")


def touch_marker(marker: str, **_) -> None:
    """A `_target_` that leaves a trace when something instantiates it."""
    open(marker, "w").close()
