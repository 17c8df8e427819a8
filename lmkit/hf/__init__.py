"""Hugging Face interop: the one door in and out of `transformers`' formats, without importing `transformers`.

- `import_hf(src)`: a `save_pretrained` folder -> an `InferenceModel` (`lmkit import-hf`).
- `export_hf(model, out)`: the folder `from_pretrained` loads (`lmkit export format=hf`).
- `export_peft(model, out)`: a LoRA checkpoint's adapters as a PEFT adapter folder (`format=peft`), for the base's
  `export_hf` folder.

Where each part lives:
- `lmkit.hf.gpt2`: GPT-2 (`GPT2LMHeadModel`), its name map and weight conversion both ways.
- `lmkit.hf.llama`: Llama and Qwen2 (`LlamaForCausalLM`, `Qwen2ForCausalLM`), likewise.
- `lmkit.hf.folder`: what every family's folder shares: reading the weights, the tokenizer and its conventions, the
  JSON files, dropping the vocabulary's padding rows, writing the folder atomically.
- `lmkit.hf.peft`: the PEFT adapter format, under the module names of the family maps.
- `lmkit.hf.quantized`: Llama and Qwen2 on lmkit's int4/int8 sym grids, in compressed-tensors' layout.

A folder's `model_type`, or a model's config (`hf_model_type`), picks the family in `FAMILIES`; each family module
offers `import_folder(src, hf_config)` and `export_folder(model, out, overwrite)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmkit.backbones import TransformerConfig
from lmkit.errors import LmkitError, first_line
from lmkit.hf import gpt2, llama
from lmkit.hf.peft import export_peft, hf_source_of_base
from lmkit.hf.quantized import export_quantized, grid_steps, has_grid_layers
from lmkit.inference import InferenceModel

__all__ = ["FAMILIES", "export_hf", "export_peft", "hf_model_type", "hf_source_of_base", "import_hf"]

FAMILIES = {model_type: family for family in (gpt2, llama) for model_type in family.ARCHITECTURES}


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
    if hf.get("model_type") not in FAMILIES:
        raise LmkitError(f"src={src}: model_type={hf.get('model_type')!r} is not one lmkit imports "
                         f"({', '.join(FAMILIES)})")
    return FAMILIES[hf["model_type"]].import_folder(src, hf)


def hf_model_type(model: InferenceModel, quantized: bool = False) -> str:
    """The Hugging Face model_type `format=hf` writes `model` as (gpt2, llama, qwen2); what it cannot write is one
    LmkitError line. `quantized`: a compressed model is written too where `lmkit.hf.quantized` can say it (export_hf);
    format=peft asks without, as its adapters are for a dense base."""
    cfg = getattr(model.backbone, "config", None)
    on_grid = False
    if model.record.compressed:
        if not quantized:
            raise LmkitError("format=hf writes dense weights; this model is compressed (export it as format=lmkit)")
        on_grid = grid_steps(model.record.compression)
    if not isinstance(cfg, TransformerConfig):
        raise LmkitError(f"format=hf writes Transformers (GPT-2, Llama, Qwen2); this model is a {model.record.kind}")
    if llama.is_llama_shaped(cfg):
        return llama.llama_model_type(cfg)
    unsupported = gpt2.unsupported(cfg)
    if unsupported:
        raise LmkitError(f"format=hf needs a GPT-2- or Llama-shaped Transformer (norm=rmsnorm, mlp=swiglu, "
                         f"position=rope); this one has {', '.join(unsupported)}")
    if on_grid:  # compressed-tensors quantizes Linear and Embedding; GPT-2's Conv1D holds transposed weights
        raise LmkitError("format=hf writes quantized Llama and Qwen2 models only: GPT-2's Conv1D layers hold no "
                         "compressed-tensors groups; export this quantized GPT-2 with format=gguf or format=onnx")
    return "gpt2"


def export_hf(model: InferenceModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write an lmkit Transformer where transformers' `from_pretrained` loads it: GPT-2-shaped as GPT2LMHeadModel;
    Llama- or Qwen2-shaped as their classes, dense or on lmkit's int4/int8 sym grids (compressed-tensors' layout:
    lmkit.hf.quantized)."""
    family = FAMILIES[hf_model_type(model, quantized=True)]
    if family is llama and has_grid_layers(model.backbone):  # compressed-tensors' layout: Llama and Qwen2 only
        return export_quantized(model, Path(out), overwrite)
    return family.export_folder(model, Path(out), overwrite)
