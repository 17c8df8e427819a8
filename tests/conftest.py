"""Shared fixtures: configs composed by real Hydra, every path under pytest's tmp dirs."""

from __future__ import annotations

import contextlib
import json
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


def write_tiny_corpus(path: Path) -> Path:
    """A small corpus of short, repetitive lines a tiny model can learn by heart, written at `path`."""
    lines = [f"{name}: {verb} the {thing}." for name in ("ANNE", "BEN", "CLEO", "DAN")
             for verb in ("sees", "takes", "loves") for thing in ("moon", "sword", "rose", "crown")]
    path.write_text("\n".join(lines * 12) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    return write_tiny_corpus(tmp_path / "tiny.txt")


def train_py_args(*overrides: str, run_dir: Path, cache_dir: Path) -> list[str]:
    """The arguments of `python train.py` for a run in `run_dir` with the token cache in `cache_dir`."""
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's own flags (-m) go before the overrides
    return [*flags, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}",
            *(o for o in overrides if not o.startswith("-"))]


def run_in_process(*overrides: str, run_dir: Path, cache_dir: Path) -> dict:
    """The run `run_train_py` would make, in this process: the one-process reference of a multi-process test needs no
    process of its own (starting one, importing torch and Lightning, takes seconds). Its metrics.json."""
    from lmkit.train import run

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={run_dir}", f"paths.cache_dir={cache_dir}", *overrides])
    run(cfg)
    return json.loads((run_dir / "metrics.json").read_text())


def run_train_py(*overrides: str, run_dir: Path, cache_dir: Path, timeout: int = 600,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python train.py ...` in a subprocess, as a user runs it."""
    cmd = [sys.executable, str(ROOT / "train.py"), *train_py_args(*overrides, run_dir=run_dir, cache_dir=cache_dir)]
    return subprocess.run(cmd, cwd=run_dir.parent, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# `python train.py ARGS` for each command line in turn, in one interpreter: train.py run as __main__ (runpy) with
# its sys.argv, its stdout and stderr the files given (file descriptors 1 and 2, so what Lightning, Hydra, warnings
# or a traceback print lands there, as in a process of its own), its exit code what SystemExit carries (an
# uncaught exception prints its traceback and gives 1, as the interpreter does). Hydra's global state is cleared
# after each, as a new process would start without it.
_EACH = """
import json, os, runpy, sys, traceback
from hydra.core.global_hydra import GlobalHydra

script, cases = sys.argv[1], json.load(open(sys.argv[2]))
sys.path[0] = os.path.dirname(script)  # as `python train.py` starts: the script's folder first
codes = []
for argv, out, err in cases:
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out, "w") as fo, open(err, "w") as fe:
        os.dup2(fo.fileno(), 1); os.dup2(fe.fileno(), 2)
        sys.argv, code = [script, *argv], 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
            os.close(saved[0]); os.close(saved[1])
            GlobalHydra.instance().clear()
    codes.append(code)
print(json.dumps(codes))
"""


def run_train_py_each(cases: dict[str, list[str]], cwd: Path,
                      timeout: int = 600) -> dict[str, subprocess.CompletedProcess]:
    """`python train.py ARGS` for each `name: ARGS` (train_py_args), all in one interpreter, one after the other:
    what each printed and its exit code. For command lines that train.py refuses before training, whose
    checks need a process but not one each (its start, importing torch and Lightning, takes seconds)."""
    files = cwd / "train_py_each"
    files.mkdir()
    plan = [(argv, str(files / f"{i}.out"), str(files / f"{i}.err")) for i, argv in enumerate(cases.values())]
    (files / "cases.json").write_text(json.dumps(plan))
    result = subprocess.run([sys.executable, "-c", _EACH, str(ROOT / "train.py"), str(files / "cases.json")],
                            cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    codes = json.loads(result.stdout.splitlines()[-1])
    return {name: subprocess.CompletedProcess([sys.executable, str(ROOT / "train.py"), *argv], code,
                                              Path(out).read_text(), Path(err).read_text())
            for name, (argv, out, err), code in zip(cases, plan, codes)}


def lmkit_main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`lmkit ARGS` in this process: what the `lmkit` script runs (lmkit.cli.main, with that command line and `env`
    added to the environment), what it printed and its exit code. For the commands other than train, which need no
    process of their own (an exception other than the SystemExit of a one-line error propagates, and fails the test;
    test_commands.py and test_install.py run the `lmkit` script itself)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from lmkit.cli import main

    out, err, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    saved = {k: os.environ.get(k) for k in env or {}}
    sys.argv = ["lmkit", *args]
    os.environ.update(env or {})
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["lmkit", *args], code, out.getvalue(), err.getvalue())


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
