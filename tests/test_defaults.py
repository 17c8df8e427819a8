"""Defaults live in conf/: where Python also states one (for notebook use), it must agree with the YAML.

A key whose YAML value is an interpolation (`max_seq_len: ${data.seq_len}`) states a rule, not a
value, and is left out.
"""

import dataclasses
import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lmkit.backbones import BACKBONES
from lmkit.compress import compress
from lmkit.data.datamodule import LMDataModule
from lmkit.inference import InferenceModel
from lmkit.plugins import installed, plugin_class
from tests.helpers import CONF


def stated(source: Path | DictConfig) -> dict[str, Any]:
    """The plain values a YAML file (or node) states: no defaults list, interpolations or `???`."""
    node = OmegaConf.to_container(OmegaConf.load(source) if isinstance(source, Path) else source, resolve=False)
    return {k: v for k, v in node.items() if k != "defaults" and v != "???"
            and not (isinstance(v, str) and v.startswith("${"))}


def python_defaults(function: Any) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def disagreements(python: dict[str, Any], yaml: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    def same(a: Any, b: Any) -> bool:
        if isinstance(b, dict) and "_target_" in b:  # a value built from a node (timeout: datetime.timedelta)
            b = instantiate(b)
        return a == b or (isinstance(a, tuple) and list(a) == b)

    return {k: (python[k], yaml[k]) for k in python.keys() & yaml.keys() if not same(python[k], yaml[k])}


@pytest.mark.parametrize("kind", BACKBONES)
def test_backbone_config_defaults_are_the_model_presets(kind):
    fields = {f.name: f.default for f in dataclasses.fields(BACKBONES[kind][1])
              if f.default is not dataclasses.MISSING}
    preset = OmegaConf.load(CONF / "model" / f"{kind}.yaml").model
    assert fields.keys() - {"layer_heads", "layer_ffn"} <= preset.keys()  # every option is a key users see
    assert not disagreements(fields, stated(preset))


def test_data_module_takes_its_defaults_from_conf_data():
    shared = stated(CONF / "data" / "shakespeare.yaml")
    text = stated(CONF / "data" / "text.yaml")
    signature = inspect.signature(LMDataModule).parameters
    # the shared keys have no Python default at all; the file-only keys agree with data=text
    assert all(signature[k].default is inspect.Parameter.empty for k in shared.keys() - {"_target_"})
    assert not disagreements(python_defaults(LMDataModule), text)
    keys = OmegaConf.load(CONF / "data" / "shakespeare.yaml").keys() | OmegaConf.load(CONF / "data" / "text.yaml").keys()
    assert set(signature) == (keys | {"tokenizer", "cache_dir", "seed"}) - {"_target_", "defaults"}


def test_generate_defaults_are_lmkit_generates():
    assert not disagreements(python_defaults(InferenceModel.generate), stated(CONF / "generate.yaml"))
    assert python_defaults(InferenceModel.generate)["temperature"] == stated(CONF / "generate.yaml")["temperature"]


def test_compression_measure_defaults_are_lmkit_exports():
    assert not disagreements(python_defaults(compress), stated(CONF / "export.yaml"))


@pytest.mark.parametrize("name", sorted(installed()))
def test_plugin_defaults_are_their_yaml(name):
    path = CONF / "compression" / f"{name}.yaml"
    assert plugin_class(name).defaults == stated(path), path


def test_every_lmkit_target_agrees_with_its_yaml():
    """Callbacks, loggers and strategies built from `_target_: lmkit....` nodes."""
    checked = []

    def walk(node: Any, path: Path) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if isinstance(target, str) and target.startswith("lmkit."):
                module, _, name = target.rpartition(".")
                found = disagreements(python_defaults(getattr(importlib.import_module(module), name)), stated(
                    OmegaConf.create(node)))
                assert not found, (path, target, found)
                checked.append(target)
            for value in node.values():
                walk(value, path)

    for path in sorted(CONF.rglob("*.yaml")):
        walk(OmegaConf.to_container(OmegaConf.load(path), resolve=False), path)
    assert {"lmkit.callbacks.TextSampler", "lmkit.interrupts.CheckpointOnInterrupt", "lmkit.callbacks.StepProgressBar",
            "lmkit.loggers.wandb_logger", "lmkit.parallel.strategy.ShardedStrategy"} <= set(checked)
