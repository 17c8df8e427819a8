"""format=hf of grid-quantized models (lmkit.hf.quantized), read back by transformers itself through compressed-tensors
on the CPU. Tiny random Llama and Qwen2 models (tests.helpers.hf_model's), 64 wide so that every width fills blocks of 32.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lmkit.backbones import Transformer, TransformerConfig
from lmkit.blockquant import BlockQuantLinear, set_kernel
from lmkit.compress import compress
from lmkit.errors import LmkitError
from lmkit.export import load, save
from lmkit.hf import export_hf, hf_model_type, import_hf
from lmkit.hf.quantized import pack_int32
from lmkit.inference import InferenceModel
from lmkit.plugins import CompressContext
from lmkit.record import ModelRecord
from tests.helpers import IDS, V, hf_model, logits

compressed_tensors = pytest.importorskip("compressed_tensors")  # transformers' reader of the layout

WIDE = dict(hidden_size=64, intermediate_size=96)  # head_dim 16; every matrix's input a multiple of 32
# transformers computes exactly lmkit's `exact` kernel here: measured 0.0 (torch 2.13 CPU, transformers 5.25); the
# tolerance leaves room for another BLAS's summation order, far below the grid's own change (0.09 to 1.5)
ATOL = 1e-5
CASES = {
    # untied: int4 matrices, the head on int8 (head_bits=8, a second config group), the embedding int4
    "llama_int4_untied": ("llama", dict(tie_word_embeddings=False), {"int4": {"quant_type": "sym"}}),
    # tied: the embedding is the head's int8 grid, written as its values; q/k/v biases stay float
    "qwen2_int8_tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6), {"int8": {"quant_type": "sym"}}),
}


def quantized(tmp_path, family: str, options: dict, spec: dict) -> tuple[InferenceModel, InferenceModel]:
    """(float model, its grid-quantized copy as `lmkit export` loads it back from format=lmkit), exact kernel."""
    hf_model(tmp_path / "hf", family, **WIDE, **options)
    dense = import_hf(tmp_path / "hf")
    model, _ = compress(dense, spec, CompressContext(cache_dir=""), gen_tokens=1)
    save(model, tmp_path / "art")
    model = load(tmp_path / "art")
    set_kernel(model.backbone, "exact")  # the dequantized fp32 weight: what any other runtime computes
    return dense, model


@pytest.mark.parametrize("case", CASES)
def test_transformers_reads_lmkits_grid_on_the_cpu(case, tmp_path):
    family, options, spec = CASES[case]
    dense, model = quantized(tmp_path, family, options, spec)
    export_hf(model, tmp_path / "out")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    ours = logits(model.backbone, IDS)[..., :V]
    theirs = logits(back.eval(), IDS)
    assert (theirs - ours).abs().max() <= ATOL
    assert (theirs - logits(dense.backbone, IDS)).abs().max() > 100 * ATOL  # the grid shows: the test can fail


def test_the_file_holds_lmkits_integers_and_scales(tmp_path):
    _, model = quantized(tmp_path, "llama", dict(tie_word_embeddings=False), {"int4": {"quant_type": "sym"}})
    export_hf(model, tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    bits = {m: g["weights"]["num_bits"] for g in config["config_groups"].values() for m in g["targets"]}
    assert bits["lm_head"] == 8 and bits["model.layers.1.self_attn.k_proj"] == 4
    c_attn = model.backbone.transformer.h[1].attn.c_attn.quantized
    q_rows = 4 * 16
    k = "model.layers.1.self_attn.k_proj"
    codes = compressed_tensors.compressors.unpack_from_int32(tensors[f"{k}.weight_packed"], 4,
                                                             tuple(tensors[f"{k}.weight_shape"].tolist()))
    assert torch.equal(codes, c_attn.codes[q_rows:q_rows + 32])  # k's 2 heads of 16 rows, after q's
    assert tensors[f"{k}.weight_scale"].dtype == torch.float16
    assert torch.equal(tensors[f"{k}.weight_scale"].float(), c_attn.scales[q_rows:q_rows + 32])
    head = model.backbone.lm_head
    assert isinstance(head, BlockQuantLinear) and head.quantized.grid.bits == 8
    assert tensors["lm_head.weight_packed"].shape == (V, 64 // 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_compressed_tensors_own(bits):
    low, high = (-8, 7) if bits == 4 else (-127, 127)
    codes = torch.randint(low, high + 1, (5, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    from compressed_tensors.compressors import pack_to_int32

    assert torch.equal(pack_int32(codes, bits), pack_to_int32(codes, bits))


REFUSED = {
    "int4 nf4": ({"plugin": "int4", "settings": {"quant_type": "nf4"}},
                 r"compression.int4.quant_type=nf4 stores NF4 table codes.*use compression.int4.quant_type=sym"),
    "int4 fp4": ({"plugin": "int4", "settings": {"quant_type": "fp4"}}, r"use compression.int4.quant_type=sym"),
    "llm_int8": ({"plugin": "int8", "settings": {"quant_type": "llm_int8"}},
                 r"compression.int8.quant_type=llm_int8 keeps LLM.int8's outlier.*use compression.int8.quant_type=sym"),
    "dynamic_int8": ({"plugin": "dynamic_int8", "settings": {}},
                     r"compression=dynamic_int8 quantizes activations.*use compression=int8 "
                     r"compression.int8.quant_type=sym, quantizing the float model"),
    "int8 by default": ({"plugin": "int8", "settings": {}}, r"compression.int8.quant_type=llm_int8"),  # its default
    "prune_structured": ({"plugin": "prune_structured", "settings": {}},
                         r"compression=prune_structured leaves per-layer head counts and MLP widths.*format=onnx"),
    "third party": ({"plugin": "mystery", "settings": {}}, r"compression=mystery is not one format=hf writes"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_the_layout_cannot_hold_is_one_line(case, tmp_path):
    """The compression record decides, before any weight is read: so a record is enough here."""
    step, message = REFUSED[case]
    hf_model(tmp_path / "hf", **WIDE)
    model = import_hf(tmp_path / "hf")
    model.record = model.record.replace(compression=[step])
    with pytest.raises(LmkitError, match=message) as error:
        export_hf(model, tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_asymmetric_grid_and_gpt2_are_refused_and_pruning_alone_is_dense(tmp_path):
    _, model = quantized(tmp_path, "llama", {}, {"int4": {"quant_type": "asym"}})
    with pytest.raises(LmkitError, match=r"compression.int4.quant_type=asym stores q \* d \+ m with a float minimum"
                                         r".*use compression.int4.quant_type=sym, or export this model as it "
                                         r"is with format=gguf or format=onnx"):
        export_hf(model, tmp_path / "asym")
    cfg = TransformerConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2)
    gpt2 = InferenceModel(Transformer(cfg).eval(), None, ModelRecord(backbone=cfg))
    gpt2, _ = compress(gpt2, {"int8": {"quant_type": "sym"}}, CompressContext(cache_dir=""), gen_tokens=1)
    with pytest.raises(LmkitError, match=r"GPT-2's Conv1D layers hold no compressed-tensors groups; export this "
                                         r"quantized GPT-2 with format=gguf or format=onnx"):
        export_hf(gpt2, tmp_path / "gpt2")
    with pytest.raises(LmkitError, match=r"format=hf writes dense weights; this model is compressed"):
        hf_model_type(gpt2)  # format=peft's question: its adapters are for a dense base
    dense = import_hf(tmp_path / "hf")
    dense.record = dense.record.replace(compression=[{"plugin": "prune", "settings": {}}])  # zeros: plain tensors
    export_hf(dense, tmp_path / "pruned")
    assert "quantization_config" not in json.loads((tmp_path / "pruned" / "config.json").read_text())
