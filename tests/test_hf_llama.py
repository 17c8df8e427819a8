"""Llama and Qwen2 checkpoints in and out of Hugging Face format, against `transformers` itself.

Tiny random-weight models are built with `LlamaConfig` / `Qwen2Config` and saved into tmp_path:
nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmkit.errors import LmkitError
from lmkit.export import load, save
from lmkit.hf import export_hf, import_hf
from tests.helpers import IDS, LLAMA3, V, hf_model, lmkit_main, logits, one_error_line

CASES = {
    "llama_gqa_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_gqa_untied": ("llama", dict(tie_word_embeddings=False)),
    "llama_head_dim_biases": ("llama", dict(head_dim=16, attention_bias=True, mlp_bias=True, num_key_value_heads=1)),
    "llama3_scaling": ("llama", dict(rope_parameters={"rope_theta": 500000.0, **LLAMA3})),
    "linear_scaling": ("llama", dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0})),
    "qwen2_qkv_bias": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6)),
}


@pytest.mark.parametrize("case", CASES)
def test_imported_logits_equal_transformers(case, tmp_path):
    family, options = CASES[case]
    hf = hf_model(tmp_path / "hf", family, **options)
    model = import_hf(tmp_path / "hf")
    torch.testing.assert_close(logits(model.backbone, IDS), logits(hf, IDS), atol=1e-4, rtol=1e-4)
    cfg = model.backbone.config
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert cfg.num_parameters() == sum(p.numel() for p in model.backbone.parameters())
    if case == "qwen2_qkv_bias":
        assert cfg.qkv_bias and not cfg.bias and model.backbone.transformer.h[0].attn.c_proj.bias is None


def test_older_rope_config_form_reads_the_same(tmp_path):
    """Hub files still carry `rope_theta` + `rope_scaling` (`type`), not transformers 5's `rope_parameters`."""
    hf = hf_model(tmp_path / "hf", rope_parameters={"rope_theta": 500000.0, **LLAMA3})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    params = config.pop("rope_parameters")
    old = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type")}
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "rope_theta": params["rope_theta"],
                                                             "rope_scaling": {"type": "llama3", **old}}))
    model = import_hf(tmp_path / "hf")
    assert model.backbone.config.rope_base == 500000.0 and model.backbone.config.rope_scaling["rope_type"] == "llama3"
    torch.testing.assert_close(logits(model.backbone, IDS), logits(hf, IDS), atol=1e-4, rtol=1e-4)


def test_sharded_safetensors_with_an_index(tmp_path):
    hf = hf_model(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(tmp_path / "hf" / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.testing.assert_close(logits(import_hf(tmp_path / "hf").backbone, IDS), logits(hf, IDS), atol=1e-4, rtol=1e-4)
    (tmp_path / "hf" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LmkitError, match="model-00002-of-00002.safetensors, which is missing"):
        import_hf(tmp_path / "hf")


@pytest.mark.parametrize("case", ["llama_gqa_untied", "llama3_scaling", "qwen2_qkv_bias"])
def test_export_hf_loads_in_transformers(case, tmp_path):
    family, options = CASES[case]
    hf = hf_model(tmp_path / "hf", family, **options)
    save(import_hf(tmp_path / "hf"), tmp_path / "art")
    export_hf(load(tmp_path / "art"), tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(hf)
    torch.testing.assert_close(logits(back, IDS), logits(hf, IDS), atol=1e-4, rtol=1e-4)


def test_cli_import_and_export_with_a_tokenizer(tmp_path):
    """`lmkit import-hf` then `lmkit export format=hf` as a user runs them; the byte-level BPE tokenizer travels."""
    from lmkit.data.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["the moon and the sword and the rose " * 20], vocab_size=V)
    assert tok.vocab_size <= V
    hf = hf_model(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(tok.to_json())
    result = lmkit_main("import-hf", f"src={tmp_path / 'hf'}", f"out={tmp_path / 'art'}")
    assert result.returncode == 0 and "no tokenizer" not in result.stdout, result.stderr[-2000:]
    result = lmkit_main("export", f"model={tmp_path / 'art'}", "format=hf", f"out={tmp_path / 'back'}")
    assert result.returncode == 0, result.stderr[-2000:]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    torch.testing.assert_close(logits(back, IDS), logits(hf, IDS), atol=1e-4, rtol=1e-4)
    assert (tmp_path / "back" / "tokenizer.json").read_text() == tok.to_json()
    model = load(tmp_path / "art")
    assert model.tokenizer.encode("the moon") == tok.encode("the moon")


def test_cached_generation_with_gqa_equals_uncached(tmp_path):
    hf_model(tmp_path / "hf", rope_parameters={"rope_theta": 500000.0, **LLAMA3})
    model = import_hf(tmp_path / "hf").backbone
    full = logits(model, IDS)
    with torch.no_grad():
        state = model.init_state(2)
        assert state.k[0].shape[1] == 2  # the cache holds the 2 kv heads, not the 4 query heads
        steps = [model(IDS[:, :9], state)[0]] + [model(IDS[:, t:t + 1], state)[0] for t in range(9, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def rewrite_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


BAD = {
    "sliding_window": (dict(use_sliding_window=True, sliding_window=16), "use_sliding_window=True"),
    "rope_type": (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}), "'yarn'"),
    "old_rope_type": (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic'"),
    "architecture": (dict(model_type="mistral"), "model_type='mistral'"),
    "shape": (dict(intermediate_size=40), "mlp.gate.weight has shape (48, 32)"),
    "activation": (dict(hidden_act="gelu"), "hidden_act='gelu'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_naming_the_value(case, tmp_path):
    changes, fragment = BAD[case]
    hf_model(tmp_path / "hf", "qwen2" if case == "sliding_window" else "llama")
    rewrite_config(tmp_path / "hf", **changes)
    with pytest.raises(LmkitError) as error:
        import_hf(tmp_path / "hf")
    assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_bad_input_from_the_cli_writes_nothing(tmp_path):
    hf_model(tmp_path / "hf")
    rewrite_config(tmp_path / "hf", rope_parameters={"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0})
    result = lmkit_main("import-hf", f"src={tmp_path / 'hf'}", f"out={tmp_path / 'x'}")
    one_error_line(result, "rope_type='yarn'")
    assert result.returncode == 2 and not (tmp_path / "x").exists()


def test_a_sentencepiece_only_tokenizer_is_named_with_the_way_out(tmp_path):
    hf_model(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"\x0a\x00")  # TinyLlama's kind: SentencePiece, no tokenizer.json
    result = lmkit_main("import-hf", f"src={tmp_path / 'hf'}", f"out={tmp_path / 'art'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokenizer.model is SentencePiece" in result.stdout and "save_pretrained" in result.stdout
