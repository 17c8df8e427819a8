"""GGUF export (llama.cpp), checked by independent readers: transformers' GGUF loader, and llama.cpp itself
through llama-cpp-python where it is installed (an optional extra that compiles; CI goes without it)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lmkit.backbones import backbone_config, build_backbone
from lmkit.data.tokenizer import BPETokenizer, CharTokenizer
from lmkit.deploy.gguf import export_gguf
from lmkit.errors import LmkitError
from lmkit.export import save
from lmkit.inference import InferenceModel
from lmkit.record import ModelRecord

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TEXT = ("ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name; 42 times.\n")


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([TEXT * 3], vocab_size=300)


def tiny_lm(tokenizer, **options) -> InferenceModel:
    """Every weight drawn from N(0, 0.3), biases and norms included: the default init hides mapping bugs."""
    torch.manual_seed(0)
    settings = {**dict(n_layer=2, n_head=2, n_embd=32, max_seq_len=32, gelu="tanh"), **options}
    record = ModelRecord(backbone=backbone_config("transformer", tokenizer.vocab_size, **settings),
                         tokenizer=tokenizer.kind)
    model = InferenceModel(build_backbone(record.backbone).eval(), tokenizer, record)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def hf_model(out: Path, model: InferenceModel):
    cfg = model.record.backbone
    # transformers' reader leaves gpt2's context length and MLP width at GPT2Config's defaults (lmkit's card says so)
    options = dict(n_positions=cfg.max_seq_len, n_inner=cfg.ffn(0)) if cfg.position != "rope" else {}
    return transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", **options).eval()


def compare(model: InferenceModel, out: Path) -> tuple[float, float]:
    """(largest absolute, norm-relative) difference of transformers' logits from lmkit's on the text's tokens."""
    ids = torch.tensor([model.tokenizer.encode(TEXT)[: model.record.backbone.max_seq_len]])
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(out, model)(ids).logits
    return (ours - theirs).abs().max().item(), ((ours - theirs).norm() / ours.norm()).item()


@pytest.mark.parametrize("options, architecture", [
    (dict(), "gpt2"),
    (dict(position="sinusoidal", mlp_ratio=2), "gpt2"),
    (dict(bias=False, tie_weights=False, pad_vocab_to=64), "gpt2"),
    (dict(position="rope", rope_base=10000.0), "starcoder2"),
    (dict(position="rope", bias=False, n_head=4), "starcoder2"),
])
def test_f32_logits_match_transformers_gguf_loader(bpe, tmp_path, options, architecture):
    model = tiny_lm(bpe, **options)
    exported = export_gguf(model, tmp_path / "gguf")
    assert exported.architecture == architecture and not exported.warnings
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["README.md", "model.gguf"]
    largest, _ = compare(model, tmp_path / "gguf")
    assert largest < 1e-4


def test_types_shrink_the_file_within_their_tolerance(bpe, tmp_path):
    model = tiny_lm(bpe, n_embd=64)
    sizes, errors = {}, {}
    for type in ("f32", "f16", "q8_0", "q4_0"):
        export_gguf(model, tmp_path / type, type=type)
        sizes[type] = (tmp_path / type / "model.gguf").stat().st_size
        errors[type] = compare(model, tmp_path / type)[1]
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    assert errors["f16"] < 2e-3 and errors["q8_0"] < 0.02 and errors["q4_0"] < 0.15, errors
    assert "q8_0" in (tmp_path / "q8_0" / "README.md").read_text()


def test_tokenizer_reads_back_as_lmkit_tokenizes(bpe, tmp_path):
    model = tiny_lm(bpe)
    export_gguf(model, tmp_path / "gguf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf")
    for text in (TEXT, "  two spaces, tabs\tand unseen words: zyxwv 1234567"):
        ids = bpe.encode(text)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        assert tokenizer.decode(ids) == text


def test_exact_gelu_exports_with_a_measured_warning(bpe, tmp_path):
    model = tiny_lm(bpe, gelu="none")
    exported = export_gguf(model, tmp_path / "gguf")
    assert len(exported.warnings) == 1 and "model.gelu=tanh" in exported.warnings[0]
    tanh = tiny_lm(bpe, gelu="tanh")  # the same weights, the approximation llama.cpp and transformers compute
    assert compare(tanh, tmp_path / "gguf")[0] < 1e-4
    assert compare(model, tmp_path / "gguf")[0] > 1e-5  # the gap the warning measures is real
    assert "exact GELU" in (tmp_path / "gguf" / "README.md").read_text()


