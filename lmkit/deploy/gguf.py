"""GGUF for llama.cpp: lmkit's Transformer written as one of llama.cpp's own architectures.

    GPT-2's block (norm=layernorm, mlp=gelu)
      learned positions    -> `gpt2`        the same block, tensor for tensor
      sinusoidal positions -> `gpt2`        the fixed table written as gpt2's learned one (adding it is all either does)
      rotary positions     -> `starcoder2`  LayerNorm with biases, sequential residual, a plain (ungated) GELU MLP
                                            with biases and rotate-half ("NeoX") RoPE over the whole head: lmkit's
                                            block exactly. (gptneox matches too but transformers cannot read it;
                                            stablelm's MLP is gated SiLU; phi2's residual is parallel.)
    Llama's block (norm=rmsnorm, mlp=swiglu, rotary positions)
      no biases            -> `llama`       grouped-query attention, any head_dim; llama.cpp rotates adjacent pairs
                                            ("normal" rope), so q and k rows are permuted as its converter does;
                                            Llama 3 rope scaling as the `rope_freqs` tensor, linear as rope.scaling.*
      q/k/v biases only    -> `qwen2`       rotate-half rope (no permutation) with the q/k/v biases (Qwen2)

Each architecture is one weight-name map (`ARCHITECTURES`), litgpt-style, plus three switches: whether
the fused q/k/v rows are split, whether q/k are permuted, whether absent biases are written as zeros.

The tokenizer is written as llama.cpp's byte-level BPE with its start and end tokens and chat template
(lmkit.deploy.gguf_vocab); a README.md model card goes beside the file (lmkit.deploy.gguf_card).

A model quantized on llama.cpp's own grids (lmkit.blockquant: `compression=int4 compression.int4.quant_type=sym`
or `asym`, `compression=int8 compression.int8.quant_type=sym`, blocks of 32) is written as it is: every grid matrix
as Q4_0, Q4_1 or Q8_0 blocks holding lmkit's codes and fp16 scales byte for byte (`block_bytes`; llama q/k rows
permuted whole, as blocks run along the input dimension), the float tensors (norms, biases, positions) as F32, and
the file type the blocks' main type. Nothing is quantized again, so the integers GPTQ or activation-aware scales chose
are the integers llama.cpp multiplies: gguf-py's dequantization of the file equals lmkit's dequantized weights bit for
bit (tests/test_gguf.py). `gguf.type` is then refused, not ignored: it names what the file's matrices are, and
the model's own grid already says that; q4_0 or q8_0 would round a second time, and f16 or another grid would say
a type the file does not have. From the command line: `lmkit export model=CKPT out=Q compression=int4
compression.int4.quant_type=sym`, then `lmkit export model=Q out=G format=gguf`.

llama.cpp's logits then differ from lmkit's (its `exact` kernel, the fp32 dequantized weight) only by how it
multiplies: its CPU kernels round the activations onto a q8 grid (Q8_0, Q8_1 beside Q4_1) before each quantized
matmul. Measured (llama-cpp-python 0.3.16 on 2 threads), the largest |llama.cpp logit - lmkit logit|: 0.016-0.030
on 64 tokens (0.17-0.25% of the logits' norm, logits up to 7.5) for GPT-2- and Llama-block (GQA) models of 2 x 64
trained 100 steps (the GPT-2 one's exact GELU included), GPTQ onto Q4_0, Q4_1 and Q8_0, where llama.cpp's own
q4_0 of the float model is 0.10-0.14 away; 0.041-0.060 (1.0-1.8%) for tests/test_gguf.py's random-weight models
(bound 0.15), where the export against the model rounded to nearest, or the float model's q4_0, is 0.38-0.85 away.
On an Intel Xeon with AMX, llama.cpp's AMX buffer (its default there) computes Q4_0 and Q4_1 wrongly
(gguf_card.AMX_NOTE): the figures above are with the model loaded without extra buffer types, as the tests load it.

What cannot be said exactly is refused with one line: per-layer head counts or MLP widths (structured
pruning), quantized weights off llama.cpp's grids (NF4/FP4, LLM.int8, dynamic_int8, a block size other than 32:
each refusal names the setting that writes a grid llama.cpp has), a tokenizer llama.cpp cannot reproduce
(gguf_vocab says which), a block mixing GPT-2's and Llama's parts (layernorm with swiglu, rmsnorm with gelu),
Llama-family settings on GPT-2's block (grouped-query attention, head_dim, qkv_bias, rope scaling), and in Llama's
block biases beyond q/k/v (llama.cpp's llama loads them, but no reader here can check that file), learned or
sinusoidal positions, Llama 3 scaling or a head_dim other than n_embd/n_head under qwen2.
A bias lmkit leaves out of GPT-2's block (`model.bias=false`) is written as zeros, which gpt2 and
starcoder2 require and which changes nothing.

One approximation is allowed with a warning: llama.cpp's GELU is the tanh approximation (and on the
CPU it is read from an fp16 table of it), so a model trained with exact GELU (`model.gelu=none`, lmkit's
default) runs slightly differently; the export measures by how much and says so.

`gguf` (the `[gguf]` extra) is imported only here, when an export asks for it.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lmkit.backbones import TransformerConfig
from lmkit.backbones.transformer import rope_frequencies
from lmkit.blockquant import BlockQuantEmbedding, BlockQuantLinear, BlockQuantWeight
from lmkit.deploy import require
from lmkit.deploy.gguf_card import model_card
from lmkit.deploy.gguf_vocab import Vocabulary, vocabulary, write_vocabulary
from lmkit.errors import LmkitError
from lmkit.files import atomic_directory, check_free
from lmkit.inference import InferenceModel

TYPES = ("f32", "f16", "q8_0", "q4_0")
QUANT_BLOCK = 32  # q8_0 and q4_0 pack each row (a matrix's input dimension) in blocks of 32 values
SAMPLE_TOKENS = 64  # tokens of the fixed sample on which the GELU approximation is measured


@dataclass(frozen=True)
class Architecture:
    """One of llama.cpp's architectures, as lmkit's Transformer fills it."""

    name: str  # general.architecture
    tensors: dict[str, str]  # lmkit name -> llama.cpp name; `h.N.` / `blk.N.` stand for every layer
    split_qkv: bool = False  # c_attn's fused [q | k | v] rows written as attn_q, attn_k, attn_v
    permute_qk: bool = False  # q/k rows reordered from rotate-half pairs (i, i + d/2) to adjacent ones (2i, 2i + 1)
    zero_biases: bool = False  # the graph requires every bias: those the model leaves out are written as zeros


_GPT2 = {
    "transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
    "h.N.ln_1.weight": "blk.N.attn_norm.weight", "h.N.ln_1.bias": "blk.N.attn_norm.bias",
    "h.N.attn.c_attn.weight": "blk.N.attn_qkv.weight", "h.N.attn.c_attn.bias": "blk.N.attn_qkv.bias",
    "h.N.attn.c_proj.weight": "blk.N.attn_output.weight", "h.N.attn.c_proj.bias": "blk.N.attn_output.bias",
    "h.N.ln_2.weight": "blk.N.ffn_norm.weight", "h.N.ln_2.bias": "blk.N.ffn_norm.bias",
    "h.N.mlp.c_fc.weight": "blk.N.ffn_up.weight", "h.N.mlp.c_fc.bias": "blk.N.ffn_up.bias",
    "h.N.mlp.c_proj.weight": "blk.N.ffn_down.weight", "h.N.mlp.c_proj.bias": "blk.N.ffn_down.bias",
    "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}
_LLAMA = {
    "transformer.wte.weight": "token_embd.weight",
    "h.N.ln_1.weight": "blk.N.attn_norm.weight",
    "h.N.attn.c_attn.weight": "blk.N.attn_qkv.weight",
    "h.N.attn.c_proj.weight": "blk.N.attn_output.weight",
    "h.N.ln_2.weight": "blk.N.ffn_norm.weight",
    "h.N.mlp.gate.weight": "blk.N.ffn_gate.weight",
    "h.N.mlp.up.weight": "blk.N.ffn_up.weight",
    "h.N.mlp.c_proj.weight": "blk.N.ffn_down.weight",
    "transformer.ln_f.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
ARCHITECTURES = {
    "gpt2": Architecture("gpt2", _GPT2, zero_biases=True),
    "starcoder2": Architecture("starcoder2", {k: v for k, v in _GPT2.items() if k != "transformer.wpe.weight"},
                               split_qkv=True, zero_biases=True),
    "llama": Architecture("llama", _LLAMA, split_qkv=True, permute_qk=True),
    "qwen2": Architecture("qwen2", {**_LLAMA, "h.N.attn.c_attn.bias": "blk.N.attn_qkv.bias"}, split_qkv=True),
}


@dataclass
class GGUFExport:
    path: Path  # the folder written
    architecture: str  # llama.cpp's architecture name
    type: str  # gguf.type
    warnings: list[str] = field(default_factory=list)  # one line each, for the caller to show


def export_gguf(model: InferenceModel, out: str | Path, *, type: str = "f32", overwrite: bool = False) -> GGUFExport:
    """Write `out/model.gguf` (with a README.md model card) for llama.cpp; see the module docstring."""
    if type not in TYPES:
        raise LmkitError(f"gguf.type={type!r} is not one of {', '.join(TYPES)}")
    check_free(Path(out), overwrite)
    cfg, arch = _check_model(model, type)
    vocab = vocabulary(model)
    gguf = require("gguf", "gguf")
    warnings, gelu_note = list(vocab.notes), ""
    if cfg.mlp == "gelu" and cfg.gelu == "none":
        largest, relative = gelu_gap(model)
        gelu_note = (f"this model uses exact GELU (model.gelu=none) and llama.cpp's {arch.name} graph the tanh "
                     f"approximation: its logits move by up to {largest:.2g} ({relative:.2%} relative) on a fixed "
                     f"sample of {SAMPLE_TOKENS} tokens; train with model.gelu=tanh for an exact export")
        warnings.append(gelu_note)
    tensors = gguf_tensors(model.backbone, cfg, arch)
    grid = main_grid(tensors)
    type = grid.lower() if grid else type  # a grid model's own type (_check_model refused any other)
    with atomic_directory(Path(out), overwrite) as tmp:
        _write(gguf, tmp / "model.gguf", arch, model, cfg, vocab, tensors, type)
        size = (tmp / "model.gguf").stat().st_size
        (tmp / "README.md").write_text(model_card(model, arch.name, type, size, vocab, gelu_note, _grid_note(tensors)),
                                       encoding="utf-8")
    return GGUFExport(Path(out), arch.name, type, warnings)


def _grid_note(tensors: dict[str, np.ndarray | GridTensor]) -> str:
    """The model card's line on a grid model's weights: which types hold lmkit's own codes."""
    types = Counter(t.type for t in tensors.values() if isinstance(t, GridTensor))
    if not types:
        return ""
    spelled = ", ".join(f"{n} {t}" for t, n in types.most_common())
    return (f"weights: lmkit's own quantized codes and scales, copied into llama.cpp's blocks without rounding again "
            f"({spelled} matrices)")


