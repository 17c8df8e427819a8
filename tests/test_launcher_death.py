"""A rank never outlives the process that launched it: SIGKILL the launcher of a two-rank run, its ranks go too.

Lightning's launcher (rank 0) starts rank 1 as a child process; killed with SIGKILL it tells it nothing, and rank 1
used to live on, re-parented, waiting for a rendezvous or blocked in a gloo collective (lmkit.distributed,
die_with_launcher).
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lmkit.distributed import LAUNCHER_PID
from tests.helpers import ROOT, TINY

pytestmark = pytest.mark.slow
RUN = ["model=lstm", *TINY, "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=100000",
       "trainer.val_check_interval=5", "callbacks.text_sampler=null", "logger=none"]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ranks_of(launcher: int) -> set[int]:
    """The processes `launcher` started: its children now, and any whose environment names it (re-parented ones)."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher or f"{LAUNCHER_PID}={launcher}".encode() in env:
            found.add(int(proc.name))
    return found


def wait_for(ready: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)


# When the launcher dies: as rank 1 starts (before die_with_launcher runs: rank 1 finds itself orphaned), and while
# rank 1 starts up. Without die_with_launcher, a rank 1 whose launcher died before the rendezvous waits for it until
# trainer.strategy.timeout (ten minutes). (One in training is told by gloo even without it: bench/orphans.py kills
# launchers at moments of training too, and a test of that moment would cost a launch and could not fail.)
MOMENTS = {"rank1_starts": 0.0, "rank1_starting_up": 3.0}


@pytest.mark.parametrize(("strategy", "moment"), [("ddp", "rank1_starts"), ("fsdp", "rank1_starting_up")])
def test_ranks_die_with_their_launcher(strategy, moment, tmp_path, cache_dir):
    run_dir, log = tmp_path / "run", tmp_path / "stderr.log"
    cmd = [sys.executable, str(ROOT / "train.py"), f"trainer={strategy}", *RUN, f"hydra.run.dir={run_dir}",
           f"paths.cache_dir={cache_dir}"]
    with open(log, "w") as err:
        # a session of its own, so that whatever the test finds, nothing outlives it (killpg below)
        launcher = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        wait_for(lambda: bool(ranks_of(launcher.pid)), launcher, log)
        time.sleep(MOMENTS[moment])
        ranks = ranks_of(launcher.pid)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(map(alive, ranks | ranks_of(launcher.pid))) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {pid for pid in ranks | ranks_of(launcher.pid) if alive(pid)}
        assert ranks and not left, f"{left} of {ranks} still alive 10 s after their launcher was killed"
    finally:
        with contextlib.suppress(ProcessLookupError):  # (the ranks are in the launcher's process group)
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def test_a_rank_whose_launcher_is_already_gone_exits_at_once():
    """The launcher died before the rank armed its signal (its parent is then another process): nothing would ever
    send it, so the rank must notice by itself."""
    def rank(**extra: str) -> subprocess.CompletedProcess:
        code = "from lmkit.distributed import die_with_launcher; die_with_launcher(); print('trains on')"
        env = {k: v for k, v in os.environ.items() if k != LAUNCHER_PID}
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                              env={**env, **extra})

    gone = rank(**{LAUNCHER_PID: "1"})  # (its parent is this process, not pid 1)
    assert gone.returncode == 1 and "launched this rank (pid 1) has exited" in gone.stderr, gone.stderr[-2000:]
    kept = rank(**{LAUNCHER_PID: str(os.getpid())})  # its launcher alive: it trains on
    assert kept.returncode == 0 and "trains on" in kept.stdout, kept.stderr[-2000:]
