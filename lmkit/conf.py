"""The config tree in `conf/`: where every default lives, for training and for the `lmkit` commands alike.

`python train.py` and `lmkit train` compose `conf/train.yaml` through one `@hydra.main`
(lmkit.train.main); `lmkit generate|eval|export` compose `conf/<command>.yaml` here, so a default
is written once, in YAML, next to the comment that explains it. Also the checks of the training command line
that must run before Hydra composes anything (a user's --config-dir that is missing, the Optuna extra).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from lmkit.errors import LmkitError, first_line

_PACKAGE = Path(__file__).resolve().parent
# A wheel carries conf/ as lmkit/_conf; a checkout (and an editable install) reads the repository's conf/.
CONF_DIR = next((d for d in (_PACKAGE / "_conf", _PACKAGE.parent / "conf") if (d / "train.yaml").is_file()),
                _PACKAGE / "_conf")


def check_conf_dir() -> None:
    if not (CONF_DIR / "train.yaml").is_file():
        raise LmkitError(f"lmkit's configs are missing from {CONF_DIR}: reinstall lmkit (pip install lmkit, or "
                         "pip install -e . in a checkout)")


def compose(config_name: str, overrides: list[str]) -> Any:
    """`conf/<config_name>.yaml` with Hydra overrides, as a DictConfig; problems are one-line errors."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_conf_dir()
    try:
        if GlobalHydra.instance().is_initialized():  # inside train.py's @hydra.main, which reads this same tree
            return hydra_compose(config_name, overrides=overrides)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        message = first_line(e, limit=None)
        missing = re.search(r"Could not find 'compression/([^']+)'", message)
        if missing:
            from lmkit.plugins import installed

            if missing[1] in installed():  # a plugin installed without a file in conf/compression/
                raise LmkitError(f"compression={missing[1]}: the plugin has no conf/compression/{missing[1]}.yaml; "
                                 f"select it with +compression.{missing[1]}={{}} (or +compression.{missing[1]}.KEY=...)")
            raise LmkitError(f"unknown compression plugin {missing[1]!r}; installed: {', '.join(sorted(installed()))}")
        unknown = re.search(r"Could not override '([^']+)'", message)
        if unknown:
            raise LmkitError(f"unknown key {unknown[1]!r}: the keys are in conf/{config_name}.yaml") from None
        raise LmkitError(f"lmkit: {message}") from None


def load_flat(config_name: str, overrides: list[str]) -> Any:
    """A config without a defaults list (conf/generate.yaml) with key=value overrides, without Hydra:
    the same keys and errors as `compose`, a third of a second sooner (`lmkit generate` starts faster)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    check_conf_dir()
    cfg = OmegaConf.load(CONF_DIR / f"{config_name}.yaml")
    OmegaConf.set_struct(cfg, True)
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except ConfigKeyError as e:
        raise LmkitError(f"unknown key {e.key!r}: the keys are in conf/{config_name}.yaml") from None
    except OmegaConfBaseException as e:
        raise LmkitError(f"lmkit: {first_line(e, limit=None)}") from None


def group_option(group: str, option: str) -> dict[str, Any]:
    """One option of a config group as plain values, e.g. `group_option("optim", "adamw")`."""
    from omegaconf import OmegaConf

    cfg = compose("train", [f"{group}={option}", "paths.output_dir=unused"])
    return OmegaConf.to_container(cfg[group], resolve=True)


def check_sweeper(args: list[str]) -> None:
    """`hparams_search=...` needs Hydra's Optuna sweeper, an extra. Checked on the command line, before Hydra
    composes the config: without the plugin, Hydra's own error is a page about a missing hydra/sweeper option."""
    if not any(re.fullmatch(r"\+{0,2}hparams_search=(?!null$).+", arg) for arg in args):
        return
    for module in ("hydra_plugins.hydra_optuna_sweeper", "optuna"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # (its parent package is missing)
            found = False
        if not found:
            raise LmkitError(f"hparams_search needs Hydra's Optuna sweeper ({module} is not installed): "
                             "pip install 'lmkit[optuna]'")


CONFIG_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def config_flags(args: list[str]) -> list[tuple[str, str]]:
    """Hydra's flags on a command line that say where configs come from, as (flag, value) pairs, however they are
    written (`--config-dir my_conf`, `-cn=name`)."""
    pairs = []
    for i, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if name in CONFIG_FLAGS:
            pairs.append((name, value if equals else (args[i + 1] if i + 1 < len(args) else "")))
    return pairs


def check_config_dirs(args: list[str]) -> None:
    """A user's config folder (`--config-dir DIR`, `-cd=DIR`) must exist: Hydra's own word for it is no error."""
    for name, folder in config_flags(args):
        if name in ("--config-dir", "-cd") and not Path(folder).is_dir():
            raise LmkitError(f"{name} {folder}: no such folder (a folder of your own config groups, e.g. "
                             "model/, experiment/)")