def architecture(cfg: TransformerConfig) -> Architecture:
    """The llama.cpp architecture whose graph is this block, or one line naming the setting none of them has."""
    block = (cfg.norm, cfg.mlp)
    default_head = cfg.head_size * cfg.n_head == cfg.n_embd
    scaling = (cfg.rope_scaling or {}).get("rope_type")
    if block == ("layernorm", "gelu"):
        llama_only = [f"model.{k}={getattr(cfg, k)!r}" for k, set_ in (
            ("n_kv_head", cfg.kv_group > 1), ("head_dim", not default_head),
            ("qkv_bias", cfg.attn_bias != cfg.bias), ("rope_scaling", scaling is not None)) if set_]
        if llama_only:  # starcoder2 might carry some of these, but no reader here checks that it does
            raise LmkitError(f"format=gguf writes GPT-2's block (norm=layernorm, mlp=gelu) as gpt2 or starcoder2, "
                             f"without Llama-family settings; this model has {', '.join(llama_only)}")
        return ARCHITECTURES["starcoder2" if cfg.position == "rope" else "gpt2"]
    if block != ("rmsnorm", "swiglu"):
        raise LmkitError(f"format=gguf: model.norm={cfg.norm!r} with model.mlp={cfg.mlp!r} is neither GPT-2's block "
                         "(layernorm, gelu) nor Llama's (rmsnorm, swiglu), and llama.cpp has no architecture for it "
                         "(use format=onnx)")
    if cfg.position != "rope":
        raise LmkitError(f"format=gguf: llama.cpp's llama and qwen2 use rotary positions; this Llama-style block has "
                         f"model.position={cfg.position!r} (use format=onnx)")
    if cfg.bias:
        # llama.cpp's llama graph loads optional attention and MLP biases, but transformers' GGUF reader maps no
        # bias setting into LlamaConfig, so no reader here can check such a file; qwen2's graph has q/k/v biases only.
        raise LmkitError("format=gguf: model.bias=True puts biases on the attention output and the MLP of a "
                         "Llama-style block, which lmkit does not write as llama.cpp's llama (unverified) or qwen2 "
                         "(q/k/v biases only) (use format=hf)")
    if scaling not in (None, "linear", "llama3"):
        raise LmkitError(f"format=gguf: model.rope_scaling.rope_type={scaling!r} has no llama.cpp equivalent here "
                         "(linear, llama3)")
    if not cfg.attn_bias:
        return ARCHITECTURES["llama"]
    if scaling == "llama3":  # qwen2's graph passes no frequency factors to its rope
        raise LmkitError("format=gguf: model.rope_scaling.rope_type='llama3' with model.qkv_bias=True (qwen2): "
                         "llama.cpp applies Llama 3 scaling in its llama graph only")
    if not default_head:  # transformers' qwen2 reader takes n_embd / n_head and would misread the file
        raise LmkitError(f"format=gguf: model.head_dim={cfg.head_dim} with model.qkv_bias=True (qwen2): its readers "
                         f"take n_embd/n_head={cfg.n_embd // cfg.n_head} as the head width")
    return ARCHITECTURES["qwen2"]


