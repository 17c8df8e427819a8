"""`trainer=fsdp`: Lightning's ModelParallelStrategy (FSDP2, tensor parallel, 2D) with lmkit's settings.

What it adds to Lightning's strategy, each for a measured reason:
- sizes: every device is data-parallel unless `tensor_parallel_size` says otherwise (Lightning's "auto"
  gives one node's devices to tensor parallel, so two CPU processes would both see the same batches);
- the same number of intra-op threads on every rank (left to Lightning, rank 0 ran 1 thread and rank 1 ran
  2, and tensors that should be replicated drifted apart under tensor parallel);
- `precision=bf16-mixed` becomes FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 master weights and
  gradient reduction) instead of autocast around fp32 parameters;
- checkpoint folders are written whole or not at all (a temporary sibling renamed into place), store the
  fused q/k/v rows in GPT-2's layout, and are read back with lmkit's checked, code-free reader.

A subclass reads its parent's state: `_tensor_parallel_size`, `_data_parallel_size`,
`_save_distributed_checkpoint` and fabric's `_rekey_optimizer_state_if_needed` are Lightning's private names, tested
with lightning 2.6.6 (pyproject allows >=2.4,<3; tests/test_parallel.py is what breaks first if a release moves them).
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import ModelParallelStrategy

from lmkit.backbones import BackboneConfig
from lmkit.errors import LmkitError, first_line
from lmkit.parallel.parallelize import check_tensor_parallel
from lmkit.sharded_checkpoint import META, checked_reader, is_sharded_checkpoint, save_siblings


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 over `world_size / tensor_parallel_size` data-parallel ranks, tensor parallel over the rest.

    `timeout`: a rank stuck in a collective (a peer crashed) fails the job after this (as trainer=ddp's)."""

    def __init__(self, tensor_parallel_size: int = 1, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, timeout: timedelta | None = timedelta(minutes=10)) -> None:
        checked_tensor_parallel_size(tensor_parallel_size)
        # the data-parallel size is set in setup_environment, once the world size is known
        super().__init__(data_parallel_size="auto", tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.param_dtype: torch.dtype | None = None  # bf16 under precision=bf16-mixed: FSDP2's compute dtype

    @property
    def tensor_parallel_size(self) -> int:
        return self._tensor_parallel_size

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes // self.tensor_parallel_size
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._threads_before = torch.get_num_threads()  # given back at teardown: rank zero compresses after training
        torch.set_num_threads(max(1, cores // self.num_processes))
        if isinstance(self.precision_plugin, MixedPrecision) and self.precision_plugin.precision == "bf16-mixed":
            self.param_dtype = torch.bfloat16
            self.precision_plugin = Precision()  # FSDP2 casts; autocast on top would only add casts
        super().setup_environment()

    def teardown(self) -> None:
        super().teardown()
        if getattr(self, "_threads_before", None):
            torch.set_num_threads(self._threads_before)

    # Checkpoints ------------------------------------------------------------------------------------------

    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        return storable(state) if self._save_distributed_checkpoint else state

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state = super().optimizer_state(optimizer)
        return storable(state) if self._save_distributed_checkpoint else state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        # Into a temporary sibling, renamed into place once every rank has written its file: a save killed at any
        # point leaves a whole checkpoint (the previous one, or the new one, which resume puts back in place),
        # never a folder with some ranks' shards missing.
        path = Path(self.broadcast(str(filepath)))
        tmp, old = save_siblings(path)  # (killed between the renames below: recover_interrupted_save)
        if self.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.is_global_zero:
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():  # (a folder cannot be renamed over a folder: the old one steps aside first)
                os.replace(path, old)
            os.replace(tmp, path)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():  # the previous checkpoint was a full file
                old.unlink()
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # (every file read here is read with weights_only=True, whatever the caller asks)
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded_checkpoint(path) and self.tensor_parallel_size == 1:
            return super().load_checkpoint(path, weights_only=True)
        if not is_sharded_checkpoint(path):
            return self._load_full_file(path)
        reader = checked_reader(path)
        model_state = get_model_state_dict(self.model)
        adapters_only = getattr(self.lightning_module, "lora_base", None) is not None
        if adapters_only:  # finetune=lora: the folder holds the adapters; the frozen base stays as init_from loaded it
            from lmkit.lora import adapter_state

            model_state = adapter_state(model_state, self.lightning_module.backbone)
        like = {"state_dict": model_state}
        like.update({f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)
                     for i, optimizer in enumerate(self.optimizers)})
        state = storable(like)
        try:
            load(state, storage_reader=reader)
        except Exception as e:  # a truncated shard, or one for another model shape
            raise LmkitError(f"cannot resume from {path}: {first_line(e)}") from None
        state = restore_layout(state, like)
        set_model_state_dict(self.model, state["state_dict"], options=StateDictOptions(strict=not adapters_only))
        for i, optimizer in enumerate(self.optimizers):
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        return torch.load(path / META, map_location="cpu", weights_only=True)

    def _load_full_file(self, path: Path) -> dict[str, Any]:
        """A full `.ckpt` into a tensor-parallel model. torch's full-state loader (what Lightning calls) splits the
        fused q/k/v rows as if they were contiguous and loads wrong attention weights without an error; here each
        tensor is split the way `storable` stores it, then moved to its parameter's placements."""
        from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=True)
        model = self.model
        set_model_state_dict(model, _distribute_like(checkpoint.pop("state_dict"), get_model_state_dict(model)))
        for optimizer, state in zip(self.optimizers, checkpoint.pop("optimizer_states", [])):
            state = _rekey_optimizer_state_if_needed(state, model)  # (saved keyed by parameter index)
            like = get_optimizer_state_dict(model, optimizer)
            set_optimizer_state_dict(model, optimizer, _distribute_like(state, like))
        return checkpoint


StateDict = dict[str, Any]  # nested: a model's or an optimizer's state dict, with DTensors as leaves


def _strided_tensor_parallel(value: Any) -> bool:
    """A DTensor split with `_StridedShard` over the tensor-parallel dimension (the fused q/k/v rows): its
    pieces are not contiguous blocks of the whole tensor, which torch.distributed.checkpoint cannot store."""
    return isinstance(value, DTensor) and any(
        isinstance(p, _StridedShard) and name == "tensor_parallel"
        for p, name in zip(value.placements, value.device_mesh.mesh_dim_names or ()))


def storable(state: StateDict) -> StateDict:
    """`state` with each strided tensor-parallel DTensor gathered over that dimension (still sharded over the
    data-parallel one), so the folder stores whole q/k/v rows in GPT-2's layout and loads at any tensor-parallel
    size."""
    if isinstance(state, dict):
        return {k: storable(v) for k, v in state.items()}
    if _strided_tensor_parallel(state):
        placements = [Replicate() if isinstance(p, _StridedShard) and name == "tensor_parallel" else p
                      for p, name in zip(state.placements, state.device_mesh.mesh_dim_names)]
        return state.redistribute(placements=placements)
    return state


def restore_layout(loaded: StateDict, like: StateDict) -> StateDict:
    """The inverse of `storable`: each tensor of `loaded` back in the placements of its counterpart in `like`."""
    if isinstance(loaded, dict):
        return {k: restore_layout(v, like[k]) if k in like else v for k, v in loaded.items()}
    if _strided_tensor_parallel(like):
        return loaded.redistribute(placements=like.placements)
    return loaded


def _distribute_like(full: Any, like: Any) -> Any:
    """Whole tensors of `full` as DTensors placed like their counterparts in `like` (other values as in `full`)."""
    if isinstance(full, dict):
        return {k: _distribute_like(v, like[k]) if isinstance(like, dict) and k in like else v for k, v in full.items()}
    if isinstance(like, DTensor):
        stored = storable(like)  # a strided tensor-parallel placement is reached from a plain one
        placed = distribute_tensor(full.to(like.dtype), stored.device_mesh, stored.placements)
        return restore_layout(placed, like)
    return full


def checked_tensor_parallel_size(value: Any) -> int:
    """`trainer.strategy.tensor_parallel_size`, refused in one line unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LmkitError(f"trainer.strategy.tensor_parallel_size={value!r} must be a positive integer")
    return value


def check_split(backbone_config: BackboneConfig, tensor_parallel_size: int, world_size: int) -> None:
    """Refuse, before any process starts, what `world_size` processes cannot split: one line each."""
    T = tensor_parallel_size
    if world_size % T:
        raise LmkitError(f"trainer.strategy.tensor_parallel_size={T} does not divide the {world_size} processes "
                         "(trainer.devices x trainer.num_nodes)")
    problem = check_tensor_parallel(backbone_config, T)
    if problem:
        raise LmkitError(problem)
