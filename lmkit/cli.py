"""The `lmkit` command. `lmkit train key=value ...` is `python train.py key=value ...` from anywhere."""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = """usage: lmkit <command> [key=value ...]

commands:
  train    train a model (same overrides as `python train.py`, e.g. `lmkit train model=lstm`)
"""

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _train(args: list[str]) -> None:
    if not CONF_DIR.is_dir():
        print(f"error: lmkit train needs the configs in {CONF_DIR} (install lmkit from a source checkout: pip install -e .)",
              file=sys.stderr)
        raise SystemExit(2)
    import hydra
    from omegaconf import DictConfig

    from lmkit.errors import exit_on_user_error
    from lmkit.train import run

    @hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
    def train(cfg: DictConfig) -> float | None:
        with exit_on_user_error():
            metrics, _ = run(cfg)
        return metrics.get(cfg.get("optimized_metric") or "val_loss")

    sys.argv = ["lmkit train", *args]
    train()


COMMANDS = {"train": _train}


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"error: unknown command {args[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    command(args[1:])