def _check_model(model: InferenceModel, type: str) -> tuple[TransformerConfig, Architecture]:
    """The Transformer's config and llama.cpp architecture if its graph runs the model exactly (GELU aside),
    else one line why not."""
    cfg = model.record.backbone
    if not isinstance(cfg, TransformerConfig):
        raise LmkitError(f"format=gguf writes Transformers (llama.cpp runs no LSTM/GRU); this model is a "
                         f"{model.record.kind} (use format=onnx or format=lmkit)")
    arch = architecture(cfg)
    grid = grid_quantization(model.record.compression)
    if grid and type != "f32":
        raise LmkitError(f"format=gguf: this model is on llama.cpp's grid already ({grid}), which is written as it "
                         f"is; gguf.type={type} would quantize it a second time (leave gguf.type at f32)")
    if cfg.layer_heads and set(cfg.layer_heads) != {cfg.n_head}:
        raise LmkitError(f"format=gguf: llama.cpp's graphs need n_head heads in every layer; this model has "
                         f"layer_heads={cfg.layer_heads} (structured pruning removed heads)")
    widths = {cfg.ffn(i) for i in range(cfg.n_layer)}
    if len(widths) > 1:
        raise LmkitError(f"format=gguf: llama.cpp's graphs need one MLP width in every layer; this model has "
                         f"layer_ffn={cfg.layer_ffn} (structured pruning)")
    if type in ("q8_0", "q4_0"):  # every matrix's input width: n_embd, the heads' (attn_output), the MLP's (ffn_down)
        for what, width in (("model.n_embd", cfg.n_embd), ("n_head * head_dim", cfg.n_head * cfg.head_size),
                            ("the MLP width", widths.pop())):
            if width % QUANT_BLOCK:
                raise LmkitError(f"gguf.type={type} packs each weight row in blocks of {QUANT_BLOCK} values; "
                                 f"{what}={width} is not a multiple of {QUANT_BLOCK} (use gguf.type=f16 or f32)")
    return cfg, arch


