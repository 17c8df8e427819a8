"""model.activation_checkpointing=K: blocks recompute their activations in the backward pass, and nothing else changes:
the losses (dropout on), the parameter names and checkpoints, the exported model; one process and FSDP x2."""

import csv
import json
from pathlib import Path

import pytest
import torch

import lmkit
from lmkit.activation_checkpointing import apply_activation_checkpointing, checkpointed_blocks
from lmkit.backbones import Transformer, TransformerConfig
from lmkit.errors import LmkitError
from lmkit.record import ModelRecord
from lmkit.train import run
from tests.helpers import TINY, TINY_TRANSFORMER, run_train_py, run_train_py_each, train_py_args

# Two blocks (K=2 checkpoints the second only), dropout on: its masks must be drawn again, identically, in the
# recomputation. Every step logged.
COMMON = ["model=transformer", *TINY_TRANSFORMER, "model.n_layer=2", "model.dropout=0.1", "trainer.log_every_n_steps=1",
          "optim.warmup_steps=2", "callbacks.text_sampler=null"]


def step_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as fh:
        rows = {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(fh) if r.get("train_loss")}
    return [rows[s] for s in sorted(rows)]


def test_one_process_trains_the_same_with_every_block_every_second_block_or_none_checkpointed(make_cfg, tmp_path):
    losses, keys = {}, {}
    for every in (0, 1, 2):
        out = tmp_path / f"k{every}"
        metrics, objects = run(make_cfg(*COMMON, "trainer.max_steps=6", "trainer.val_check_interval=6",
                                        f"model.activation_checkpointing={every}", output_dir=out))
        module = objects["module"]
        assert checkpointed_blocks(module.backbone) == {0: [], 1: [0, 1], 2: [1]}[every]
        losses[every] = step_losses(out)
        keys[every] = list(module.state_dict())
        saved = torch.load(metrics["last_ckpt"], weights_only=True)
        assert list(saved["state_dict"]) == keys[every]  # no `_checkpoint_wrapped_module.` in any name
        assert saved["hyper_parameters"]["activation_checkpointing"] == every  # a training setting, kept with the run
        assert "activation_checkpointing" not in saved["hyper_parameters"]["model"]  # ... and not the model's
    assert len(losses[0]) == 6
    assert losses[1] == pytest.approx(losses[0], abs=1e-6) and losses[2] == pytest.approx(losses[0], abs=1e-6)
    assert keys[1] == keys[2] == keys[0]
    # A checkpointed run's checkpoint loads as any other, and its record knows nothing of the setting
    model = lmkit.load(tmp_path / "k1" / "checkpoints" / "last.ckpt")
    assert "activation_checkpointing" not in model.record.model_settings


def test_the_setting_is_not_part_of_the_model_record():
    settings = {"kind": "transformer", "n_layer": 2, "n_head": 2, "n_embd": 16, "activation_checkpointing": 2}
    record = ModelRecord.from_settings(settings, vocab_size=50)
    assert record.backbone.n_layer == 2 and "activation_checkpointing" not in record.model_settings


def test_applying_it_twice_leaves_the_blocks_as_they_are_and_bad_values_are_one_line():
    model = Transformer(TransformerConfig(vocab_size=50, n_layer=4, n_head=2, n_embd=16, max_seq_len=8))
    names = list(model.state_dict())
    apply_activation_checkpointing(model, 2)
    apply_activation_checkpointing(model, 2)  # (Lightning configures the model at every fit, validate and test)
    assert checkpointed_blocks(model) == [1, 3] and list(model.state_dict()) == names
    for bad, message in ((-1, "is not a whole number of blocks"), (1.5, "is not a whole number of blocks"),
                         (True, "is not a whole number of blocks"), (5, "would checkpoint none of the model's 4")):
        with pytest.raises(LmkitError, match=message):
            apply_activation_checkpointing(model, bad)


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_the_same_with_every_block_checkpointed(tmp_path, cache_dir):
    """FSDP x2 with and without checkpointing, one sweep in one train.py process: the same losses step by step."""
    sweep = tmp_path / "sweep"
    result = run_train_py("-m", *COMMON, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                          "data.batch_size=4", "data.eval_batch_size=8", "trainer.max_steps=4",
                          "trainer.val_check_interval=4", "callbacks.model_checkpoint=null", "callbacks.preemption=null",
                          "model.activation_checkpointing=0,1", f"hydra.sweep.dir={sweep}",
                          run_dir=tmp_path / "unused", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())  # 0: off, 1: every block
    runs = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    assert [(m["world_size"], m["steps"]) for m in runs] == [(2, 4), (2, 4)]
    plain, checkpointed = (step_losses(job) for job in jobs)
    assert len(plain) == 4 and checkpointed == pytest.approx(plain, abs=1e-6)
    assert runs[1]["val_loss"] == pytest.approx(runs[0]["val_loss"], abs=1e-6)


def test_what_cannot_be_checkpointed_is_one_line(tmp_path, cache_dir):
    cases = {"lstm": (["model=lstm", *TINY, "model.activation_checkpointing=1"],
                      "model.activation_checkpointing=1: an LSTM has no blocks to checkpoint"),
             "negative": (["model=transformer", *TINY_TRANSFORMER, "model.activation_checkpointing=-1"],
                          "model.activation_checkpointing=-1 is not a whole number of blocks"),
             "fraction": (["model=transformer", *TINY_TRANSFORMER, "model.activation_checkpointing=0.5"],
                          "model.activation_checkpointing=0.5 is not a whole number of blocks")}
    results = run_train_py_each({name: train_py_args(*overrides, run_dir=tmp_path / name, cache_dir=cache_dir)
                                 for name, (overrides, _) in cases.items()}, cwd=tmp_path, timeout=300)
    for name, (_, message) in cases.items():
        result = results[name]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr
