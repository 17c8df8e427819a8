"""Shared fixtures: configs composed by real Hydra, every path under pytest's tmp dirs. (What tests share that is not
a fixture, the train.py runners included: tests/helpers.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.helpers import CONF, TINY, write_tiny_corpus


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token cache for the session, so the embedded corpus is tokenized once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small char Transformer trained on the embedded corpus, and its checkpoint: one for the session, read (never
    written) by the command, ONNX, LoRA and PEFT tests. Its token cache is its own (`cache`), which the commands'
    evaluations read through LMKIT_CACHE."""
    from lmkit.train import run

    tmp = tmp_path_factory.mktemp("trained")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp / 'run'}", f"paths.cache_dir={tmp / 'cache'}",
                                          "model=transformer", *TINY, "model.n_head=2", "trainer.max_steps=40",
                                          "trainer.val_check_interval=40", "logger=none"])
    metrics, _ = run(cfg)
    return {"ckpt": Path(metrics["last_ckpt"]), "cache": tmp / "cache", "tmp": tmp, "metrics": metrics}


@pytest.fixture(scope="session")
def bases(trained, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base models saved as lmkit folders, read (never written) by the LoRA and PEFT tests: GPT-2's block (`trained`),
    a Llama block (random, tests.helpers.LORA_LLAMA) and an LSTM; all with the embedded corpus's char tokenizer."""
    import dataclasses

    import torch

    import lmkit
    from lmkit.backbones import LSTMConfig, build_backbone
    from lmkit.export import save
    from lmkit.inference import InferenceModel
    from lmkit.record import ModelRecord
    from tests.helpers import LORA_LLAMA

    tmp = tmp_path_factory.mktemp("bases")
    gpt = lmkit.load(trained["ckpt"])
    save(gpt, tmp / "gpt")
    torch.manual_seed(0)
    vocab_size = gpt.record.backbone.vocab_size
    for name, cfg in (("llama", dataclasses.replace(LORA_LLAMA, vocab_size=vocab_size)),
                      ("lstm", LSTMConfig(vocab_size=vocab_size, n_layer=1, n_embd=16))):
        save(InferenceModel(build_backbone(cfg).eval(), gpt.tokenizer, ModelRecord(backbone=cfg, tokenizer="char")),
             tmp / name)
    return {"gpt": tmp / "gpt", "llama": tmp / "llama", "lstm": tmp / "lstm", "cache": trained["cache"]}


@pytest.fixture(scope="session")
def bpe():
    """A byte-level BPE of 300 tokens trained on tests.helpers.TEXT (the GGUF tests' tokenizer)."""
    from lmkit.data.tokenizer import BPETokenizer
    from tests.helpers import TEXT

    return BPETokenizer.train([TEXT * 3], vocab_size=300)


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: Path):
    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        out = output_dir or tmp_path / "run"
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("train", overrides=[f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}", *overrides])

    return make


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    return write_tiny_corpus(tmp_path / "tiny.txt")
