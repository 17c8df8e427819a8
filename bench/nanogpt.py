"""A nanoGPT-equivalent training loop, the reference lmkit's per-step speed is measured against.

    python bench/nanogpt.py [--steps 300] [--bias true|false] [train.py overrides: data.*, model.*, optim.*]

Written here to do what karpathy/nanoGPT's model.py and train.py do per step on a CPU, at the
shape the overrides give (`python train.py`'s defaults otherwise): GPT-2 blocks with a fused
q/k/v projection, `scaled_dot_product_attention(is_causal=True)`, tied embeddings, LayerNorm
with or without bias (nanoGPT's default: without); batches built as its `get_batch` builds them
(a stack of int64 slices of the memmapped split); AdamW over two groups (decay on tensors with
dim >= 2), `fused` on CUDA only, as nanoGPT; its warm-up + cosine `get_lr` set by hand each
step; `clip_grad_norm_(1.0)`; `loss.item()` every `log_interval` (10) steps. The data is lmkit's
token cache of the same corpus, so both sides read the same tokens. Prints one JSON line:
training tokens/s from the first step to the last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: the bias is optional."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Attention(nn.Module):
    def __init__(self, d: int, n_head: int, bias: bool) -> None:
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.c_proj = nn.Linear(d, d, bias=bias)
        self.resid_dropout = nn.Dropout(0.0)  # nanoGPT keeps its dropout modules at p=0: so do we
        self.n_head, self.d = n_head, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, bias: bool) -> None:
        super().__init__()
        self.ln_1, self.attn = LayerNorm(d, bias), Attention(d, n_head, bias)
        self.ln_2 = LayerNorm(d, bias)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=bias), nn.GELU(), nn.Linear(4 * d, d, bias=bias),
                                 nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, d: int, bias: bool) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block_size, d)
        self.drop = nn.Dropout(0.0)
        self.h = nn.ModuleList(Block(d, n_head, bias) for _ in range(n_layer))
        self.ln_f = LayerNorm(d, bias)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # tied, as nanoGPT
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--bias", default="false", choices=["true", "false"])
    args, overrides = parser.parse_known_args()

    from hydra.utils import instantiate

    from lmkit.conf import compose

    cfg = compose("train", [*overrides, "model=transformer", "paths.output_dir=unused"])
    datamodule = instantiate(cfg.data, tokenizer={"kind": "char"}, cache_dir=cfg.paths.cache_dir, seed=cfg.seed,
                             _convert_="all")
    datamodule.prepare_data()
    data: np.ndarray = datamodule.cache.split("train")
    block_size, batch_size, m, o = datamodule.seq_len, datamodule.batch_size, cfg.model, cfg.optim
    torch.manual_seed(cfg.seed)
    model = GPT(datamodule.tokenizer.vocab_size, block_size, m.n_layer, m.n_head, m.n_embd, args.bias == "true")

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
        return x, y

    def get_lr(it: int) -> float:
        if it < o.warmup_steps:
            return o.lr * (it + 1) / (o.warmup_steps + 1)
        ratio = (it - o.warmup_steps) / max(1, args.steps - o.warmup_steps)
        return o.lr * o.min_lr_ratio + 0.5 * (1 + math.cos(math.pi * ratio)) * (o.lr - o.lr * o.min_lr_ratio)

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))  # fused: CUDA only, as nanoGPT
    X, Y = get_batch()
    started = time.perf_counter()
    for it in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it)
        loss = model(X, Y)
        X, Y = get_batch()  # nanoGPT fetches the next batch while the device works on this one
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it % 10 == 0:
            lossf = loss.item()  # nanoGPT's log_interval (10 in its shakespeare_char config)
    elapsed = time.perf_counter() - started
    print(json.dumps({"tokens_per_s": args.steps * batch_size * block_size / elapsed, "loss": lossf}))


if __name__ == "__main__":
    main()
