"""Making Lightning's DDP launcher, Hydra sweeps and cluster launchers work together.

Lightning starts ranks > 0 by re-running `sys.argv` with `hydra.run.dir=<run dir>` appended. Under
a Hydra multirun (`-m`) that command is the whole sweep again, so every rank-1 child re-runs
every job into a second `multirun/` folder (Lightning issue 11300). lmkit points the children at
the one job this process is running instead, and undoes the launcher's environment afterwards so
the next job of the sweep launches its own ranks. And the ranks it starts die with it, however it dies.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lmkit.conf import config_flags
from lmkit.errors import LmkitError

# Environment variables that mean "a launcher already started this process as one of several ranks".
CLUSTER_ENV = ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "LSB_JOBID")
# The pid of the process whose Lightning launcher started this rank (set by ddp_children_run_this_job); absent
# under torchrun, SLURM and the like, which start and reap their ranks themselves.
LAUNCHER_PID = "LMKIT_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_launcher() -> None:
    """Make a rank that Lightning's launcher started die with that launcher, whatever kills it.

    A launcher killed by SIGKILL (`kill -9`, the OOM killer) tells its ranks nothing: they were re-parented and
    lived on, once for minutes, blocked in a gloo collective or waiting for a rendezvous that never comes, where no
    Python signal handler runs. The kernel's parent-death signal does not need one: SIGKILL. Linux only (elsewhere
    this does nothing): a watchdog thread for macOS, which trains on one device, is not worth its upkeep.
    """
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return  # (a sandbox that forbids it: the rank runs as it did before)
    # The signal comes when the *thread* that started this process ends: Lightning starts ranks from rank 0's
    # main thread, which ends only with rank 0 (fit, validate and test run in it).
    if os.getppid() != int(launcher):  # it died before prctl, so no signal will come
        raise SystemExit(f"lmkit: the process that launched this rank (pid {launcher}) has exited")


def local_rank() -> int:
    """This process's rank on its node, as the launcher (Lightning, torchrun, SLURM) announced it."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def data_parallel(trainer: Any) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas: ranks of one tensor-parallel group share
    a replica, so they read the same batches and count their tokens once."""
    from lightning.pytorch.strategies import ParallelStrategy

    if trainer is None or not isinstance(trainer.strategy, ParallelStrategy):  # one process
        return 0, 1
    kwargs = trainer.strategy.distributed_sampler_kwargs  # (ModelParallelStrategy's: the data-parallel mesh)
    return kwargs["rank"], kwargs["num_replicas"]


def check_launch(trainer_cfg: Any) -> None:
    """Refuse launch settings that would otherwise fail deep inside Lightning or wait forever."""
    accelerator, devices = str(trainer_cfg.get("accelerator")), trainer_cfg.get("devices")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise LmkitError(f"trainer.accelerator={accelerator} (trainer=gpu): this machine has no CUDA GPU (torch "
                         f"{torch.__version__}); use trainer=cpu, or trainer=ddp trainer.accelerator=cpu")
    if accelerator == "gpu" and isinstance(devices, int) and devices > torch.cuda.device_count():
        raise LmkitError(f"trainer.devices={devices} but this machine has {torch.cuda.device_count()} GPU(s)")
    nodes = int(trainer_cfg.get("num_nodes") or 1)
    if nodes > 1 and not any(k in os.environ for k in CLUSTER_ENV) and "NODE_RANK" not in os.environ:
        raise LmkitError(f"trainer.num_nodes={nodes} needs a launcher on every node (torchrun, srun, or "
                         "MASTER_ADDR/NODE_RANK set): see docs/distributed.md, multi-node")


@contextmanager
def ddp_children_run_this_job() -> Iterator[None]:
    """While training, make Lightning's re-launched ranks run this Hydra job only, into its folder."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    if not HydraConfig.initialized():
        yield
        return
    hydra_cfg = HydraConfig.get()
    saved_argv, saved_env = list(sys.argv), dict(os.environ)
    saved_run_dir = hydra_cfg.run.dir
    # What the ranks Lightning starts inherit (see die_with_launcher); a rank keeps its launcher's. Removed with the
    # launcher's other variables below, and set afresh by each job of a sweep.
    os.environ.setdefault(LAUNCHER_PID, str(os.getpid()))
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir  # what Lightning appends as hydra.run.dir
    # This job's overrides (a sweep's point, not the sweep), and console-only logging for the children
    # so rank 0 is the only process writing into the run folder.
    # (a user's own presets, `--config-dir my_conf`, must reach the re-launched ranks too)
    flags = [word for pair in config_flags(saved_argv[1:]) for word in pair]
    sys.argv = [sys.argv[0], *flags, *hydra_cfg.overrides.task, "hydra/job_logging=stdout"]
    try:
        yield
    finally:
        sys.argv = saved_argv
        with read_write(hydra_cfg.run):
            hydra_cfg.run.dir = saved_run_dir
        # The launcher exported LOCAL_RANK, WORLD_SIZE, MASTER_PORT...; left behind, they would make
        # the next job believe it had been launched externally and wait for ranks that never come.
        for key in set(os.environ) - set(saved_env):
            del os.environ[key]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
