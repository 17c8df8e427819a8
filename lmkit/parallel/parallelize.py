"""Apply tensor parallelism, activation checkpointing, compilation and FSDP2 to a plain lmkit backbone, in
torchtitan's order.

One function per backbone: the Transformer splits attention and MLP column-/row-wise over the
"tensor_parallel" mesh dimension (each rank holds whole heads), checkpoints every K-th block
(`model.activation_checkpointing`), compiles each block in place, then shards
each block and the root over "data_parallel"; a recurrent backbone is one FSDP unit. The model code is not
touched: parallelism is this file.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

from lmkit.activation_checkpointing import apply_activation_checkpointing
from lmkit.backbones import LSTM, BackboneConfig, Transformer, build_backbone
from lmkit.lora import LoRASettings, adapt

DATA, TENSOR = "data_parallel", "tensor_parallel"  # Lightning's mesh dimension names


class FusedQKVParallel(ColwiseParallel):
    """Column-wise parallel for GPT-2's fused q/k/v projection: each rank gets the q, k and v rows of its own heads.

    A plain ColwiseParallel gives rank 0 the first rows (all of q and half of k for two ranks) and computes wrong
    attention without an error. `_StridedShard(0, split_factor=3)` splits q, k and v each into the ranks' parts,
    while the full tensor keeps GPT-2's [q | k | v] layout, so a gathered state dict is today's checkpoint.
    The bias stays whole on every rank (DTensor takes each rank's slice in the forward): sharded too, FSDP's
    shard of it would nest a second strided split on the same dimension, which DTensor gathers wrongly."""

    def __init__(self) -> None:
        super().__init__(output_layouts=_StridedShard(-1, split_factor=3))  # the output keeps the rows' layout

    # (ColwiseParallel's hook for placing a Linear's parameters, torch 2.4-2.13: a private name, so tests pin
    # what it must do: test_parallel's TP runs equal one process step by step)
    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        module.register_parameter("weight", nn.Parameter(
            distribute_tensor(module.weight, device_mesh, [_StridedShard(0, split_factor=3)])))
        if module.bias is not None:
            module.register_parameter("bias", nn.Parameter(distribute_tensor(module.bias, device_mesh, [Replicate()])))


def is_parallelized(backbone: nn.Module) -> bool:
    """Whether `parallelize` has run on `backbone` (Lightning calls configure_model at every fit, validate, test)."""
    return getattr(backbone, "_lmkit_parallelized", False)


def check_tensor_parallel(backbone_config: BackboneConfig, tensor_parallel_size: int) -> str | None:
    """Why `backbone_config` cannot be split over `tensor_parallel_size` ranks (one line), or None when it can."""
    T = tensor_parallel_size
    if T == 1:
        return None
    if backbone_config.kind != "transformer":
        return (f"trainer.strategy.tensor_parallel_size={T}: a recurrent model (model.kind={backbone_config.kind}) "
                "has no heads to split; use tensor_parallel_size=1 (FSDP alone)")
    if backbone_config.kv_group != 1:  # the fused q/k/v split below assumes equal q, k and v thirds
        return (f"trainer.strategy.tensor_parallel_size={T}: grouped-query attention (model.n_kv_head="
                f"{backbone_config.n_kv_head}, model.n_head={backbone_config.n_head}) is not split yet; "
                "use tensor_parallel_size=1 (FSDP alone)")
    for layer in range(backbone_config.n_layer):
        heads, width = backbone_config.heads(layer), backbone_config.ffn(layer)
        if heads % T:
            return (f"trainer.strategy.tensor_parallel_size={T} does not divide the {heads} attention heads of "
                    f"layer {layer}")
        if width % T:
            return f"trainer.strategy.tensor_parallel_size={T} does not divide the MLP width {width} of layer {layer}"
    return None


def parallelize(backbone: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
                compile: bool = False, activation_checkpointing: int = 0) -> None:
    """Make `backbone` a sharded (and, with a tensor-parallel size above one, tensor-parallel) model, in place.

    `param_dtype` bf16 is FSDP2's mixed precision: bf16 compute and all-gathers, fp32 master weights and fp32
    gradient reduction. `compile` compiles each block (or the recurrent model) in place, so parameter names,
    and so checkpoints, stay as they are. `activation_checkpointing` K checkpoints every K-th block (0: none;
    lmkit.activation_checkpointing), before compile and sharding, and leaves names as they are too."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    if isinstance(backbone, Transformer):
        parallelize_transformer(backbone, mesh, policy, compile, activation_checkpointing)
    elif isinstance(backbone, LSTM):
        apply_activation_checkpointing(backbone, activation_checkpointing)  # (above 0: refused, it has no blocks)
        parallelize_recurrent(backbone, mesh, policy, compile)
    else:
        raise TypeError(f"no parallelize function for {type(backbone).__name__}")
    backbone._lmkit_parallelized = True


def parallelize_transformer(model: Transformer, mesh: DeviceMesh, policy: MixedPrecisionPolicy,
                            compile: bool, activation_checkpointing: int = 0) -> None:
    """Tensor parallel inside each block (over "tensor_parallel"), checkpoint every `activation_checkpointing`-th
    block, compile each block, then FSDP2 per block and the root (over "data_parallel")."""
    tp = mesh[TENSOR]
    for block in model.transformer.h:
        if tp.size() > 1:
            # The embedding, norms and head stay whole on each tensor-parallel rank (replicated activations
            # between blocks); RowwiseParallel all-reduces each block's two outputs back into that stream.
            # SwiGLU: gate and up split alike by columns, so each rank multiplies its own units together
            up = {"mlp.gate": ColwiseParallel(), "mlp.up": ColwiseParallel()} if model.config.mlp == "swiglu" \
                else {"mlp.c_fc": ColwiseParallel()}
            parallelize_module(block, tp, {"attn.c_attn": FusedQKVParallel(), "attn.c_proj": RowwiseParallel(),
                                           **up, "mlp.c_proj": RowwiseParallel()})
            block.attn.n_head //= tp.size()  # the heads this rank computes
    # A hook on the block: its recomputation runs the block's tensor-parallel layers and, once compiled, its
    # compiled code again; FSDP2 gathers its weights again for it.
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        for block in model.transformer.h:
            block.compile()
    dp = mesh[DATA]
    for block in model.transformer.h:
        # FSDP shards the fused q/k/v matrix by columns: its rows already carry the strided tensor-parallel split
        # (a LoRA-wrapped projection is never split by tensor parallel: train.run refuses that)
        qkv = block.attn.c_attn.weight if tp.size() > 1 else None
        fully_shard(block, mesh=dp, mp_policy=policy,
                    shard_placement_fn=lambda p, qkv=qkv: Shard(1) if p is qkv else None)
    fully_shard(model, mesh=dp, mp_policy=policy)


def parallelize_recurrent(model: LSTM, mesh: DeviceMesh, policy: MixedPrecisionPolicy, compile: bool) -> None:
    """An LSTM/GRU is one FSDP unit: its layers run as one fused kernel, with nothing to split between them."""
    if compile:
        model.compile()
    fully_shard(model, mesh=mesh[DATA], mp_policy=policy)


def gather(backbone: nn.Module, lora: LoRASettings | None = None) -> nn.Module | None:
    """The whole of a parallelized `backbone` as a plain one on rank zero's CPU (None on the other ranks), in
    today's layout (with `lora`'s adapters, when it has them): what compression and the final sample run on. Every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    plain = build_backbone(backbone.config)
    if lora is not None:
        adapt(plain, lora)
    plain.load_state_dict(state)
    return plain.train(backbone.training)
