"""lmkit as a user installs it: a built wheel in a fresh venv, with no source tree in sight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding lmkit's wheel and nothing of the checkout. Its dependencies (torch above all) come from this
    environment's site-packages through a .pth line, which adds the folder without running its .pth files, so the
    checkout's editable install stays invisible."""
    tmp = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next((tmp / "dist").glob("lmkit-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    return venv


def in_venv(venv: Path, *cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(venv / "bin" / cmd[0]), *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_every_config_group_is_a_package_of_the_wheel():
    """Else setuptools warns, at every install, about a folder it would carry as data only."""
    from setuptools.config.pyprojecttoml import read_configuration  # (tomllib is 3.11+; lmkit runs on 3.10)

    packages = read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]["packages"]
    groups = {f"lmkit._conf.{d.name}" for d in (ROOT / "conf").iterdir() if d.is_dir()}
    assert groups <= set(packages), sorted(groups - set(packages))


def test_the_wheel_holds_lmkit_alone_and_its_configs(installed, tmp_path):
    result = in_venv(installed, "python", "-c", "import lmkit, lmkit.conf, importlib.util; "
                     "print(lmkit.__file__, lmkit.conf.CONF_DIR, importlib.util.find_spec('plugins'))", cwd=tmp_path)
    package, conf, plugins = result.stdout.split()
    assert str(installed) in package and conf == str(Path(package).parent / "_conf")
    assert plugins == "None"  # no top-level `plugins` package claimed in site-packages
    assert "int4" in in_venv(installed, "lmkit", "plugins", cwd=tmp_path).stdout


def test_a_wheel_trains_on_two_ranks_and_generates_from_an_empty_folder(installed, tmp_path, cache_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    # two DDP ranks: Lightning re-launches rank 1 as `python -m lmkit.train`, which must work without a train.py
    result = in_venv(installed, "lmkit", "train", "model=lstm", *TINY, "trainer.max_steps=5",
                     "trainer.val_check_interval=5", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                     "callbacks.text_sampler=null", f"paths.cache_dir={cache_dir}", cwd=empty)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(next(empty.rglob("metrics.json")).read_text())
    assert metrics["steps"] == 5 and metrics["world_size"] == 2
    result = in_venv(installed, "lmkit", "generate", f"model={metrics['last_ckpt']}", "prompt=ROMEO:",
                     "max_new_tokens=20", "seed=3", cwd=empty)
    assert result.returncode == 0, result.stderr[-2000:]
    import lmkit  # (the checkout's: the same code, so the same text)

    expected = lmkit.load(metrics["last_ckpt"]).generate("ROMEO:", max_new_tokens=20, seed=3)
    assert result.stdout.strip() == expected.strip() and len(expected) > len("ROMEO:") + 10
