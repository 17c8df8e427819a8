"""Initial weights drawn one parameter at a time, in a fixed order, from torch's RNG.

A backbone says what each parameter starts as (`init_parameter(name, value)`: the whole tensor, whatever layer holds
it) and rebuilds its computed buffers (`reset_buffers()`). Built in one process, it draws them in place as it is
constructed; built on the meta device and sharded (trainer=fsdp, lmkit.parallel.materialize), each rank draws the
same whole tensors in the same order and keeps its slice. Either way the weights are those of the seed, so a sharded
run starts, and ends, where one process does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn


@contextmanager
def rng_untouched() -> Iterator[None]:
    """Undo whatever torch's layer constructors draw (their own initialisations, replaced by `init_parameter`), so
    the initial weights do not depend on whether the model was built on the meta device (where nothing is drawn)."""
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def init_weights(backbone: nn.Module) -> None:
    """Every parameter of `backbone` (each shared one once) at its initial value, then its computed buffers."""
    with torch.no_grad():
        for name, parameter in backbone.named_parameters():
            backbone.init_parameter(name, parameter)
    backbone.reset_buffers()
