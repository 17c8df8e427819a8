"""GPT-2 (`GPT2LMHeadModel`) in and out of Hugging Face format, driven by one weight-name map.

lmkit's Transformer uses GPT-2's parameter names, so the map is the identity on names; what it records is which
tensors HF stores as `Conv1D` weights ((in, out), the transpose of nn.Linear's). Those Conv1D layers are the
projections LoRA adapts, so the same map names the modules of a PEFT adapter (`lmkit.hf.peft`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmkit.backbones import Transformer, TransformerConfig
from lmkit.errors import LmkitError
from lmkit.hf.folder import BLOCK, imported_model, read_weights, without_padding, write_folder
from lmkit.inference import InferenceModel

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel"}  # model_type -> HF class
LAYER = BLOCK  # a block's prefix, in lmkit and HF alike
EMBEDDING = "transformer.wte"
# Per block: lmkit name suffix -> whether HF stores it transposed (Conv1D).
BLOCK_MAP = {
    "ln_1.weight": False, "ln_1.bias": False,
    "attn.c_attn.weight": True, "attn.c_attn.bias": False,
    "attn.c_proj.weight": True, "attn.c_proj.bias": False,
    "ln_2.weight": False, "ln_2.bias": False,
    "mlp.c_fc.weight": True, "mlp.c_fc.bias": False,
    "mlp.c_proj.weight": True, "mlp.c_proj.bias": False,
}
GLOBAL_MAP = {f"{EMBEDDING}.weight": False, "transformer.wpe.weight": False,
              "transformer.ln_f.weight": False, "transformer.ln_f.bias": False}
# The projections, lmkit module (after LAYER) -> HF module: the Conv1D layers, under the same names. q/k/v stay one
# fused module (c_attn) in both, so no part needs a name of its own.
MODULES = {name.removesuffix(".weight"): name.removesuffix(".weight") for name, conv1d in BLOCK_MAP.items() if conv1d}
QKV: dict[str, str] | None = None
CONV1D = True  # HF stores the projections' weights (in, out): PEFT's fan_in_fan_out
GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
# What a GPT2LMHeadModel fixes: lmkit config field -> the only value it can hold
SHAPE = (("position", "learned"), ("bias", True), ("mlp_ratio", 4), ("tie_weights", True), ("layer_heads", None),
         ("layer_ffn", None), ("norm", "layernorm"), ("mlp", "gelu"), ("mlp_hidden", None), ("n_kv_head", None),
         ("head_dim", None), ("qkv_bias", None))


def weight_map(n_layer: int) -> dict[str, bool]:
    """Every tensor's name (lmkit's and HF's) -> whether HF stores it transposed."""
    names = dict(GLOBAL_MAP)
    for i in range(n_layer):
        names.update({f"{LAYER.format(i)}.{suffix}": t for suffix, t in BLOCK_MAP.items()})
    return names


def import_folder(src: Path, hf: dict[str, Any]) -> InferenceModel:
    """A `GPT2LMHeadModel` (or bare `GPT2Model`) directory -> an `InferenceModel` on lmkit's Transformer."""
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU:
        raise LmkitError(f"src={src}: activation_function={act!r} has no lmkit equivalent")
    cfg = TransformerConfig(vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                            n_embd=hf["n_embd"], max_seq_len=hf["n_positions"], gelu=GELU[act],
                            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True, position="learned")
    model = Transformer(cfg)
    # GPT2LMHeadModel names start with "transformer."; a bare GPT2Model's do not.
    weights = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
               for k, v in read_weights(src).items()}
    state = {}
    for name, transposed in weight_map(cfg.n_layer).items():
        if name not in weights:
            raise LmkitError(f"src={src}: the checkpoint lacks {name}")
        state[name] = weights[name].t().contiguous() if transposed else weights[name]
    state["lm_head.weight"] = state[f"{EMBEDDING}.weight"]  # GPT-2 ties its head to the embedding
    model.load_state_dict(state, strict=True)
    return imported_model(src, model, hf)


def unsupported(cfg: TransformerConfig) -> list[str]:
    """The settings of `cfg` a GPT2LMHeadModel cannot hold, as `name=value` (none: it can be written)."""
    return [f"{k}={getattr(cfg, k)!r}" for k, ok in SHAPE if getattr(cfg, k) != ok]


def export_folder(model: InferenceModel, out: Path, overwrite: bool = False) -> Path:
    """Write a GPT-2-shaped lmkit model where `transformers.GPT2LMHeadModel.from_pretrained` loads it."""
    cfg = model.backbone.config
    state = without_padding(model.backbone.state_dict(), cfg)
    tensors = {name: (state[name].t() if transposed else state[name]).contiguous().float()
               for name, transposed in weight_map(cfg.n_layer).items()}
    hf_config: dict[str, Any] = {
        "model_type": "gpt2", "architectures": [ARCHITECTURES["gpt2"]], "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "layer_norm_epsilon": cfg.layer_norm_eps,
        "activation_function": "gelu_new" if cfg.gelu == "tanh" else "gelu", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attn_pdrop": 0.0, "tie_word_embeddings": True, "torch_dtype": "float32",
    }
    return write_folder(Path(out), tensors, hf_config, model, overwrite)
