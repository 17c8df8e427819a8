"""A decoder-only Transformer in plain torch, laid out like GPT-2 so its checkpoints load exactly.

Pre-LayerNorm blocks, causal attention through `F.scaled_dot_product_attention`, learned,
sinusoidal or rotary positions, tied input/output embeddings and GPT-2's initialisation.
`forward(ids, state)` returns `(logits, state)`; pass a `KVCache` from `init_state` to generate
one token at a time without recomputing the past.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TransformerConfig:
    kind: ClassVar[str] = "transformer"  # the name configs and config.json use

    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    max_seq_len: int = 256
    dropout: float = 0.0
    bias: bool = True
    position: Literal["learned", "sinusoidal", "rope"] = "learned"
    rope_base: float = 10000.0
    gelu: Literal["none", "tanh"] = "none"  # GPT-2 was trained with the tanh approximation
    mlp_ratio: int = 4
    tie_weights: bool = True
    layer_norm_eps: float = 1e-5
    pad_vocab_to: int = 1  # embedding rows rounded up to a multiple of this (64 suits GPU matmuls)
    layer_heads: list[int] | None = None  # per-layer attention heads (structured pruning); None: n_head everywhere
    layer_ffn: list[int] | None = None  # per-layer MLP width (structured pruning); None: mlp_ratio * n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def heads(self, layer: int) -> int:
        return self.layer_heads[layer] if self.layer_heads else self.n_head

    def ffn(self, layer: int) -> int:
        return self.layer_ffn[layer] if self.layer_ffn else self.mlp_ratio * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    def num_parameters(self) -> int:
        """Parameters of the model this config builds, by arithmetic: a config's size is known before
        anything is allocated (and without building on the meta device, whose init imports torch._dynamo)."""
        d, bias = self.n_embd, int(self.bias)
        norm = d * (1 + bias)
        total = self.padded_vocab_size * d * (1 if self.tie_weights else 2) + norm  # wte (and lm_head), ln_f
        total += self.max_seq_len * d if self.position == "learned" else 0
        for layer in range(self.n_layer):
            inner, ffn = self.heads(layer) * self.head_dim, self.ffn(layer)
            attention = (d + bias) * 3 * inner + (inner + bias) * d
            mlp = (d + bias) * ffn + (ffn + bias) * d
            total += 2 * norm + attention + mlp
        return total

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if self.position not in ("learned", "sinusoidal", "rope"):
            raise ValueError(f"model.position={self.position!r} is not one of learned, sinusoidal, rope")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size, got {self.n_embd // self.n_head}")
        for key in ("layer_heads", "layer_ffn"):
            value = getattr(self, key)
            if value is not None and (len(value) != self.n_layer or min(value) < 1):
                raise ValueError(f"model.{key}={value} needs {self.n_layer} positive entries (one per layer)")


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    Rows of one batch may hold texts of different lengths (`Transformer.stack_states` merges rows
    prefilled apart): each row is right-aligned, `pad[b]` slots before its first token are masked
    out, and its positions count from its own first token."""

    def __init__(self, heads: list[int], batch: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        """`heads`: the number of attention heads of each layer."""
        self.k = [torch.zeros(batch, h, max_len, head_dim, device=device, dtype=dtype) for h in heads]
        self.v = [torch.zeros(batch, h, max_len, head_dim, device=device, dtype=dtype) for h in heads]
        self.pos = 0  # slots already filled
        self.pad: torch.Tensor | None = None  # (batch,) empty slots before each row's text; None: all 0

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    def lengths(self) -> list[int]:
        """Tokens each row holds."""
        pad = self.pad.tolist() if self.pad is not None else [0] * self.batch_size
        return [self.pos - p for p in pad]

    def positions(self, T: int) -> torch.Tensor:
        """Positions of the next `T` tokens: (T,), or (batch, T) when rows are padded."""
        positions = torch.arange(self.pos, self.pos + T, device=self.k[0].device)
        return positions if self.pad is None else positions - self.pad[:, None]

    def mask(self, T: int) -> torch.Tensor | None:
        """What the next `T` queries may attend to among the filled slots and themselves; None when
        plain causal attention says it (no earlier text, or a single query, and no padding)."""
        if self.pad is None and (self.pos == 0 or T == 1):
            return None
        end = self.pos + T
        slots = torch.arange(end, device=self.k[0].device)
        mask = slots <= torch.arange(self.pos, end, device=slots.device)[:, None]  # (T, end): causal
        if self.pad is not None:
            mask = mask & (slots >= self.pad[:, None, None, None])  # (batch, 1, T, end): not before a row's text
        return mask

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    div = torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(pos / div)
    table[:, 1::2] = torch.cos(pos / div)[:, : dim // 2]
    return table


def rope_tables(max_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout (GPT-NeoX, Llama)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig, n_head: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, cfg.head_dim
        inner = n_head * cfg.head_dim  # n_embd, unless structured pruning removed heads
        self.c_attn = nn.Linear(cfg.n_embd, 3 * inner, bias=cfg.bias)  # q, k, v fused as in GPT-2
        self.c_proj = nn.Linear(inner, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, layer: int, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        """`mask`: the cache's, when plain causal attention does not say what each query sees."""
        B, T, _ = x.shape
        inner = self.n_head * self.head_dim
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for t in self.c_attn(x).split(inner, dim=2))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, inner)))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, width, bias=cfg.bias)
        self.gelu = nn.GELU(approximate=cfg.gelu)
        self.c_proj = nn.Linear(width, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, cfg.heads(layer))
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg, cfg.ffn(layer))

    def forward(self, x: torch.Tensor, layer: int, rope, cache: KVCache | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer, rope, cache, mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.max_seq_len: int | None = cfg.max_seq_len
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias),
        ))
        if cfg.position == "learned":
            self.transformer["wpe"] = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        elif cfg.position == "sinusoidal":
            self.register_buffer("pe", sinusoidal_table(cfg.max_seq_len, cfg.n_embd), persistent=False)
        else:
            cos, sin = rope_tables(cfg.max_seq_len, cfg.n_embd // cfg.n_head, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.config
        ref = self.transformer.ln_f.weight  # a float tensor even when the embedding is quantized
        return KVCache([cfg.heads(i) for i in range(cfg.n_layer)], batch_size, cfg.max_seq_len, cfg.head_dim,
                       device or ref.device, dtype or ref.dtype)

    def stack_states(self, states: list[KVCache]) -> KVCache:
        """One cache for the rows of `states` (caches of texts prefilled apart, of any lengths), so
        that they decode together; each row continues at its own position."""
        lengths = [n for state in states for n in state.lengths()]
        ref = states[0].k[0]
        out = self.init_state(len(lengths), ref.device, ref.dtype)
        out.pos = max(lengths)
        row = 0
        for state in states:  # one block per state: its rows are right-aligned at state.pos already
            n, rows = max(state.lengths()), slice(row, row + state.batch_size)
            for layer in range(len(out.k)):
                out.k[layer][rows, :, out.pos - n:out.pos] = state.k[layer][:, :, state.pos - n:state.pos]
                out.v[layer][rows, :, out.pos - n:out.pos] = state.v[layer][:, :, state.pos - n:state.pos]
            row += state.batch_size
        pad = torch.tensor([out.pos - n for n in lengths], device=ref.device)  # slots before a row's text: masked
        out.pad = pad if pad.any() else None
        return out

    def select_states(self, state: KVCache, rows: list[int]) -> KVCache:
        """The cache of `rows` of `state` only (finished rows leave a batch)."""
        out = copy.copy(state)
        index = torch.tensor(rows, device=state.k[0].device)
        out.k = [k.index_select(0, index) for k in state.k]
        out.v = [v.index_select(0, index) for v in state.v]
        out.pad = state.pad.index_select(0, index) if state.pad is not None else None
        return out

    def forward(self, ids: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache | None]:
        T = ids.size(1)
        filled = state.pos if state is not None else 0
        if filled + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {filled + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        positions = state.positions(T) if state is not None else torch.arange(T, device=ids.device)
        mask = state.mask(T) if state is not None else None
        x = self.transformer.wte(ids)
        rope = None
        if self.config.position == "learned":
            x = x + self.transformer.wpe(positions)
        elif self.config.position == "sinusoidal":
            x = x + self.pe[positions].to(x.dtype)
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            rope = (cos, sin) if positions.dim() == 1 else (cos[:, None], sin[:, None])  # (B, 1, T, hd) per row
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, i, rope, state, mask)
        if state is not None:
            state.pos += T
        logits = self.lm_head(self.transformer.ln_f(x))
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # callers see the true vocabulary only
        return logits, state