def _with_compression(model: InferenceModel, plugin: str, **settings) -> InferenceModel:
    """`model` compressed by the real plugin, its step recorded as lmkit.compress records it."""
    from lmkit.plugins import CompressContext, make

    step = make(plugin, settings)
    record = {"plugin": plugin, "settings": step.settings, **step.apply(model, CompressContext(cache_dir=""))}
    model.record = model.record.replace(compression=[record])
    return model


@pytest.mark.parametrize("make, options, message", [
    (lambda tok: tiny_lm(tok, n_embd=48, n_head=2), dict(type="q4_0"), "model.n_embd=48 is not a multiple of 32"),
    (lambda tok: tiny_lm(tok, n_embd=48, n_head=2), dict(type="q8_0"), "model.n_embd=48 is not a multiple of 32"),
    (lambda tok: tiny_lm(tok), dict(type="q5_k"), "gguf.type='q5_k' is not one of"),
    (lambda tok: tiny_lm(tok, layer_heads=[2, 1]), {}, "n_head heads in every layer"),
    (lambda tok: tiny_lm(tok, layer_ffn=[64, 32]), {}, "one MLP width in every layer"),
    (lambda tok: _with_compression(tiny_lm(tok), "dynamic_int8"), {}, "quantized (dynamic_int8)"),
    (lambda tok: tiny_lm(CharTokenizer("abc \n")), {}, "train with tokenizer=bpe"),
    (lambda tok: tiny_lm(tok, n_kv_head=1, position="rope"), {},  # Llama-family refusals: tests/test_gguf_llama.py
     "without Llama-family settings; this model has model.n_kv_head=1"),
])
def test_what_gguf_cannot_express_is_one_line_and_nothing_written(bpe, tmp_path, make, options, message):
    with pytest.raises(LmkitError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        export_gguf(make(bpe), tmp_path / "gguf", **options)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "gguf").exists() and not list(tmp_path.iterdir())


def test_pruned_weights_export_dense(bpe, tmp_path):
    model = _with_compression(tiny_lm(bpe), "prune", criterion="magnitude", finetune_steps=0)  # dense, with zeros
    assert (model.backbone.transformer.h[0].mlp.c_fc.weight == 0).float().mean() > 0.3
    export_gguf(model, tmp_path / "gguf")
    assert compare(model, tmp_path / "gguf")[0] < 1e-4


def test_export_default_type_is_the_config_default():
    import inspect

    stated = OmegaConf.load(Path(__file__).parents[1] / "conf" / "export.yaml").gguf.type
    assert inspect.signature(export_gguf).parameters["type"].default == stated


def lmkit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from lmkit.cli import main; main()", "export", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_exports_gguf_and_refuses_an_lstm_in_one_line(bpe, tmp_path):
    model = tiny_lm(bpe)
    save(model, tmp_path / "model")
    done = lmkit_cli(f"model={tmp_path / 'model'}", f"out={tmp_path / 'gguf'}", "format=gguf", "gguf.type=q8_0")
    assert done.returncode == 0, done.stderr
    assert compare(model, tmp_path / "gguf")[1] < 0.02

    torch.manual_seed(0)
    record = ModelRecord(backbone=backbone_config("lstm", bpe.vocab_size, n_layer=1, n_embd=16), tokenizer="bpe")
    save(InferenceModel(build_backbone(record.backbone).eval(), bpe, record), tmp_path / "lstm")
    refused = lmkit_cli(f"model={tmp_path / 'lstm'}", f"out={tmp_path / 'lstm-gguf'}", "format=gguf")
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "format=gguf writes Transformers" in refused.stderr
    assert not (tmp_path / "lstm-gguf").exists()


def test_llama_cpp_generates_lmkit_greedy_tokens(bpe, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")  # pip install 'lmkit[llama]' (compiles llama.cpp)
    model = tiny_lm(bpe, position="learned")
    export_gguf(model, tmp_path / "gguf")
    llm = llama_cpp.Llama(str(tmp_path / "gguf" / "model.gguf"), n_ctx=32, verbose=False)
    prompt = bpe.encode("ROMEO:\nBut, soft!")
    assert llm.tokenize("ROMEO:\nBut, soft!".encode(), add_bos=False, special=False) == prompt
    ours, theirs = greedy_tokens(model, llm, prompt)
    assert theirs == ours


def greedy_tokens(model, llm, prompt: list[int], steps: int = 12) -> tuple[list[int], list[int]]:
    """`steps` greedy tokens after `prompt` from lmkit's model and from llama.cpp's, each decoded by hand (neither
    stops at an end token)."""
    ours, ids = [], list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ours.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            ids.append(ours[-1])
    theirs = []
    llm.eval(prompt)
    for _ in range(steps):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    return ours, theirs
