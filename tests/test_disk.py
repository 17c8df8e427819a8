"""A full disk or an unwritable folder: one `error: cannot write PATH: ...` line, nothing half-written left.

Two real conditions, no mocks and no root needed:
- "full disk": RLIMIT_FSIZE. A write that would take a file past the limit is refused with EFBIG ("File
  too large") partway through, as ENOSPC refuses it on a full disk (Python ignores SIGXFSZ, so the write
  returns the error instead of killing the process). chmod cannot stand in for it: tests may run as root.
- "unwritable folder": a path under a regular file (ENOTDIR, "Not a directory"), which root cannot write
  either.
"""

import json
import re
import resource
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

import lmkit
from lmkit.data.cache import build_or_open
from lmkit.data.corpus import Corpus
from lmkit.errors import LmkitError
from lmkit.export import save
from lmkit.files import atomic_write_text
from lmkit.train import run
from tests.helpers import TINY, run_train_py

LMKIT = str(Path(sys.executable).parent / "lmkit")
RUN = ["model=lstm", *TINY, "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.text_sampler=null"]


@contextmanager
def disk_full_after(n_bytes: int):
    """In this process, no file can grow past `n_bytes`: the write that would is refused (EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture
def blocked(tmp_path: Path) -> Path:
    """A regular file: nothing can be written under it."""
    path = tmp_path / "file.txt"
    path.write_text("not a folder\n")
    return path


def cannot_write(path: Path, reason: str) -> str:
    return f"^cannot write {re.escape(str(path))}: {reason}$"


def only_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_metrics_json_on_a_full_disk_keeps_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"steps": 10}\n')
    with disk_full_after(64), pytest.raises(LmkitError, match=cannot_write(path, "File too large")):
        atomic_write_text(path, json.dumps({"steps": 20, "note": "x" * 200}))
    assert path.read_text() == '{"steps": 10}\n' and sorted(tmp_path.iterdir()) == [path]  # no temporary file


def test_an_unwritable_run_folder_fails_before_any_work(tmp_path, cache_dir, blocked):
    result = run_train_py(*RUN, f"paths.output_dir={blocked}/run", run_dir=tmp_path / "run", cache_dir=cache_dir,
                          timeout=300)
    assert only_error_line(result) == f"error: cannot write {blocked}/run: Not a directory"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_token_cache_on_a_full_disk_or_under_a_file(tmp_path, tiny_corpus, blocked):
    corpus, spec, split = Corpus([tiny_corpus]), {"kind": "char"}, [0.8, 0.1, 0.1]
    cache = tmp_path / "cache"
    cache_entry = rf"^cannot write {re.escape(str(cache))}/tokens/\w+: File too large$"
    with disk_full_after(4096), pytest.raises(LmkitError, match=cache_entry):
        build_or_open(corpus, spec, split, cache)  # tokens.bin: ~25 kB
    assert [p.name for p in (cache / "tokens").iterdir() if p.suffix != ".lock"] == []  # no half-built cache
    with pytest.raises(LmkitError, match=cannot_write(blocked / "cache" / "tokens", "Not a directory")):
        build_or_open(corpus, spec, split, blocked / "cache")
    assert build_or_open(corpus, spec, split, cache).n_tokens > 0  # with room on the disk it builds


def test_checkpoints_on_a_full_disk_or_under_a_file(make_cfg, tmp_path, blocked):
    with pytest.raises(LmkitError, match=cannot_write(blocked / "ckpt", "Not a directory")):  # before training
        run(make_cfg(*RUN, "logger=none", f"callbacks.model_checkpoint.dirpath={blocked}/ckpt"))
    checkpoints = tmp_path / "run" / "checkpoints"
    # a checkpoint of this model is ~170 kB: the first one, at step 2's validation, meets the full disk
    with disk_full_after(64 * 1024), pytest.raises(LmkitError, match=cannot_write(checkpoints / "best-step2.ckpt",
                                                                                  "File too large")):
        run(make_cfg(*RUN, "logger=none"))
    assert list(checkpoints.iterdir()) == []


def test_export_on_a_full_disk_or_under_a_file(make_cfg, tmp_path, blocked):
    metrics, _ = run(make_cfg(*RUN, "logger=none"))
    model = lmkit.load(metrics["last_ckpt"])
    out = tmp_path / "model"
    with disk_full_after(16 * 1024), pytest.raises(LmkitError, match=cannot_write(out, "File too large")):
        save(model, out)  # model.safetensors: ~50 kB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "run"]  # no `out`, no temporary folder
    result = subprocess.run([LMKIT, "export", f"model={metrics['last_ckpt']}", f"out={blocked}/model"],
                            capture_output=True, text=True, timeout=300)
    assert only_error_line(result) == f"error: cannot write {blocked}/model: Not a directory"
