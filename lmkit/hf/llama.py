"""Llama-family checkpoints (`LlamaForCausalLM`, `Qwen2ForCausalLM`) in and out of Hugging Face format.

One weight-name map, litgpt-style: HF's per-layer names against lmkit's, where q, k and v are HF's
three tensors and lmkit's one fused `attn.c_attn` ([q | k | v] rows). HF's Llama rope is rotate-half
over the whole head, lmkit's layout, so no row is permuted. The projections' names are also the
modules of a PEFT adapter (`lmkit.hf.peft`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmkit.backbones import Transformer, TransformerConfig
from lmkit.errors import LmkitError
from lmkit.hf.folder import BLOCK, imported_model, read_weights, without_padding, write_folder
from lmkit.inference import InferenceModel

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # model_type -> HF class
LAYER = "model.layers.{}"  # a layer's prefix in HF (lmkit's: transformer.h.N)
EMBEDDING = "model.embed_tokens"
# lmkit module (after transformer.h.N.) -> HF module (after LAYER): the projections, with a weight and maybe a bias
MODULES = {"attn.c_proj": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
           "mlp.c_proj": "mlp.down_proj"}
QKV = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}  # the parts of lmkit's attn.c_attn
CONV1D = False  # HF's projections are nn.Linear, as lmkit's (PEFT's fan_in_fan_out)
NORMS = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}  # RMSNorm: a weight only
# Per layer: HF name (after LAYER) -> lmkit name (after transformer.h.N.); q/k/v are fused apart (`qkv_names`).
LAYER_MAP = {**{f"{hf}.weight": f"{ours}.weight" for ours, hf in NORMS.items()},
             **{f"{hf}.{kind}": f"{ours}.{kind}" for ours, hf in MODULES.items() for kind in ("weight", "bias")}}
GLOBAL_MAP = {f"{EMBEDDING}.weight": "transformer.wte.weight", "model.norm.weight": "transformer.ln_f.weight",
              "lm_head.weight": "lm_head.weight"}


def rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope base, scaling) from transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    scaling = params if params.get("rope_type", "default") != "default" else hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    base = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("linear", "llama3"):
            raise LmkitError(f"rope_scaling.rope_type={kind!r} is not implemented (lmkit has linear, llama3)")
        if scaling.get("partial_rotary_factor", 1.0) != 1.0:
            raise LmkitError(f"partial_rotary_factor={scaling['partial_rotary_factor']}: lmkit rotates whole heads")
    return float(base), scaling


def hf_to_config(hf: dict[str, Any]) -> TransformerConfig:
    """lmkit's config for a Llama or Qwen2 config.json; what lmkit cannot run is one LmkitError line."""
    model_type = hf.get("model_type")
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        raise LmkitError(f"use_sliding_window={hf.get('use_sliding_window')!r}: lmkit has no sliding-window "
                         "attention")
    if hf.get("hidden_act", "silu") != "silu":
        raise LmkitError(f"hidden_act={hf['hidden_act']!r}: lmkit's SwiGLU uses silu")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise LmkitError(f"partial_rotary_factor={hf['partial_rotary_factor']}: lmkit rotates whole heads")
    if model_type == "qwen2":  # q/k/v biases hard-wired, none elsewhere
        bias, qkv_bias = False, True
    else:
        attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attention_bias != mlp_bias:  # lmkit's `bias` covers o_proj and the MLP together
            raise LmkitError(f"attention_bias={attention_bias} with mlp_bias={mlp_bias}: lmkit needs both alike")
        bias, qkv_bias = attention_bias, None
    base, scaling = rope_settings(hf)
    n_head, d = hf["num_attention_heads"], hf["hidden_size"]
    n_kv = hf.get("num_key_value_heads") or n_head
    head_dim = hf.get("head_dim") or d // n_head
    try:
        return TransformerConfig(
            vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=d,
            n_kv_head=None if n_kv == n_head else n_kv, head_dim=None if head_dim * n_head == d else head_dim,
            max_seq_len=hf.get("max_position_embeddings", 2048), bias=bias, qkv_bias=qkv_bias, norm="rmsnorm",
            layer_norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", mlp_hidden=hf["intermediate_size"],
            position="rope", rope_base=base, rope_scaling=scaling,
            tie_weights=bool(hf.get("tie_word_embeddings", False)))
    except ValueError as e:
        raise LmkitError(str(e)) from None


def hf_names(cfg: TransformerConfig) -> dict[str, str]:
    """HF name -> lmkit name for every tensor but the fused q/k/v (see `qkv_names`)."""
    names = {hf: ours for hf, ours in GLOBAL_MAP.items() if hf != "lm_head.weight" or not cfg.tie_weights}
    for i in range(cfg.n_layer):
        for hf, ours in LAYER_MAP.items():
            if hf.endswith(".bias") and not cfg.bias:
                continue
            names[f"{LAYER.format(i)}.{hf}"] = f"{BLOCK.format(i)}.{ours}"
    return names