def _quantizes(plugin: str) -> bool:
    from lmkit.plugins import plugin_class

    return plugin_class(plugin).quantizes


# What writes a grid llama.cpp has, for each quantizer whose own weights it has no type for
GRID_SETTING = {"int4": "compression.int4.quant_type=sym (Q4_0) or asym (Q4_1)",
                "int8": "compression.int8.quant_type=sym (Q8_0)",
                "dynamic_int8": "compression=int8 compression.int8.quant_type=sym (Q8_0)"}


def grid_quantization(steps: list[dict[str, Any]]) -> str:
    """The quantizing step of a compression record if it put the weights on llama.cpp's grids (written as they
    are), '' if none quantized (pruned weights are plain dense tensors), else one line naming the setting that
    would: llama.cpp has no type for NF4/FP4 codes, LLM.int8 rows, torch's dynamic int8 or blocks other than 32."""
    for step in steps:
        plugin, settings = step["plugin"], step.get("settings") or {}
        if not _quantizes(plugin):
            continue
        quant_type = settings.get("quant_type")
        if plugin in ("int4", "int8") and quant_type in ("sym", "asym"):
            blocksize = settings.get("blocksize") or QUANT_BLOCK
            if blocksize != QUANT_BLOCK:
                raise LmkitError(f"format=gguf: compression.{plugin}.blocksize={blocksize} has no llama.cpp type "
                                 f"(its Q4_0, Q4_1 and Q8_0 blocks hold {QUANT_BLOCK} values); use "
                                 f"compression.{plugin}.blocksize={QUANT_BLOCK}")
            return f"{plugin} {quant_type}"
        what = f"compression.{plugin}.quant_type={quant_type}" if quant_type else f"compression={plugin}"
        alternative = GRID_SETTING.get(plugin, "compression=int4 or int8 with quant_type=sym")
        raise LmkitError(f"format=gguf: {what} stores weights in a form llama.cpp has no type for; use "
                         f"{alternative}, or export the float checkpoint with gguf.type=q8_0 or q4_0")
    return ""


