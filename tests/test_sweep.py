"""Hyper-parameter search: `train.py -m hparams_search=optuna` (Hydra's Optuna sweeper, the `optuna` extra)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import ROOT, TINY, run_train_py

pytestmark = pytest.mark.slow

# Two short trials over a tiny space (the preset's widths would not be tiny): a range on the command line
# replaces the preset's, so each trial proposes one of these widths and the preset's lr, warm-up and dropout.
SEARCH = ["-m", "hparams_search=optuna", "hparams_search.n_trials=2", "model=lstm", "model.n_embd=choice(32,48)",
          *(o for o in TINY if not o.startswith("model.n_embd=")), "trainer.max_steps=12", "trainer.val_check_interval=6"]


def check_study(sweep: Path) -> list[dict]:
    """The sweep folder holds one job per trial and optimization_results.yaml naming the best of them."""
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    results = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    metrics = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    best = min(range(len(jobs)), key=lambda i: metrics[i]["val_loss"])
    assert results["best_value"] == pytest.approx(metrics[best]["val_loss"])
    overrides = dict(o.split("=", 1) for o in OmegaConf.load(jobs[best] / ".hydra" / "overrides.yaml"))
    assert set(results["best_params"]) == {"optim.lr", "optim.warmup_steps", "model.n_embd", "model.dropout"}
    for key, value in results["best_params"].items():  # the best trial's own settings
        assert float(overrides[key]) == pytest.approx(value), key
    return metrics


def test_optuna_search_of_ddp_trials_writes_the_best_trial_and_launches_each_trials_ranks_once(tmp_path, cache_dir):
    # (DDP trials only: a single-process trial is the same study with one rank less, and the suite has a budget)
    sweep = tmp_path / "sweep"
    result = run_train_py(*SEARCH, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                          f"hydra.sweep.dir={sweep}", run_dir=tmp_path / "unused", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["world_size"] for m in check_study(sweep)] == [2, 2]
    assert result.stdout.count("Metrics:") + result.stderr.count("Metrics:") == 2  # no trial ran twice
    assert not list(tmp_path.rglob("multirun")) and not list(tmp_path.rglob("multiruns"))


def test_search_without_the_extra_is_one_line_naming_it(tmp_path):
    command = ["-c", "from lmkit.cli import main; main()", "train"]  # `lmkit train`, whose main is train.py's
    # An empty hydra_plugins package first on the path hides the installed plugins: Hydra sees none, as without the
    # extra (where Hydra's own error would be a page about a missing hydra/sweeper config)
    shadow = tmp_path / "shadow" / "hydra_plugins"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    result = subprocess.run([sys.executable, *command, "-m", "hparams_search=optuna", "trainer.max_steps=1",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": f"{shadow.parent}{os.pathsep}{ROOT}"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "Optuna sweeper" in errors[0] and errors[0].endswith("pip install 'lmkit[optuna]'")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("overrides,message", [
    (["optimized_metric=val_los"], "optimized_metric=val_los is not a metric of this run: one of train_loss, val_loss"),
])
def test_a_search_for_a_metric_it_cannot_read_is_one_line(overrides, message, tmp_path, cache_dir):
    one = [o for o in SEARCH if not o.startswith(("hparams_search.n_trials", "trainer.max_steps"))]
    result = run_train_py(*one, "hparams_search.n_trials=1", "trainer.max_steps=2", *overrides,
                          f"hydra.sweep.dir={tmp_path / 'sweep'}", run_dir=tmp_path / "unused", cache_dir=cache_dir)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_the_preset_drives_the_sweeper(tmp_path):
    from hydra import compose, initialize_config_dir

    from tests.helpers import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna", "hparams_search.n_trials=7",
                                          "optimized_metric=test_loss"], return_hydra_config=True)
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    assert sweeper["_target_"].endswith("OptunaSweeper") and sweeper["sampler"]["seed"] == cfg.hparams_search.seed
    assert (sweeper["n_trials"], sweeper["direction"], sweeper["study_name"]) == (7, "minimize", "test_loss")
    assert sweeper["params"]["optim.lr"].startswith("tag(log,")
