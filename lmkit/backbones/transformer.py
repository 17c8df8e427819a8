"""A decoder-only Transformer in plain torch, laid out like GPT-2 so its checkpoints load exactly.

Pre-norm blocks, causal attention through `F.scaled_dot_product_attention`, learned,
sinusoidal or rotary positions, tied input/output embeddings and GPT-2's initialisation.
`forward(ids, state)` returns `(logits, state)`; pass a `KVCache` from `init_state` to generate
one token at a time without recomputing the past.

The defaults are GPT-2's block. The Llama family's is the same code with other settings:
`norm="rmsnorm"`, `mlp="swiglu"`, grouped-query attention (`n_kv_head`), an explicit `head_dim`,
rotary positions with a large base and Llama 3's or linear frequency scaling (`rope_scaling`), no
biases (Qwen2: `qkv_bias=True` only).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmkit.backbones.init import init_weights, rng_untouched


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
    layer_ffn: list[int] | None = None  # per-layer MLP width (structured pruning); None: the MLP's width
    # The Llama family (defaults: GPT-2's block, so older configs and checkpoints load unchanged)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"  # swiglu: down(silu(gate(x)) * up(x))
    mlp_hidden: int | None = None  # the MLP's hidden width; None: mlp_ratio * n_embd
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None: n_head
    head_dim: int | None = None  # width of one head; None: n_embd // n_head
    qkv_bias: bool | None = None  # biases on q, k and v (Qwen2 has these and no others); None: follow `bias`
    rope_scaling: dict[str, Any] | None = None  # None, or {rope_type: linear | llama3, factor, ...} as in HF

    @property
    def head_size(self) -> int:
        """The width of one head, resolved (`head_dim` is the setting, None meaning n_embd // n_head)."""
        return self.head_dim or self.n_embd // self.n_head

    @property
    def kv_group(self) -> int:
        """Query heads served by one key/value head (1: plain multi-head attention)."""
        return self.n_head // (self.n_kv_head or self.n_head)

    def heads(self, layer: int) -> int:
        return self.layer_heads[layer] if self.layer_heads else self.n_head

    def kv_heads(self, layer: int) -> int:
        return self.heads(layer) // self.kv_group

    def ffn(self, layer: int) -> int:
        return self.layer_ffn[layer] if self.layer_ffn else self.mlp_hidden or self.mlp_ratio * self.n_embd

    @property
    def attn_bias(self) -> bool:
        """Whether q, k and v have biases (`qkv_bias`, resolved)."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    def num_parameters(self) -> int:
        """Parameters of the model this config builds, by arithmetic: a config's size is known before
        anything is allocated (and without building on the meta device, whose init imports torch._dynamo)."""
        d, bias = self.n_embd, int(self.bias)
        norm = d * (1 + bias) if self.norm == "layernorm" else d  # RMSNorm has a gain only
        total = self.padded_vocab_size * d * (1 if self.tie_weights else 2) + norm  # wte (and lm_head), ln_f
        total += self.max_seq_len * d if self.position == "learned" else 0
        for layer in range(self.n_layer):
            inner, ffn = self.heads(layer) * self.head_size, self.ffn(layer)
            qkv = inner + 2 * self.kv_heads(layer) * self.head_size
            attention = (d + int(self.attn_bias)) * qkv + (inner + bias) * d
            mlp = (d + bias) * ffn * (2 if self.mlp == "swiglu" else 1) + (ffn + bias) * d
            total += 2 * norm + attention + mlp
        return total

    def __post_init__(self) -> None:
        for key, allowed in (("position", ("learned", "sinusoidal", "rope")), ("norm", ("layernorm", "rmsnorm")),
                             ("mlp", ("gelu", "swiglu"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in ("n_layer", "n_head", "n_embd"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key}={value!r} must be a positive integer")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        for key in ("head_dim", "n_kv_head", "mlp_hidden"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"model.{key}={value!r} must be a positive integer or null")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}")
        if self.position == "rope" and self.head_size % 2:
            raise ValueError(f"rope needs an even head size, got {self.head_size}")
        if self.rope_scaling is not None:
            if self.position != "rope":
                raise ValueError(f"model.rope_scaling is set but model.position={self.position!r} (needs rope)")
            self.rope_scaling = check_rope_scaling(self.rope_scaling)
        for key in ("layer_heads", "layer_ffn"):
            value = getattr(self, key)
            if value is not None and (len(value) != self.n_layer or min(value) < 1):
                raise ValueError(f"model.{key}={value} needs {self.n_layer} positive entries (one per layer)")
        if self.layer_heads and any(h % self.kv_group for h in self.layer_heads):
            raise ValueError(f"model.layer_heads={self.layer_heads} must be whole groups of {self.kv_group} query "
                             "heads (one per key/value head)")


# What each rope scaling type needs, as Hugging Face names it (transformers' modeling_rope_utils).
ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(scaling: Any) -> dict[str, Any]:
    """`scaling` as a plain dict keyed by `rope_type` (HF's older files say `type`), or a ValueError naming what
    is wrong. Keys the type does not use are dropped."""
    if not hasattr(scaling, "get"):
        raise ValueError(f"model.rope_scaling={scaling!r} is not a mapping (rope_type, factor, ...)")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"model.rope_scaling.rope_type={kind!r} is not implemented (lmkit has "
                         f"{', '.join(ROPE_SCALING_KEYS)})")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise ValueError(f"model.rope_scaling: rope_type={kind} needs a number for {', '.join(missing)}")
    return {"rope_type": kind, **{k: scaling[k] for k in ROPE_SCALING_KEYS[kind]}}


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


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that count from the first token of each run of equal `documents` values."""
    T = documents.size(1)
    index = torch.arange(T, device=documents.device).expand_as(documents)
    first = torch.ones_like(documents, dtype=torch.bool)
    first[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - torch.where(first, index, 0).cummax(dim=1).values


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T): query i may attend to key j <= i of the same document."""
    T = documents.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    div = torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(pos / div)
    table[:, 1::2] = torch.cos(pos / div)[:, : dim // 2]
    return table


def rope_frequencies(head_dim: int, base: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """The inverse frequencies of each pair of dimensions, scaled as transformers scales them."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":  # position / factor, said on the frequencies
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths slowed down by `factor`, short ones kept, the band between interpolated
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(max_len: int, head_dim: int, base: float,
                scaling: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rope_frequencies(head_dim, base, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout (GPT-NeoX, Llama)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * gain, computed in fp32 whatever the input's dtype (as Llama does); no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig, n_head: int) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.kv_group = n_head, cfg.head_size, cfg.kv_group
        inner = n_head * cfg.head_size  # n_embd by default, less where structured pruning removed heads
        # q, k, v fused in one projection: GPT-2's [q | k | v] thirds, or with fewer kv heads (grouped-query
        # attention) [q | k | v] of n_head, n_kv_head and n_kv_head heads (litgpt's layout): one code path.
        self.c_attn = nn.Linear(cfg.n_embd, inner + 2 * inner // cfg.kv_group, bias=cfg.attn_bias)
        self.c_proj = nn.Linear(inner, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, layer: int, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        """`mask`: the cache's, when plain causal attention does not say what each query sees."""
        B, T, _ = x.shape
        # n_head is read at each call: tensor parallelism divides it by the ranks (the group stays)
        n_kv = self.n_head // self.kv_group
        inner = self.n_head * self.head_dim
        q, k, v = self.c_attn(x).split([inner, n_kv * self.head_dim, n_kv * self.head_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, T, n_kv, self.head_dim).transpose(1, 2) for t in (k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # the cache holds the kv heads only
        if self.kv_group > 1:  # kv head j serves query heads j*g .. j*g+g-1
            k, v = k.repeat_interleave(self.kv_group, dim=1), v.repeat_interleave(self.kv_group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, inner)))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the down projection keeps GPT-2's name, c_proj (its scaled init)."""

    def __init__(self, cfg: TransformerConfig, width: int) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, width, bias=cfg.bias)
        self.up = nn.Linear(cfg.n_embd, width, bias=cfg.bias)
        self.c_proj = nn.Linear(width, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.silu(self.gate(x)) * self.up(x)))


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
        self.ln_1 = norm(cfg)
        self.attn = CausalSelfAttention(cfg, cfg.heads(layer))
        self.ln_2 = norm(cfg)
        self.mlp = (SwiGLU if cfg.mlp == "swiglu" else MLP)(cfg, cfg.ffn(layer))

    def forward(self, x: torch.Tensor, layer: int, rope, cache: KVCache | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer, rope, cache, mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.max_seq_len: int | None = cfg.max_seq_len
        with rng_untouched():
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer)),
                ln_f=norm(cfg),
            ))
            if cfg.position == "learned":
                self.transformer["wpe"] = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
            elif cfg.position == "sinusoidal":
                self.register_buffer("pe", sinusoidal_table(cfg.max_seq_len, cfg.n_embd), persistent=False)
            else:
                cos, sin = rope_tables(cfg.max_seq_len, cfg.head_size, cfg.rope_base, cfg.rope_scaling)
                self.register_buffer("rope_cos", cos, persistent=False)
                self.register_buffer("rope_sin", sin, persistent=False)
            self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        if not self.lm_head.weight.is_meta:  # (on the meta device, whoever materialises it initialises it)
            init_weights(self)

    def init_parameter(self, name: str, value: torch.Tensor) -> None:
        """GPT-2's initialisation of parameter `name` into `value` (its whole tensor): N(0, 0.02) for every matrix
        and embedding, the residual projections (c_proj) scaled by 1/sqrt(2 n_layer) so the residual stream's
        variance does not grow with depth, zero biases, unit norm gains."""
        owner = self.get_submodule(name.rpartition(".")[0])
        if name.endswith("bias"):
            nn.init.zeros_(value)
        elif isinstance(owner, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(value)
        elif name.endswith("c_proj.weight"):
            nn.init.normal_(value, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        else:
            nn.init.normal_(value, mean=0.0, std=0.02)

    def reset_buffers(self) -> None:
        """The position tables, computed again (after `to_empty`, a meta-built model's buffers hold garbage)."""
        cfg = self.config
        if cfg.position == "sinusoidal":
            self.pe.copy_(sinusoidal_table(cfg.max_seq_len, cfg.n_embd))
        elif cfg.position == "rope":
            cos, sin = rope_tables(cfg.max_seq_len, cfg.head_size, cfg.rope_base, cfg.rope_scaling)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.config
        ref = self.transformer.ln_f.weight  # a float tensor even when the embedding is quantized
        return KVCache([cfg.kv_heads(i) for i in range(cfg.n_layer)], batch_size, cfg.max_seq_len, cfg.head_size,
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

    def forward(self, ids: torch.Tensor, state: KVCache | None = None,
                documents: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache | None]:
        """Logits of `ids` (B, T), continuing `state` when given. `documents` (B, T), for rows that pack several
        texts (lmkit.data.chat_datamodule): which text of its row each position belongs to; a token then attends
        only to its own text's earlier tokens, and its position counts from its text's first token, so each text's
        logits are those it has alone."""
        T = ids.size(1)
        filled = state.pos if state is not None else 0
        if filled + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {filled + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        positions = state.positions(T) if state is not None else torch.arange(T, device=ids.device)
        mask = state.mask(T) if state is not None else None
        if documents is not None:
            positions, mask = document_positions(documents), document_mask(documents)
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
