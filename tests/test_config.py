"""Every config option composes with real Hydra, and the trainer group exposes every Trainer argument."""

import inspect

import lightning as L
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.helpers import CONF

GROUPS = ["model", "data", "tokenizer", "optim", "trainer", "logger", "callbacks", "experiment"]
REQUIRED = {"data=text": ["data.path=corpus.txt"], "data=chat": ["data.path=chats.jsonl"],
            "data=preference": ["data.path=pairs.jsonl"],
            "tokenizer=file": ["tokenizer.path=tokenizer.json"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("choice", [f"{g}={o}" for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(choice, make_cfg):
    cfg = make_cfg(choice, *REQUIRED.get(choice, []))
    OmegaConf.resolve(cfg)  # every interpolation resolves
    if cfg.trainer.accelerator != "gpu":
        assert isinstance(instantiate(cfg.trainer, logger=False), L.Trainer)
    datamodule = instantiate(cfg.data, tokenizer=OmegaConf.to_container(cfg.tokenizer), cache_dir="unused", seed=0)
    assert datamodule.seq_len == cfg.data.seq_len
    for entry in (cfg.callbacks or {}).values():
        assert isinstance(instantiate(entry), L.Callback)


def test_trainer_group_names_every_trainer_argument(make_cfg):
    cfg = make_cfg()
    arguments = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks"}
    assert arguments <= set(cfg.trainer), sorted(arguments - set(cfg.trainer))


def test_canonical_keys_are_plain_overrides(make_cfg):
    cfg = make_cfg("model=transformer", "model.n_layer=3", "model.n_head=3", "model.n_embd=96", "model.dropout=0.2", "data.seq_len=48",
                   "data.batch_size=7", "optim.lr=3e-4", "trainer.max_steps=9", "trainer.max_time=00:00:01:00",
                   "trainer.accelerator=cpu", "trainer.devices=1", "seed=5", "trainer.accumulate_grad_batches=2")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.dropout) == (3, 3, 96, 0.2)
    assert (cfg.data.seq_len, cfg.model.max_seq_len, cfg.data.batch_size) == (48, 48, 7)
    assert (cfg.optim.lr, cfg.trainer.max_steps, cfg.seed) == (3e-4, 9, 5)
    text = make_cfg("data=text", "data.path=some/*.txt", "model=lstm")
    assert text.data.path == "some/*.txt" and text.model.kind == "lstm"


def test_every_user_facing_key_is_documented_inline():
    """The keys users type (model, data, tokenizer, optim, trainer) carry a comment on their line or the line above."""
    for group in ("model", "data", "tokenizer", "optim", "trainer", "experiment", "finetune", "hparams_search"):
        for path in sorted((CONF / group).glob("*.yaml")):
            lines = path.read_text().splitlines()
            for i, line in enumerate(lines):
                key = line.split(":")[0].strip()
                if not key or key.startswith(("#", "-", "_")) or line.rstrip().endswith(":"):
                    continue
                assert "#" in line or lines[i - 1].lstrip().startswith("#"), f"{path.relative_to(CONF)}: {line}"