def gelu_gap(model: InferenceModel) -> tuple[float, float]:
    """How far the tanh approximation of GELU moves this model's logits on a fixed sample of token ids:
    (largest absolute change, change relative to the logits' norm)."""
    cfg = model.record.backbone
    approx = copy.deepcopy(model.backbone)
    for module in approx.modules():
        if isinstance(module, nn.GELU):
            module.approximate = "tanh"
    ids = torch.randint(0, cfg.vocab_size, (1, min(SAMPLE_TOKENS, cfg.max_seq_len)),
                        generator=torch.Generator().manual_seed(0)).to(model.device)
    with torch.no_grad():
        exact, tanh = model.backbone(ids)[0].float(), approx(ids)[0].float()
    return (exact - tanh).abs().max().item(), ((exact - tanh).norm() / exact.norm()).item()


@dataclass(frozen=True)
class GridTensor:
    """A matrix on one of llama.cpp's grids (lmkit.blockquant), as lmkit holds it: int8 codes (rows, cols), fp16
    scales (and minimums) (rows, cols / 32). Blocks run along a row, so row operations keep them whole."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    type: str  # Q4_0, Q4_1 or Q8_0

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def rows(self, pick: Callable[[torch.Tensor], torch.Tensor]) -> GridTensor:
        """The same row selection or permutation applied to the codes, scales and minimums."""
        return GridTensor(pick(self.codes), pick(self.scales), None if self.mins is None else pick(self.mins),
                          self.type)


Tensor = torch.Tensor | GridTensor


def grid_tensor(weight: BlockQuantWeight) -> GridTensor:
    """`weight` as llama.cpp's type holds it, or one line why it cannot (a grid gguf lacks, scales off fp16)."""
    grid = weight.grid
    if grid.gguf_type is None:
        raise LmkitError(f"format=gguf: a weight on the {grid.describe()} grid has no llama.cpp type (Q4_0, Q4_1 and "
                         f"Q8_0 hold blocks of {QUANT_BLOCK}); quantize with blocksize={QUANT_BLOCK}")
    scales = [weight.scales] + ([weight.mins] if weight.mins is not None else [])
    if any(not torch.equal(t.half().float(), t) for t in scales):  # the file holds fp16: anything else would round
        raise LmkitError("format=gguf: a grid weight's scales are not fp16 values, which llama.cpp's blocks hold")
    cpu = [None if t is None else t.detach().cpu() for t in (weight.codes, weight.scales, weight.mins)]
    return GridTensor(*cpu, grid.gguf_type)


def _state(backbone: nn.Module) -> dict[str, Tensor]:
    """The backbone's weights by lmkit name: float tensors as float32, grid layers (`X.quantized.*` buffers) as one
    GridTensor under `X.weight`, a tied head's under its own name too; any other tensor as it is (gguf_tensors
    refuses an integer one)."""
    state: dict[str, Tensor] = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                                for k, v in backbone.state_dict().items() if ".quantized." not in k}
    for name, module in backbone.named_modules(remove_duplicate=False):
        if isinstance(module, (BlockQuantLinear, BlockQuantEmbedding)):
            state[f"{name}.weight"] = grid_tensor(module.quantized)
    return state


