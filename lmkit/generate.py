"""Sampling from any backbone: temperature, top-k, top-p, with the backbone's state as a cache.

The loop threads the backbone's state (a KV cache or the recurrent state) through calls, so each
new token costs one step, not a pass over the whole text. A Transformer whose context fills up is
re-primed with its latest three quarters, so generation can run past `max_seq_len`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from lmkit.errors import LmkitError

SEEDS = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes (a negative seed s draws as 2**64 + s)


def seeded_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A generator on `device` seeded with `seed`, or with fresh entropy when `seed` is None (`seed=null`)."""
    if seed is not None and not SEEDS[0] <= seed <= SEEDS[1]:
        raise LmkitError(f"seed={seed} is out of range: give an integer from {SEEDS[0]} to {SEEDS[1]}")
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of `logits` (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already cover top_p; the first always stays
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


def reprime_length(limit: int | None) -> int | None:
    """Tokens a context of `limit` keeps when it fills up and is re-primed: the latest three quarters
    (None: a recurrent model, which never fills up)."""
    return limit - limit // 4 if limit else None


@torch.no_grad()
def stream_tokens(backbone: nn.Module, ids: torch.Tensor, *, max_new_tokens: int, temperature: float,
                  top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                  use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` sampled tokens, each (B, 1), continuing `ids` (B, T)."""
    limit = backbone.max_seq_len
    keep = reprime_length(limit)
    out = ids
    if use_cache:
        state = backbone.init_state(ids.size(0))
        logits, state = backbone(ids[:, -limit:] if limit else ids, state)
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = backbone(out[:, -limit:] if limit else out)
        token = sample_next(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        yield token
        out = torch.cat([out, token], dim=1)
        if not use_cache:
            continue
        if limit and state.pos >= limit:
            state = backbone.init_state(ids.size(0))
            logits, state = backbone(out[:, -keep:], state)
        else:
            logits, state = backbone(token, state)


def generate(backbone: nn.Module, ids: torch.Tensor, *, max_new_tokens: int, temperature: float,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """Extend `ids` (B, T) by `max_new_tokens` sampled tokens; returns (B, T + max_new_tokens)."""
    new = list(stream_tokens(backbone, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, generator=generator, use_cache=use_cache))
    return torch.cat([ids, *new], dim=1)
