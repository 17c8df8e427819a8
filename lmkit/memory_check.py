"""A launch that clearly cannot fit is refused in one line before any rank starts.

What is known before anything is built: the parameter count (from the config, by arithmetic), the bytes each
trained parameter costs in fp32 weights, gradients and AdamW's two moments (16; a frozen one, its weight alone: 4),
how many ranks share those bytes (FSDP's data-parallel ranks shard them; DDP's each hold them all) and how many ranks
share one machine's memory (CPU processes) or have a GPU each. Activations, buffers and the runtime come on top, so
the estimate is a floor: what it refuses cannot run, and what it passes may still not fit.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lmkit.errors import LmkitError

TRAINED_BYTES, FROZEN_BYTES = 16, 4  # fp32 weight + gradient + AdamW's exp_avg and exp_avg_sq; a weight alone


def machine_memory() -> int | None:
    """Bytes of physical memory on this machine (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def on_gpu(trainer_cfg: Any) -> bool:
    """Whether the trainer config runs on GPUs (`accelerator: auto` on a machine that has one)."""
    accelerator = str(trainer_cfg.get("accelerator"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def processes_per_node(trainer_cfg: Any) -> int:
    """How many processes the trainer starts on each node, from Lightning's `devices`: a count, a list of device
    ids ("0,1" too), or "auto" / -1 (every GPU, one CPU process)."""
    devices = trainer_cfg.get("devices")
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    elif isinstance(devices, str) and "," in devices:  # Lightning's "0,1" (and "1,": the GPU with id 1)
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, int) and devices > 0:
        return devices
    if not isinstance(devices, (int, str)):  # a list of ids
        return len(devices)
    return max(torch.cuda.device_count(), 1) if on_gpu(trainer_cfg) else 1


def check_memory(parameters: int, trainer_cfg: Any, *, sharded: bool, frozen: bool = False) -> None:
    """Refuse `trainer_cfg`'s launch of a model of `parameters` if its weights, gradients and optimizer state alone
    exceed this machine's memory (CPU ranks, together) or one GPU's (each GPU rank)."""
    gpu = on_gpu(trainer_cfg)
    ranks = processes_per_node(trainer_cfg)
    nodes = int(trainer_cfg.get("num_nodes") or 1)
    split = ranks * nodes if sharded else 1  # FSDP (x TP) splits the state over every rank; DDP replicates it
    per_rank = parameters * (FROZEN_BYTES if frozen else TRAINED_BYTES) / split
    if gpu and not torch.cuda.is_available():
        return  # (Lightning says that there is no GPU)
    if gpu:
        available, where, need = torch.cuda.get_device_properties(0).total_memory, "each GPU has", per_rank
    else:
        available, where, need = machine_memory(), "this machine has", per_rank * ranks
    if available is None or need <= available:
        return
    what = "weights" if frozen else "weights, gradients and AdamW state"
    shared = f" over {split} sharded ranks" if split > 1 else ""
    raise LmkitError(f"this run needs at least {need / 2**30:.1f} GiB for its {what} ({parameters / 1e6:,.0f}M "
                     f"parameters{shared}, {ranks} rank(s) on this machine) but {where} {available / 2**30:.1f} GiB: "
                     "use trainer=fsdp over more ranks or nodes, finetune=lora, or a smaller model")