def _rows(tensor: Tensor, pick: Callable[[torch.Tensor], torch.Tensor]) -> Tensor:
    return tensor.rows(pick) if isinstance(tensor, GridTensor) else pick(tensor)


def _split_rows(tensor: Tensor, sizes: list[int]) -> list[Tensor]:
    if not isinstance(tensor, GridTensor):
        return list(tensor.split(sizes))
    starts = np.cumsum([0, *sizes]).tolist()
    return [tensor.rows(lambda t, a=a, b=b: t[a:b]) for a, b in zip(starts, starts[1:])]


def gguf_tensors(backbone: nn.Module, cfg: TransformerConfig, arch: Architecture) -> dict[str, np.ndarray | GridTensor]:
    """llama.cpp's tensors (its names) from the backbone's, through the architecture's map: float ones as float32
    arrays, grid ones as GridTensors (their codes and scales, permuted and split as the float ones are)."""
    state = _state(backbone)
    if cfg.position == "sinusoidal":
        state["transformer.wpe.weight"] = backbone.pe.float().cpu()  # adding the fixed table is all gpt2's does
    tensors: dict[str, Tensor] = {}
    for ours, theirs in _expand(arch.tensors, cfg.n_layer):
        if ours == "lm_head.weight" and cfg.tie_weights:
            continue  # llama.cpp reads the tied head from token_embd when output is absent
        tensor = state.get(ours)
        if tensor is None and ours.endswith(".bias"):  # a bias the model leaves out (the map names no other)
            tensor = torch.zeros(state[ours.removesuffix(".bias") + ".weight"].shape[0])
        if tensor is None or not (isinstance(tensor, GridTensor) or tensor.is_floating_point()):
            # a quantizer grid_quantization does not know left its own layers (the names above are Linear's)
            raise LmkitError(f"format=gguf: {ours} is neither a float tensor nor on one of llama.cpp's grids")
        if ours in ("transformer.wte.weight", "lm_head.weight"):
            tensor = _rows(tensor, lambda t: t[: cfg.vocab_size])  # rows past the vocabulary are padding
        tensors[theirs] = tensor
    if arch.split_qkv:
        q_rows, kv_rows = cfg.n_head * cfg.head_size, cfg.n_head // cfg.kv_group * cfg.head_size
        for i in range(cfg.n_layer):
            for kind in ("weight", "bias"):
                if f"blk.{i}.attn_qkv.{kind}" not in tensors:
                    continue
                q, k, v = _split_rows(tensors.pop(f"blk.{i}.attn_qkv.{kind}"), [q_rows, kv_rows, kv_rows])
                if arch.permute_qk:  # whole rows move: a grid row's blocks go with it
                    q = _rows(q, lambda t: interleave_rope_rows(t, cfg.n_head))
                    k = _rows(k, lambda t: interleave_rope_rows(t, cfg.n_head // cfg.kv_group))
                tensors.update({f"blk.{i}.attn_q.{kind}": q, f"blk.{i}.attn_k.{kind}": k,
                                f"blk.{i}.attn_v.{kind}": v})
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        # llama.cpp divides each pair's frequency by its rope_freqs factor: lmkit's own scaled frequencies say
        # the factors exactly (llama.cpp's converter recomputes them and reads original_max_position_embeddings
        # from the top of config.json, where Llama 3 keeps it inside rope_scaling)
        plain = rope_frequencies(cfg.head_size, cfg.rope_base)
        tensors["rope_freqs.weight"] = plain / rope_frequencies(cfg.head_size, cfg.rope_base, cfg.rope_scaling)
    return {name: t if isinstance(t, GridTensor) else t.contiguous().numpy() for name, t in tensors.items()}


def block_bytes(tensor: GridTensor) -> np.ndarray:
    """llama.cpp's blocks of `tensor`, (rows, bytes per row) uint8, as ggml-common.h lays them out: Q4_0 an fp16 d,
    then 16 bytes whose low nibble is value j and high nibble value j + 16, each q + 8; Q4_1 fp16 d and m, then the
    same nibbles of q (0..15); Q8_0 fp16 d, then 32 int8 q."""
    rows, cols = tensor.shape
    blocks = cols // QUANT_BLOCK
    codes = tensor.codes.numpy().reshape(rows, blocks, QUANT_BLOCK)

    def half(t: torch.Tensor) -> np.ndarray:  # exact: the scales are fp16 values (grid_tensor checks)
        return t.numpy().astype(np.float16).reshape(rows, blocks, 1).view(np.uint8)

    parts = [half(tensor.scales)] + ([half(tensor.mins)] if tensor.mins is not None else [])
    if tensor.type == "Q8_0":
        parts.append(codes.view(np.uint8))
    else:
        unsigned = (codes + (8 if tensor.type == "Q4_0" else 0)).astype(np.uint8)
        half_block = QUANT_BLOCK // 2
        parts.append(unsigned[..., :half_block] | (unsigned[..., half_block:] << 4))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def main_grid(tensors: dict[str, np.ndarray | GridTensor]) -> str | None:
    """The grid type of most of the blocks' matrices (the file type says it), None for a float model."""
    found = Counter(t.type for name, t in tensors.items() if isinstance(t, GridTensor) and name.startswith("blk."))
    return found.most_common(1)[0][0] if found else None


def _expand(names: dict[str, str], n_layer: int) -> list[tuple[str, str]]:
    """(lmkit name, llama.cpp name) pairs, the per-layer entries (`h.N.` / `blk.N.`) once for each layer."""
    pairs = []
    for ours, theirs in names.items():
        if ours.startswith("h.N."):
            pairs += [(f"transformer.h.{i}.{ours[4:]}", f"blk.{i}.{theirs[6:]}") for i in range(n_layer)]
        else:
            pairs.append((ours, theirs))
    return pairs


def interleave_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q or k rows (weight or bias) of `n_head` heads reordered for llama.cpp's "normal" rope, which rotates
    adjacent pairs (2i, 2i + 1) where lmkit and HF rotate (i, i + d/2): convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(gguf: Any, name: str, array: np.ndarray | GridTensor, type: str, head: str) -> tuple[np.ndarray, Any]:
    """A tensor in the file's type: a grid tensor as its own blocks; vectors and the position table stay float32
    (as llama.cpp's converter keeps them); under q4_0 the output head stays at 8 bits, as llama-quantize keeps it
    above the rest."""
    if isinstance(array, GridTensor):
        return block_bytes(array), getattr(gguf.GGMLQuantizationType, array.type)
    if array.ndim == 1 or type == "f32" or name == "position_embd.weight":
        return array.astype(np.float32), None
    if type == "f16":
        return array.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.Q8_0 if type == "q8_0" or name == head else gguf.GGMLQuantizationType.Q4_0
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def _write(gguf: Any, path: Path, arch: Architecture, model: InferenceModel, cfg: TransformerConfig,
           vocab: Vocabulary, tensors: dict[str, np.ndarray | GridTensor], type: str) -> None:
    writer = gguf.GGUFWriter(str(path), arch.name)
    writer.add_name(f"lmkit {cfg.kind}")
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.ffn(0))
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head // cfg.kv_group)
    if cfg.norm == "rmsnorm":
        writer.add_layer_norm_rms_eps(cfg.layer_norm_eps)
        writer.add_vocab_size(cfg.vocab_size)  # as llama.cpp's converter writes it for llama and qwen2
    else:
        writer.add_layer_norm_eps(cfg.layer_norm_eps)
    if cfg.head_size * cfg.n_head != cfg.n_embd:  # llama.cpp's default head width is n_embd / n_head
        writer.add_key_length(cfg.head_size)
        writer.add_value_length(cfg.head_size)
    if cfg.position == "rope":
        writer.add_rope_freq_base(cfg.rope_base)
        writer.add_rope_dimension_count(cfg.head_size)
    if (cfg.rope_scaling or {}).get("rope_type") == "linear":  # llama3's factors travel as the rope_freqs tensor
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling["factor"])
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0",
                  "q4_1": "MOSTLY_Q4_1"}
    writer.add_file_type(getattr(gguf.LlamaFileType, file_types[type]))
    if type in ("q8_0", "q4_0", "q4_1"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("lmkit.record", json.dumps(model.record.to_dict()))  # provenance travels inside the file
    write_vocabulary(writer, vocab)
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    # a grid model's float tensors (an embedding kept float by embeddings=false, ...) are written as lmkit holds
    # them: rounding them onto the file's type here would ship a model lmkit never evaluated
    grid_model = any(isinstance(array, GridTensor) for array in tensors.values())
    for name, array in tensors.items():
        data, raw_dtype = _encode(gguf, name, array, "f32" if grid_model else type, head)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
