"""What `python train.py` prints, and what Ctrl-C does: a subprocess, as a user runs it."""

import os
import re
import signal
from collections import Counter

import lightning as L
import pytest
import torch

from lmkit.train import run
from tests.helpers import ROOT, TINY, run_train_py

pytestmark = pytest.mark.slow

# TINY with the progress bar and the sanity check of a default run left on: their output is checked too.
QUIET_TINY = [o for o in TINY if not o.startswith(("trainer.enable_progress_bar", "trainer.num_sanity_val_steps"))]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
WARNING = re.compile(r"\S+\.py:\d+: ")  # `/path/to/module.py:268: message`, maybe after a bar frame
BAR = re.compile(r"^(sanity check|step|validation|test) \d+/(\d+|\?) \|")  # a frame of one of lmkit's bars


def screen_lines(output: str) -> list[str]:
    """The non-blank lines a terminal would show: of each line, what is left after its last carriage
    return (tqdm redraws a bar in place with `\\r`), without colour and cursor escapes."""
    lines = (ANSI.sub("", line.split("\r")[-1]).strip() for line in output.split("\n"))
    return [line for line in lines if line]


def test_a_default_run_prints_each_message_once_and_counts_steps(tmp_path):
    # a fresh token cache, as on a first run: tokenizing prints too
    result = run_train_py("model=lstm", *QUIET_TINY, "trainer.max_steps=60", "trainer.val_check_interval=30",
                          run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    lines = screen_lines(output)[:60]
    # A bar is drawn again at each validation with the same text (a nested bar moves the cursor with
    # escapes, so its redraws reach a pipe as lines of their own): bar frames are not messages.
    messages = Counter(line for line in lines if not BAR.match(line))
    assert [line for line, n in messages.items() if n > 1] == [], "\n".join(lines)
    assert [line for line in lines if "warning" in line.lower()] == [], "\n".join(lines)
    # what Python's warnings module prints (Lightning's own format for its warnings names no category)
    assert [line for line in lines if WARNING.search(line)] == [], "\n".join(lines)
    assert not any("Tip:" in line or "litlogger" in line for line in lines), "\n".join(lines)
    steps = [line for line in lines if line.startswith("step ")]
    assert any(re.match(r"step 60/60 \|.*loss=[\d.]+, tokens/s=[\d,]+", line) for line in steps), "\n".join(lines)
    assert not any(line.startswith("Epoch") for line in lines)
    # Lightning's messages went through Hydra's handlers: in its format on the console, and into train.log
    assert "][INFO] `Trainer.fit` stopped: `max_steps=60` reached." in output
    assert "`Trainer.fit` stopped" in (tmp_path / "run" / "train.log").read_text()


class CtrlCAt(L.Callback):
    """A real Ctrl-C (SIGINT to this process) when a training step begins at `step`; `twice`: a second
    one when that step ends, before training has stopped."""

    def __init__(self, step: int, twice: bool = False) -> None:
        self.step, self.twice = step, twice

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if self.twice and trainer.global_step == self.step + 1:
            os.kill(os.getpid(), signal.SIGINT)


CTRL_C = ["model=lstm", *TINY, "trainer.val_check_interval=30", "callbacks.text_sampler=null", "logger=none"]
ENV = {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def last_step(run_dir) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def test_ctrl_c_saves_the_step_it_landed_in_exits_130_and_resume_continues(tmp_path, cache_dir, make_cfg):
    run_dir = tmp_path / "run"
    result = run_train_py(*CTRL_C, "trainer.max_steps=100000", "+callbacks.ctrl_c._target_=tests.test_console.CtrlCAt",
                          "+callbacks.ctrl_c.step=45", run_dir=run_dir, cache_dir=cache_dir, timeout=300, env=ENV)
    output = result.stdout + result.stderr
    assert result.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    # the last validation (step 30) wrote a last.ckpt too; Ctrl-C's replaced it at the end of the step it
    # landed in: step 46, begun at global_step 45
    assert last_step(run_dir) == 46
    hints = [line for line in screen_lines(output) if "resume=true" in line]
    assert len(hints) == 1 and f"hydra.run.dir={run_dir}" in hints[0] and "step 46" in hints[0], output[-3000:]

    metrics, _ = run(make_cfg(*CTRL_C, "trainer.max_steps=50", "resume=true", output_dir=run_dir))
    assert metrics["steps"] == 50


def test_a_second_ctrl_c_quits_at_once_saving_nothing(make_cfg, tmp_path):
    # in this process: the handler that run() installs turns the second SIGINT into exit code 130
    before = signal.getsignal(signal.SIGINT)  # Python's handler, or SIG_IGN when started in the background
    with pytest.raises(SystemExit, match="^130$"):
        run(make_cfg(*CTRL_C, "trainer.max_steps=100000", "+callbacks.ctrl_c._target_=tests.test_console.CtrlCAt",
                     "+callbacks.ctrl_c.step=45", "+callbacks.ctrl_c.twice=true"))
    assert last_step(tmp_path / "run") == 30  # the last validation's checkpoint, untouched
    assert signal.getsignal(signal.SIGINT) is before  # and Ctrl-C is handled as before the run again