def qkv_names(cfg: TransformerConfig, layer: int) -> list[tuple[list[str], str]]:
    """([HF q, k, v names], lmkit's fused name) for the weight and, where present, the bias of `layer`."""
    kinds = ("weight", "bias") if cfg.attn_bias else ("weight",)
    prefix = LAYER.format(layer)
    return [([f"{prefix}.{hf}.{kind}" for hf in QKV.values()], f"{BLOCK.format(layer)}.attn.c_attn.{kind}")
            for kind in kinds]


def import_folder(src: Path, hf: dict[str, Any]) -> InferenceModel:
    """A `LlamaForCausalLM` or `Qwen2ForCausalLM` directory -> an `InferenceModel` on lmkit's Transformer."""
    cfg = hf_to_config(hf)
    model = Transformer(cfg)
    expected = model.state_dict()
    weights = {k: v for k, v in read_weights(src).items() if not k.endswith("rotary_emb.inv_freq")}
    state, used = {}, set()

    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise LmkitError(f"src={src}: the checkpoint lacks {name}")
        used.add(name)
        return weights[name]

    for hf_name, ours in hf_names(cfg).items():
        state[ours] = take(hf_name)
    for layer in range(cfg.n_layer):
        for parts, ours in qkv_names(cfg, layer):
            state[ours] = torch.cat([take(p) for p in parts])
    if cfg.tie_weights:
        state["lm_head.weight"] = state["transformer.wte.weight"]
        used.add("lm_head.weight")  # some tied checkpoints store the head anyway
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise LmkitError(f"src={src}: {name} has shape {tuple(tensor.shape)}, config.json says "
                             f"{tuple(expected[name].shape)}")
    extra = sorted(set(weights) - used)
    if extra:
        raise LmkitError(f"src={src}: the checkpoint has {extra[0]}, which config.json does not account for")
    model.load_state_dict(state, strict=True)
    return imported_model(src, model, hf)


def is_llama_shaped(cfg: TransformerConfig) -> bool:
    return cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and cfg.position == "rope"


def llama_model_type(cfg: TransformerConfig) -> str:
    """llama, or qwen2 when only q/k/v have biases; what neither can hold is one LmkitError line."""
    unsupported = [f"{k}={getattr(cfg, k)!r}" for k in ("layer_heads", "layer_ffn") if getattr(cfg, k) is not None]
    if cfg.attn_bias and not cfg.bias:
        model_type = "qwen2"
    elif cfg.attn_bias == cfg.bias:
        model_type = "llama"
    else:
        unsupported.append(f"qkv_bias={cfg.qkv_bias!r} with bias={cfg.bias!r}")
    if unsupported:
        raise LmkitError(f"format=hf cannot write a Llama or Qwen2 model with {', '.join(unsupported)}")
    return model_type


def export_folder(model: InferenceModel, out: Path, overwrite: bool = False) -> Path:
    """Write a Llama-shaped lmkit model as `LlamaForCausalLM` (or `Qwen2ForCausalLM` when only q/k/v have biases)."""
    cfg = model.backbone.config
    hf_config = llama_config(cfg)
    tensors = {k: v.contiguous().float() for k, v in llama_tensors(model.backbone.state_dict(), cfg).items()}
    return write_folder(Path(out), tensors, hf_config, model, overwrite)


def llama_tensors(state: dict[str, Any], cfg: TransformerConfig) -> dict[str, Any]:
    """lmkit's state under HF's names: q/k/v split out of c_attn, the vocabulary's padding rows dropped. The values
    only need row slicing and `split`, so a quantized layer's rows (lmkit.hf.quantized) travel the same way."""
    state = without_padding(state, cfg)
    tensors = {hf: state[ours] for hf, ours in hf_names(cfg).items()}
    q, kv = cfg.n_head * cfg.head_size, cfg.n_head // cfg.kv_group * cfg.head_size
    for layer in range(cfg.n_layer):
        for parts, ours in qkv_names(cfg, layer):
            tensors.update(zip(parts, state[ours].split([q, kv, kv])))
    return tensors


def llama_config(cfg: TransformerConfig) -> dict[str, Any]:
    """config.json of the `LlamaForCausalLM` or `Qwen2ForCausalLM` that computes `cfg`'s model."""
    model_type = llama_model_type(cfg)
    return {
        "model_type": model_type, "architectures": [ARCHITECTURES[model_type]], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn(0), "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head // cfg.kv_group,
        "head_dim": cfg.head_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.layer_norm_eps,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_weights, "torch_dtype": "float32",
        # the older form (rope_theta + rope_scaling): transformers 4 and 5 and llama.cpp's converter all read it
        "rope_theta": cfg.rope_base, "rope_scaling": cfg.rope_scaling,
        **({"attention_bias": cfg.bias, "mlp_bias": cfg.bias} if model_type == "llama" else
           {"use_sliding_window": False}),
    }
