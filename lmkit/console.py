"""One quiet, honest console for a training run: each message once, nothing that is not about the run.

`lmkit.train.run` calls `quiet_console()` first (Hydra has configured logging by then) and runs the
trainer inside `known_warnings(...)`. They fix three upstream habits, each by its cause, and silence
nothing else:

- Lightning's loggers print twice. `import lightning` gives the `lightning` logger a console handler
  of its own (and `lightning.pytorch` / `lightning.fabric` one each when the root logger had none at
  import time), while Hydra's `job_logging` gives the root logger a console and a `train.log`
  handler. When the application has configured the root logger, Lightning's records go through it
  alone: once on the console, in Hydra's format, and into train.log.
- Lightning advertises its cloud services ("💡 Tip: ... litlogger / litmodels") through its
  rank-zero logger: a filter drops exactly those records.
- Known upstream warnings that say nothing about the user's run are ignored by message, each with
  the reason beside it, and only while the trainer runs; every other warning still shows.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The console handlers Lightning adds on import (lightning/__init__.py, lightning/pytorch/__init__.py,
# lightning/fabric/__init__.py).
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class _DropAdvertising(logging.Filter):
    """Drop Lightning's "💡 Tip: try installing litlogger/litmodels" records (rank_zero_info)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_console() -> None:
    """Route Lightning's logging through the root logger (when the application configured one) and drop
    its advertising. Idempotent."""
    if logging.getLogger().handlers:  # the application (Hydra's job_logging) configured logging
        for name in _LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # Lightning's own console handler, not a file
                    logger.removeHandler(handler)
            logger.propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertising) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdvertising())


@contextmanager
def known_warnings(output_dir: str | Path, resuming: bool = False) -> Iterator[None]:
    """While the block runs, ignore the upstream warnings that say nothing about this run."""
    output_dir = Path(output_dir)
    with warnings.catch_warnings():
        # torch 2.10+ deprecates `isinstance(spec, LeafSpec)`, which Lightning's own _pytree.py (2.6.6)
        # still does on every evaluation: nothing a user of lmkit can act on.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        if not (output_dir / "metrics.csv").exists():
            # The CSV logger writes into the run folder, which always holds Hydra's .hydra/ and train.log,
            # so Lightning says on every fresh run that it "exists and is not empty". The warning is about
            # deleting an earlier metrics.csv: where there is one (a resumed run), it stays.
            folder = re.escape(str(output_dir).rstrip("/"))
            warnings.filterwarnings("ignore", message=rf"Experiment logs directory {folder}/? exists and is not empty")
        if resuming:  # continuing a run: its checkpoint folder holds its checkpoints, as it should
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        yield
