"""The compression plugin contract, and the registry that finds plugins through entry points.

A plugin is a small class with up to four hooks, each optional:

    callbacks(module)          Lightning callbacks for training time (a pruning schedule, ...)
    apply(model, context)      the post-training transform of `model` (an InferenceModel) in place:
                               quantize, prune, shrink (a new shape goes in `model.record`);
                               returns extra details for its step's record
    restore(backbone, record)  on load: turn a freshly built dense backbone into the compressed
                               structure (the stored tensors are then loaded into it)
    quantize_part(part)        QLoRA's base (finetune.base=NAME), quantized as it is read: one part of a
                               model (a block; the embeddings, norm and head) quantized as `apply` would
                               quantize it in the whole model (plugins whose weights alone decide it)
    pack(tensors, record) /    how its tensors are written to and read back from model.safetensors
    unpack(tensors, record)    (a pruned weight as a bitmask and its non-zero values, ...)

plus `check()` for its settings, `check_model(model)` and `check_after(earlier)` before any work starts, and three flags
that order a recipe: nothing follows a plugin that `quantizes`, and nothing that `finetunes`
follows one that `sparsifies` (the fine-tune would fill the zeros back in).

`record` is what the plugin put in `config.json` for its step (`{"plugin": name, "settings": ...}`
plus anything `apply` added), so loading rebuilds the exact model from plain JSON and tensors.
Plugins are found by name through the entry-point group `lmkit.plugins`: a name in a file only
ever selects one of the installed plugins, it never names code to import. Loading must not need
Lightning or Hydra, so a plugin imports Lightning inside `callbacks` only; its recovery training is
`context.finetune(model, steps=..., lr=..., callbacks=[...], teacher=Teacher(...))` (with a teacher:
distillation from it), and its calibration data `context.calibration(model, windows)`, both injected
by whoever compresses. This module imports nothing of lmkit's training stack; tensor helpers for
plugins are in lmkit.tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn as nn

from lmkit.errors import LmkitError

if TYPE_CHECKING:
    from lmkit.inference import InferenceModel

ENTRY_POINT_GROUP = "lmkit.plugins"


@dataclass
class Teacher:
    """Distillation during a fine-tune: the loss becomes (1 - weight) * the data loss + weight * T^2 *
    KL(teacher || student) on logits softened by the temperature T (Hinton et al. 2015)."""

    backbone: nn.Module  # the model as it was before the plugin changed it, in eval mode; never trained
    temperature: float = 2.0
    weight: float = 0.5


class Finetune(Protocol):
    def __call__(self, model: InferenceModel, *, steps: int, lr: float | None = None,
                 callbacks: list[Any] | None = None, teacher: Teacher | None = None) -> None: ...


def no_finetune(model: InferenceModel, *, steps: int, lr: float | None = None,
                callbacks: list[Any] | None = None, teacher: Teacher | None = None) -> None:
    if steps > 0:
        raise LmkitError(f"this compression run cannot fine-tune ({steps} steps asked): set finetune_steps=0")


def no_calibration(model: InferenceModel, windows: int) -> torch.Tensor:
    raise LmkitError("this compression run has no calibration data (the model's training corpus): "
                     "choose a criterion that needs none (criterion=magnitude)")


@dataclass
class CompressContext:
    """What the core offers a plugin's `apply`: the model's corpus, a log, and a fine-tuning loop.

    The fine-tune is injected by whoever compresses (lmkit.compress.training_context gives lmkit's
    Lightning loop), so this contract imports nothing from the training stack."""

    cache_dir: str  # the token cache (for fine-tuning and evaluation on the model's own corpus)
    seed: int = 1337
    log: Callable[[str], Any] = print  # where progress lines go
    finetune: Finetune = no_finetune  # finetune(model, steps=N, lr=..., callbacks=[...], teacher=...) trains in place
    # calibration(model, N): N windows (N, seq_len) of token ids from the model's own training split
    calibration: Callable[[InferenceModel, int], torch.Tensor] = no_calibration


class Plugin:
    """Base class: set `name` and `summary`, override the hooks you need.

    Settings arrive as keyword arguments: from `conf/compression/<name>.yaml` plus overrides when
    compressing, from `config.json` when loading. Unknown settings are an error (a typo must not
    silently fall back to a default).
    """

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, shown by `lmkit plugins`
    defaults: ClassVar[dict[str, Any]] = {}
    quantizes: ClassVar[bool] = False  # a quantized model is final: no plugin may follow one
    sparsifies: ClassVar[bool] = False  # leaves zeros that a later fine-tune would fill back in
    finetunes: ClassVar[bool] = False  # trains the model in `apply`
    # Settings added after artifacts were first written, with the value those older artifacts imply: their
    # records lack the key, and today's default may differ (prune's criterion was magnitude before sparsegpt).
    introduced: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Plugin:
        """The plugin as a step of `config.json` recorded it (an older lmkit's record included)."""
        return cls(**{**cls.introduced, **(record.get("settings") or {})})

    def __init__(self, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise LmkitError(f"compression.{self.name}: unknown setting {', '.join(unknown)} "
                             f"(settings: {', '.join(self.defaults) or 'none'})")
        for key, value in settings.items():
            check_type(f"compression.{self.name}.{key}", value, self.defaults[key])
        self.settings = {**self.defaults, **settings}
        self.check()

    def check(self) -> None:
        """Raise LmkitError for settings out of range."""

    def check_model(self, model: InferenceModel) -> None:
        """Raise LmkitError if this plugin cannot compress `model` (called before any work starts)."""

    def check_after(self, earlier: list[str]) -> None:
        """Raise LmkitError if this plugin's settings cannot follow the steps `earlier` (plugin names, those the
        model was compressed with before included), e.g. a grid without an exact zero after pruning."""

    def needs_corpus(self) -> tuple[str, str] | None:
        """(why, the settings that avoid it) if these settings need the model's training corpus, e.g.
        ("fine-tunes", "finetune_steps=0"): compressing a model that records none is refused before any work."""
        return ("fine-tunes", "finetune_steps=0") if self.finetunes and self.settings.get("finetune_steps") else None

    def describe(self) -> str:
        """A few words on how this step ran (criterion, pattern, recovery, ...) for the report's rows."""
        return ""

    @property
    def during_training(self) -> bool:
        """Whether this plugin works during training (its `callbacks`), which finetune=lora and trainer=fsdp refuse
        before the run starts (lmkit.preflight): a plugin whose `callbacks` return any must say so here (its
        `during_training` setting by default)."""
        return bool(self.settings.get("during_training", False))

    def callbacks(self, module: Any) -> list[Any]:
        """Lightning callbacks that compress while the model trains (`during_training`)."""
        return []

    def apply(self, model: InferenceModel, context: CompressContext) -> dict[str, Any]:
        """Transform `model` in place; return what `restore`/`unpack` will need (merged into the record)."""
        return {}

    def restore(self, backbone: nn.Module, record: dict[str, Any]) -> nn.Module:
        return backbone

    def quantize_part(self, part: nn.Module) -> nn.Module:
        """`part` of a model (its weights real, the rest of the model perhaps not yet) quantized as `apply` quantizes
        the whole model with these settings, returned; a tied pair must come in one part. QLoRA's base loads this way
        (lmkit.lora.quantized_base), so no moment holds the whole float model."""
        raise LmkitError(f"{self.name} does not quantize a model part by part, as a QLoRA base (finetune.base) needs")

    def pack(self, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, torch.Tensor]:
        return tensors

    def unpack(self, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, torch.Tensor]:
        return tensors


def check_type(key: str, value: Any, default: Any) -> None:
    """A setting must have its default's type (a number for a number; anything for a None default)."""
    if default is None:
        return
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, kind = isinstance(value, type(default)), f"a {type(default).__name__}"
    if not ok:
        raise LmkitError(f"{key}={value!r} must be {kind}")


@cache
def installed() -> dict[str, Any]:
    """Entry points of every installed plugin, by name (not yet imported)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def plugin_class(name: str) -> type[Plugin]:
    eps = installed()
    if name not in eps:
        raise LmkitError(f"unknown compression plugin {name!r}; installed: {', '.join(sorted(eps)) or 'none'}")
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise LmkitError(f"the entry point {name!r} ({eps[name].value}) is not an lmkit.plugins.Plugin subclass")
    return cls


def make(name: str, settings: dict[str, Any] | None = None) -> Plugin:
    return plugin_class(name)(**(settings or {}))


def recipe(spec: dict[str, dict[str, Any] | None] | None) -> list[Plugin]:
    """`{name: settings}` in order (the `compression` config group) -> plugins, checked as a chain."""
    plugins = [make(name, settings) for name, settings in (spec or {}).items()]
    check_chain([p.name for p in plugins])
    return plugins


def check_chain(names: list[str], already: list[str] | None = None) -> None:
    """Quantized weights are final: nothing may follow a quantizing plugin (int8 then prune, int8 twice).

    `already`: the steps the model was compressed with before (recorded in its config.json)."""
    done = already or []
    chain = [*done, *names]
    for i, name in enumerate(chain[:-1]):
        earlier = plugin_class(name)
        for later in chain[i + 1:]:
            if earlier.quantizes and i < len(done):
                raise LmkitError(f"compression: {later} cannot run on this model: it is already quantized by {name} "
                                 "(start from the unquantized checkpoint)")
            if earlier.quantizes and plugin_class(later).quantizes:
                raise LmkitError(f"compression: {later} cannot follow {name} (both quantize the weights: choose one)")
            if earlier.quantizes:
                raise LmkitError(f"compression: {later} cannot follow {name} ({name} quantizes the weights, so the "
                                 f"model is final{'' if later == name else f'; put {later} before {name}'})")
            if earlier.sparsifies and plugin_class(later).finetunes:
                raise LmkitError(f"compression: {later} cannot follow {name} ({later} fine-tunes, which would fill "
                                 f"{name}'s zeros back in; put {later} before {name})")
