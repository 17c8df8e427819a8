"""GPT-2 checkpoints in and out of Hugging Face format, driven by one weight-name map.

`import_hf` and `export_hf` are also the doors for the Llama family, whose map lives in
`lmkit.hf_llama`: a folder's `model_type`, or a model's block, picks the module.

lmkit's Transformer uses GPT-2's parameter names, so the map is the identity on names; what it
records is which tensors HF stores as `Conv1D` weights ((in, out), the transpose of nn.Linear's).
`transformers` is not needed: the files are read and written directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lmkit.backbones import Transformer, TransformerConfig
from lmkit.errors import LmkitError, first_line
from lmkit.hf_files import imported_model, write_hf_folder
from lmkit.inference import InferenceModel

# Per block: lmkit name suffix -> whether HF stores it transposed (Conv1D).
BLOCK_MAP = {
    "ln_1.weight": False, "ln_1.bias": False,
    "attn.c_attn.weight": True, "attn.c_attn.bias": False,
    "attn.c_proj.weight": True, "attn.c_proj.bias": False,
    "ln_2.weight": False, "ln_2.bias": False,
    "mlp.c_fc.weight": True, "mlp.c_fc.bias": False,
    "mlp.c_proj.weight": True, "mlp.c_proj.bias": False,
}
GLOBAL_MAP = {"transformer.wte.weight": False, "transformer.wpe.weight": False,
              "transformer.ln_f.weight": False, "transformer.ln_f.bias": False}
GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def weight_map(n_layer: int) -> dict[str, bool]:
    names = dict(GLOBAL_MAP)
    for i in range(n_layer):
        names.update({f"transformer.h.{i}.{suffix}": t for suffix, t in BLOCK_MAP.items()})
    return names


def _read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    if (src / "model.safetensors").is_file():
        return load_file(src / "model.safetensors")
    if (src / "pytorch_model.bin").is_file():
        return torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise LmkitError(f"{src} has neither model.safetensors nor pytorch_model.bin")


def import_hf(src: str | Path) -> InferenceModel:
    """A GPT-2, Llama or Qwen2 directory as `save_pretrained` writes it -> an `InferenceModel` (lmkit Transformer)."""
    try:
        return _import_hf(Path(src))
    except LmkitError:
        raise
    except Exception as e:  # safetensors, unpickling, JSON and key errors of a damaged directory
        raise LmkitError(f"src={src} could not be read as a Hugging Face checkpoint ({type(e).__name__}: "
                         f"{first_line(e)})") from None


def _import_hf(src: Path) -> InferenceModel:
    if not (src / "config.json").is_file():
        raise LmkitError(f"src={src} has no config.json: not a Hugging Face model directory")
    hf = json.loads((src / "config.json").read_text())
    from lmkit.hf_llama import ARCHITECTURES, import_llama

    if hf.get("model_type") in ARCHITECTURES:
        return import_llama(src, hf)
    if hf.get("model_type") != "gpt2":
        raise LmkitError(f"src={src}: model_type={hf.get('model_type')!r} is not one lmkit imports (gpt2, "
                         f"{', '.join(ARCHITECTURES)})")
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU:
        raise LmkitError(f"src={src}: activation_function={act!r} has no lmkit equivalent")
    cfg = TransformerConfig(vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                            n_embd=hf["n_embd"], max_seq_len=hf["n_positions"], gelu=GELU[act],
                            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True, position="learned")
    model = Transformer(cfg)
    # GPT2LMHeadModel names start with "transformer."; a bare GPT2Model's do not.
    weights = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
               for k, v in _read_hf_weights(src).items()}
    state = {}
    for name, transposed in weight_map(cfg.n_layer).items():
        if name not in weights:
            raise LmkitError(f"src={src}: the checkpoint lacks {name}")
        state[name] = weights[name].t().contiguous() if transposed else weights[name]
    state["lm_head.weight"] = state["transformer.wte.weight"]  # GPT-2 ties its head to the embedding
    model.load_state_dict(state, strict=True)
    return imported_model(src, model, hf)


def hf_model_type(model: InferenceModel, quantized: bool = False) -> str:
    """The Hugging Face model_type `format=hf` writes `model` as (gpt2, llama, qwen2); what it cannot write is one
    LmkitError line. `quantized`: a compressed model is written too where `lmkit.hf_quantized` can say it (export_hf);
    format=peft asks without, as its adapters are for a dense base."""
    cfg = getattr(model.backbone, "config", None)
    on_grid = False
    if model.record.compressed:
        if not quantized:
            raise LmkitError("format=hf writes dense weights; this model is compressed (export it as format=lmkit)")
        from lmkit.hf_quantized import grid_steps

        on_grid = grid_steps(model.record.compression)
    if not isinstance(cfg, TransformerConfig):
        raise LmkitError(f"format=hf writes GPT-2 models; this model is a {model.record.kind}")
    from lmkit.hf_llama import is_llama_shaped, llama_model_type

    if is_llama_shaped(cfg):
        return llama_model_type(cfg)
    unsupported = [f"{k}={getattr(cfg, k)!r}" for k, ok in
                   (("position", "learned"), ("bias", True), ("mlp_ratio", 4), ("tie_weights", True),
                    ("layer_heads", None), ("layer_ffn", None), ("norm", "layernorm"), ("mlp", "gelu"),
                    ("mlp_hidden", None), ("n_kv_head", None), ("head_dim", None), ("qkv_bias", None))
                   if getattr(cfg, k) != ok]
    if unsupported:
        raise LmkitError(f"format=hf needs a GPT-2- or Llama-shaped Transformer (norm=rmsnorm, mlp=swiglu, "
                         f"position=rope); this one has {', '.join(unsupported)}")
    if on_grid:  # compressed-tensors quantizes Linear and Embedding; GPT-2's Conv1D holds transposed weights
        raise LmkitError("format=hf writes quantized Llama and Qwen2 models only: GPT-2's Conv1D layers hold no "
                         "compressed-tensors groups; export this quantized GPT-2 with format=gguf or format=onnx")
    return "gpt2"


def export_hf(model: InferenceModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write a GPT-2-shaped lmkit model where `transformers.GPT2LMHeadModel.from_pretrained` loads it; a Llama or
    Qwen2 one, dense or on lmkit's int4/int8 sym grids (compressed-tensors' layout: lmkit.hf_quantized)."""
    if hf_model_type(model, quantized=True) != "gpt2":
        from lmkit.hf_llama import export_llama
        from lmkit.hf_quantized import export_quantized, has_grid_layers

        if has_grid_layers(model.backbone):
            return export_quantized(model, Path(out), overwrite)
        return export_llama(model, Path(out), overwrite)
    backbone = model.backbone
    cfg = backbone.config
    state = backbone.state_dict()
    state["transformer.wte.weight"] = state["transformer.wte.weight"][: cfg.vocab_size]  # drop padding rows
    tensors = {name: (state[name].t() if transposed else state[name]).contiguous().float()
               for name, transposed in weight_map(cfg.n_layer).items()}
    hf_config: dict[str, Any] = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "layer_norm_epsilon": cfg.layer_norm_eps,
        "activation_function": "gelu_new" if cfg.gelu == "tanh" else "gelu", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attn_pdrop": 0.0, "tie_word_embeddings": True, "torch_dtype": "float32",
    }
    return write_hf_folder(Path(out), tensors, hf_config, model, overwrite)
