"""Activation checkpointing: recompute each checkpointed block's activations in the backward pass instead of
keeping them from the forward pass.

Training keeps every intermediate tensor of the forward pass until the backward pass has used it: for a deep,
wide model over long sequences these activations, not the weights, fill a device. A checkpointed block keeps only
its input; its backward pass runs its forward again to rebuild the rest. That trades compute (about one more
forward pass of each checkpointed block, roughly a third more per step) for memory (a block's activations, minus
its input), and it is the other half, beside FSDP's sharding of weights, gradients and optimizer state, of fitting
a large model (bench/README.md, activation checkpointing).

`model.activation_checkpointing=K`: 0 off, 1 every block, K every K-th block (blocks K, 2K, ... counted from
one, as torchtitan's layer-wise setting counts). torch's composable `checkpoint` is applied to each chosen block:
it works through the block's forward hooks, so the module tree, parameter names, state dicts and so checkpoints
and exports are those of the plain model (`checkpoint_wrapper` would add `_checkpoint_wrapped_module.` to every
name). Non-reentrant, with the RNG state kept: dropout recomputes the masks it drew, and the losses are those of
the plain model. Applied before compile and FSDP2 (torchtitan's order: tensor parallel, checkpointing, compile,
FSDP2): `fully_shard` gathers a block's weights again for its recomputation, and a block compiled in place keeps
its checkpoint (so with compile, blocks are compiled one by one: a whole model compiled over checkpointed blocks
fails in its backward pass, torch 2.13). tests/test_activation_checkpointing.py checks one process and FSDP x2;
bench/README.md (activation checkpointing) has the measurements, compile included.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch.distributed._composable import checkpoint

from lmkit.errors import LmkitError

KEY = "model.activation_checkpointing"


def check_activation_checkpointing(every: Any, config: Any) -> int:
    """`every` (the setting) as an int, or one LmkitError line naming what is wrong with it for a backbone of
    `config` (a `BackboneConfig`)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise LmkitError(f"{KEY}={every!r} is not a whole number of blocks >= 0: 0 (off), 1 (every block) or K "
                         "(every K-th block)")
    if every == 0:
        return 0
    if config.kind != "transformer":
        name = {"lstm": "an LSTM", "gru": "a GRU"}.get(getattr(config, "cell", None), "a recurrent model")
        raise LmkitError(f"{KEY}={every}: {name} has no blocks to checkpoint (its layers run as one fused kernel, "
                         f"model.kind={config.kind}); use {KEY}=0")
    if every > config.n_layer:
        raise LmkitError(f"{KEY}={every} would checkpoint none of the model's {config.n_layer} blocks (every "
                         f"{every}-th): use 1 to {config.n_layer}, or 0 (off)")
    return every


def apply_activation_checkpointing(backbone: nn.Module, every: int) -> None:
    """Checkpoint every `every`-th block of `backbone` in place (0: none). Idempotent: a block already checkpointed
    is left as it is (Lightning configures the model at every fit, validate and test)."""
    every = check_activation_checkpointing(every, backbone.config)
    if not every:
        return
    for number, block in enumerate(backbone.transformer.h, start=1):
        if number % every == 0 and checkpoint.state(block) is None:
            checkpoint(block)  # non-reentrant, preserve_rng_state=True: torch's defaults for this API


def checkpointed_blocks(backbone: nn.Module) -> list[int]:
    """The indices of `backbone`'s checkpointed blocks (none for a backbone without blocks)."""
    blocks = getattr(getattr(backbone, "transformer", None), "h", [])
    return [i for i, block in enumerate(blocks) if checkpoint.state(block) is not None]
