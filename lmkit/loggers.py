"""Logger factories that need more than a `_target_`."""

from __future__ import annotations

import logging
import netrc
import os
from typing import Any

log = logging.getLogger("lmkit")


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(offline: bool | None = None, **kwargs: Any):
    """A WandbLogger that falls back to offline mode (and says so once) when no account is set up."""
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not _wandb_has_credentials()
        if offline:
            log.warning("wandb: no API key found (WANDB_API_KEY or ~/.netrc); logging offline to %s. "
                        "Upload later with `wandb sync`.", kwargs.get("save_dir", "."))
    return WandbLogger(offline=offline, **kwargs)
