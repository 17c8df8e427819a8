"""Shared fixtures: configs composed by real Hydra, every path under pytest's tmp dirs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# A model and batch small enough that a training step takes milliseconds on two cores.
TINY = ["model.n_layer=1", "model.n_embd=32", "data.seq_len=32", "data.batch_size=8", "data.eval_batch_size=16",
        "data.val_windows=16", "data.test_windows=16", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0"]
TINY_TRANSFORMER = TINY + ["model.n_head=2"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token cache for the session, so the embedded corpus is tokenized once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: Path):
    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        out = output_dir or tmp_path / "run"
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("train", overrides=[f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}", *overrides])

    return make


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A small corpus of short, repetitive lines a tiny model can learn by heart."""
    lines = [f"{name}: {verb} the {thing}." for name in ("ANNE", "BEN", "CLEO", "DAN")
             for verb in ("sees", "takes", "loves") for thing in ("moon", "sword", "rose", "crown")]
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(lines * 12) + "\n", encoding="utf-8")
    return path


def run_train_py(*overrides: str, run_dir: Path, cache_dir: Path, timeout: int = 600,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python train.py ...` in a subprocess, as a user runs it."""
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's own flags (-m) go before the overrides
    cmd = [sys.executable, str(ROOT / "train.py"), *flags, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}",
           *(o for o in overrides if not o.startswith("-"))]
    return subprocess.run(cmd, cwd=run_dir.parent, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a server or a rendezvous the test starts next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sigterm_train_py_when(ready: Callable[[], bool], *overrides: str, run_dir: Path,
                          cache_dir: Path) -> tuple[int, str]:
    """Start `python train.py ...`, send it SIGTERM (as SLURM does before pre-emption) once `ready()` says training is
    under way, and return its exit code and stderr."""
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}",
           f"paths.cache_dir={cache_dir}"]
    log = run_dir.parent / "stderr.log"  # a file, not a pipe: an unread pipe fills up and stalls the child
    with open(log, "w") as err:
        # a session of its own: whatever happens, the ranks it started go with it
        proc = subprocess.Popen(cmd, cwd=run_dir.parent, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not ready():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, log.read_text()
