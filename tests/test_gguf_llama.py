"""GGUF export of the Llama family (llama.cpp's `llama` and `qwen2`), checked by readers other than lmkit.

Tiny random-weight `LlamaForCausalLM` / `Qwen2ForCausalLM` models (tests/helpers.py's `hf_model`) are
imported with lmkit, exported, and read back by transformers' GGUF loader, which un-permutes llama's q/k rows as
llama.cpp's converter permuted them. That loader drops rope scaling, so scaled models are compared with the
scaling restored on its config, and the `rope_freqs` tensor is checked apart against llama.cpp's own formula and
against a numpy rope that rotates adjacent pairs, as ggml's "normal" rope does. llama-cpp-python, where installed,
checks greedy tokens.
"""

import math

import numpy as np
import pytest
import torch

from lmkit.deploy.gguf import export_gguf
from lmkit.errors import LmkitError
from lmkit.hf import import_hf
from lmkit.inference import InferenceModel
from tests.helpers import LLAMA3, TEXT, greedy_tokens, hf_model, lively_bpe_transformer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

CASES = {  # family, LlamaConfig / Qwen2Config options (over tests.helpers' SHAPE: 2 layers x 32, 4 heads, 2 kv heads)
    "llama_gqa_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_untied": ("llama", dict(tie_word_embeddings=False, num_key_value_heads=4)),
    "llama_head_dim_mqa": ("llama", dict(head_dim=16, num_key_value_heads=1)),
    "qwen2_qkv_bias": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "llama3_scaling": ("llama", dict(rope_parameters={"rope_theta": 500000.0, **LLAMA3})),
    "linear_scaling": ("llama", dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0})),
}


def imported(path, tokenizer, family: str, **options) -> InferenceModel:
    """An HF model saved with a byte-level BPE tokenizer.json, then imported by lmkit."""
    hf_model(path, family, vocab_size=tokenizer.vocab_size, **options)
    (path / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    return import_hf(path)


def read_back(out, rope_parameters: dict | None = None):
    """transformers' model from out/model.gguf; `rope_parameters`: the scaling its reader drops, restored."""
    config = transformers.AutoConfig.from_pretrained(out, gguf_file="model.gguf")
    if rope_parameters is not None:
        config.rope_parameters = {**config.rope_parameters, **rope_parameters}
    return transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", config=config).eval()


def compare(model: InferenceModel, back) -> tuple[float, float, float]:
    """(largest absolute, norm-relative difference, top-1 agreement) of `back`'s logits against lmkit's, on the
    text's tokens and on a batch of random ids."""
    ids = torch.tensor([model.tokenizer.encode(TEXT)[:64]])
    noise = torch.randint(0, model.record.backbone.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    ours, theirs = [], []
    with torch.no_grad():
        for batch in (ids, noise):
            ours.append(model(batch).flatten(0, 1))
            theirs.append(back(batch).logits.flatten(0, 1))
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    return (ours - theirs).abs().max().item(), ((ours - theirs).norm() / ours.norm()).item(), top1


def fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}


def tensor(path, name: str) -> np.ndarray:
    return next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name).data


@pytest.mark.parametrize("case", CASES)
def test_f32_logits_match_transformers_gguf_loader(case, bpe, tmp_path):
    family, options = CASES[case]
    model = imported(tmp_path / "hf", bpe, family, **options)
    exported = export_gguf(model, tmp_path / "gguf")
    architecture = "qwen2" if family == "qwen2" else "llama"
    assert exported.architecture == architecture and not exported.warnings
    path = tmp_path / "gguf" / "model.gguf"
    meta = fields(path)
    cfg = model.record.backbone
    assert meta["general.architecture"] == architecture
    assert meta[f"{architecture}.attention.head_count_kv"] == cfg.n_head // cfg.kv_group
    assert meta[f"{architecture}.rope.dimension_count"] == cfg.head_size
    assert meta[f"{architecture}.rope.freq_base"] == cfg.rope_base
    assert meta[f"{architecture}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.layer_norm_eps)
    scaling = cfg.rope_scaling
    back = read_back(tmp_path / "gguf", scaling)
    assert type(back).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[architecture]
    largest, _, _ = compare(model, back)
    assert largest < 1e-4, largest
    if scaling is not None:  # the reader's loss is real: without the scaling restored, the logits differ
        assert compare(model, read_back(tmp_path / "gguf"))[0] > 1e-3
    card = (tmp_path / "gguf" / "README.md").read_text()  # its transformers snippet, run as a user would
    scope = {}
    exec(card.split("```python\n")[2].split("```")[0].replace("DIR", str(tmp_path / "gguf")), scope)
    assert compare(model, scope["model"].eval())[0] < 1e-4
    if case == "linear_scaling":
        assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 4.0
    if case == "qwen2_qkv_bias":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= {
            t.name for t in gguf.GGUFReader(str(path)).tensors}


def test_llama3_rope_freqs_are_llama_cpp_converter_factors(bpe, tmp_path):
    """The factors as convert_hf_to_gguf.py's LlamaModel computes them from the HF config (reimplemented here)."""
    model = imported(tmp_path / "hf", bpe, "llama", rope_parameters={"rope_theta": 500000.0, **LLAMA3})
    export_gguf(model, tmp_path / "gguf")
    cfg = model.record.backbone
    base, dim = cfg.rope_base, cfg.head_size
    expected = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        old, low, high, factor = (LLAMA3[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                                      "high_freq_factor", "factor"))
        if wavelen < old / high:
            expected.append(1.0)
        elif wavelen > old / low:
            expected.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            expected.append(1 / ((1 - smooth) / factor + smooth))
    got = tensor(tmp_path / "gguf" / "model.gguf", "rope_freqs.weight")
    assert got.dtype == np.float32 and got.shape == (dim // 2,)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert len(set(np.round(got, 4))) == 2  # this shape exercises both the scaled band and the smoothed one


def ggml_normal_rope(x: np.ndarray, pos: int, base: float, factors: np.ndarray) -> np.ndarray:
    """ggml's rope for llama (GGML_ROPE_TYPE_NORMAL): adjacent pairs (2i, 2i+1) rotated by pos * base^(-2i/d) / f_i."""
    d = x.shape[-1]
    theta = pos * base ** (-np.arange(0, d, 2) / d) / factors
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x0 * np.cos(theta) - x1 * np.sin(theta), x0 * np.sin(theta) + x1 * np.cos(theta)
    return out


def test_llama_q_k_rows_score_as_lmkit_under_ggml_rope(bpe, tmp_path):
    """Attention scores from the file's q/k under ggml's adjacent-pair rope equal lmkit's rotate-half scores:
    the permutation and the rope_freqs factors mean to llama.cpp what lmkit computes (no transformers involved)."""
    model = imported(tmp_path / "hf", bpe, "llama", rope_parameters={"rope_theta": 500000.0, **LLAMA3})
    export_gguf(model, tmp_path / "gguf")
    path, cfg = tmp_path / "gguf" / "model.gguf", model.record.backbone
    hd, n_kv = cfg.head_size, cfg.n_head // cfg.kv_group
    x = np.random.default_rng(0).standard_normal(cfg.n_embd).astype(np.float32)
    q_file, k_file = (tensor(path, f"blk.1.attn_{p}.weight") @ x for p in ("q", "k"))
    factors = tensor(path, "rope_freqs.weight")
    attn = model.backbone.transformer.h[1].attn
    q, k, _ = (attn.c_attn.weight.detach() @ torch.from_numpy(x)).split([cfg.n_head * hd, n_kv * hd, n_kv * hd])
    cos, sin = model.backbone.rope_cos, model.backbone.rope_sin
    from lmkit.backbones.transformer import apply_rope

    for pq, pk in ((5, 2), (40, 13)):
        ours = (apply_rope(q.view(cfg.n_head, hd), cos[pq], sin[pq])
                @ apply_rope(k.view(n_kv, hd), cos[pk], sin[pk]).T).numpy()
        theirs = (ggml_normal_rope(q_file.reshape(cfg.n_head, hd), pq, cfg.rope_base, factors)
                  @ ggml_normal_rope(k_file.reshape(n_kv, hd), pk, cfg.rope_base, factors).T)
        np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


def test_quantized_types_load_and_agree(bpe, tmp_path):
    model = imported(tmp_path / "hf", bpe, "llama", intermediate_size=64)  # q8_0/q4_0 rows come in blocks of 32
    sizes, results = {}, {}
    for type in ("f32", "q8_0", "q4_0"):
        export_gguf(model, tmp_path / type, type=type)
        sizes[type] = (tmp_path / type / "model.gguf").stat().st_size
        results[type] = compare(model, read_back(tmp_path / type))
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f32"]
    # SHAPE's weights (std 0.2) are far larger than a trained model's, so rounding moves the logits a lot. Measured,
    # norm-relative and top-1 agreement: q8_0 1.74% and 97.9%, q4_0 25.9% and 62.5% (one thread or two alike; an
    # earlier transformers on another CPU: 2.0%/96%, 24%/63%). Unrelated logits are ~140% apart and agree ~1/300.
    assert results["f32"][0] < 1e-4
    assert results["q8_0"][1] < 0.025 and results["q8_0"][2] > 0.93, results
    assert 0.2 < results["q4_0"][1] < 0.3 and results["q4_0"][2] > 0.55, results


def test_tokenizer_reads_back_for_llama(bpe, tmp_path):
    export_gguf(imported(tmp_path / "hf", bpe, "llama"), tmp_path / "gguf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf")
    assert tokenizer(TEXT, add_special_tokens=False)["input_ids"] == bpe.encode(TEXT)
    assert fields(tmp_path / "gguf" / "model.gguf")["general.architecture"] == "llama"
    assert gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf")).fields["tokenizer.ggml.pre"].contents() == "gpt-2"


def _scaling_llama_cpp_lacks(tok):
    model = lively_bpe_transformer(tok, norm="rmsnorm", mlp="swiglu", position="rope", bias=False)
    # TransformerConfig admits linear and llama3 only; a future type must still be refused, not mislabelled
    model.record.backbone.rope_scaling = {"rope_type": "yarn", "factor": 4.0}
    return model


LLAMA_BLOCK = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False)
REFUSED = {
    "layernorm_swiglu": (lambda tok: lively_bpe_transformer(tok, mlp="swiglu", position="rope"),
                         "model.norm='layernorm' with model.mlp='swiglu'"),
    "rmsnorm_gelu": (lambda tok: lively_bpe_transformer(tok, norm="rmsnorm", position="rope"),
                     "model.norm='rmsnorm' with model.mlp='gelu'"),
    "mlp_biases": (lambda tok: lively_bpe_transformer(tok, norm="rmsnorm", mlp="swiglu", position="rope", bias=True),
                   "model.bias=True puts biases on the attention output and the MLP"),
    "learned_positions": (lambda tok: lively_bpe_transformer(tok, **{**LLAMA_BLOCK, "position": "learned"}),
                          "model.position='learned'"),
    "gqa_on_gpt2_block": (lambda tok: lively_bpe_transformer(tok, n_head=4, n_kv_head=2, position="rope"), "model.n_kv_head=2"),
    "qwen2_llama3": (lambda tok: lively_bpe_transformer(tok, **LLAMA_BLOCK, qkv_bias=True, rope_base=5e5,
                                         rope_scaling={"rope_type": "llama3", **{k: v for k, v in LLAMA3.items()
                                                                                 if k != "rope_type"}}),
                     "rope_type='llama3' with model.qkv_bias=True"),
    "qwen2_head_dim": (lambda tok: lively_bpe_transformer(tok, **LLAMA_BLOCK, qkv_bias=True, head_dim=8),
                       "model.head_dim=8 with model.qkv_bias=True"),
    "rope_scaling_type": (_scaling_llama_cpp_lacks, "model.rope_scaling.rope_type='yarn'"),
    "pruned_heads": (lambda tok: lively_bpe_transformer(tok, **LLAMA_BLOCK, n_head=4, n_kv_head=2, layer_heads=[4, 2]),
                     "n_head heads in every layer"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_llama_cpp_cannot_say_is_one_line_and_nothing_written(case, bpe, tmp_path):
    make, fragment = REFUSED[case]
    with pytest.raises(LmkitError) as error:
        export_gguf(make(bpe), tmp_path / "gguf")
    assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["llama_gqa_tied", "qwen2_qkv_bias"])
def test_llama_cpp_generates_lmkit_greedy_tokens(case, bpe, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")  # pip install 'lmkit[llama]' (compiles llama.cpp)
    family, options = CASES[case]
    model = imported(tmp_path / "hf", bpe, family, **options)
    export_gguf(model, tmp_path / "gguf")
    llm = llama_cpp.Llama(str(tmp_path / "gguf" / "model.gguf"), n_ctx=64, logits_all=True, verbose=False)
    prompt = bpe.encode("ROMEO:\nBut, soft!")
    ours, theirs = greedy_tokens(model, llm, prompt)
    assert theirs == ours


def test_every_mapped_name_is_one_gguf_py_lists_for_its_architecture():
    from lmkit.deploy.gguf import ARCHITECTURES

    for name, arch in ARCHITECTURES.items():
        known = {gguf.TENSOR_NAMES[t].format(bid="N") for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[name.upper()]]}
        for theirs in arch.tensors.values():
            base = theirs.rsplit(".", 1)[0]
            split = [f"blk.N.attn_{p}" for p in "qkv"] if arch.split_qkv and base == "blk.N.attn_qkv" else [base]
            assert set(split) <= known, (name, theirs)
        assert arch.name != "llama" or "rope_freqs" in known


# --- the tokenizer's special tokens and chat template (record.tokens) -----------------------------------------------

def read_field(path, key: str):
    return gguf.GGUFReader(str(path)).fields[key].contents()


@pytest.mark.parametrize("adds_bos", [False, True])
def test_special_tokens_and_chat_template_read_back_as_the_original(adds_bos, tmp_path):
    from tokenizers import Tokenizer, processors

    from tests.helpers import MESSAGES, PROMPT, TEMPLATE, chat_model_folder

    _, tok = chat_model_folder(tmp_path / "hf")
    if adds_bos:  # a post-processor that starts every text with <s>, as Llama 3's starts it with <|begin_of_text|>
        hub = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
        hub.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", hub.token_to_id("<s>"))])
        hub.save(str(tmp_path / "hf" / "tokenizer.json"))
    model = import_hf(tmp_path / "hf")
    export_gguf(model, tmp_path / "gguf")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf")
    assert (back.bos_token, back.eos_token) == (reference.bos_token, reference.eos_token) == ("<s>", "<|im_end|>")
    assert back.chat_template == reference.chat_template == TEMPLATE
    rendered = reference.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert back.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == rendered
    # the chat's special tokens stay whole (CONTROL), and a plain text starts with <s> exactly when lmkit's does
    assert back(rendered, add_special_tokens=False)["input_ids"] == reference(rendered, add_special_tokens=False)[
        "input_ids"]
    assert back(PROMPT)["input_ids"] == model.tokenizer.encode(PROMPT) == reference(PROMPT)["input_ids"]
    assert (model.tokenizer.encode(PROMPT)[0] == tok.tokenizer.token_to_id("<s>")) == adds_bos

    path = tmp_path / "gguf" / "model.gguf"
    ids = {name: tok.tokenizer.token_to_id(name) for name in ("<s>", "<|im_start|>", "<|im_end|>")}
    assert read_field(path, "tokenizer.ggml.bos_token_id") == ids["<s>"]
    assert read_field(path, "tokenizer.ggml.eos_token_id") == ids["<|im_end|>"]
    assert read_field(path, "tokenizer.ggml.add_bos_token") is adds_bos
    assert read_field(path, "tokenizer.chat_template") == TEMPLATE
    assert "tokenizer.ggml.eot_token_id" not in gguf.GGUFReader(str(path)).fields
    types = read_field(path, "tokenizer.ggml.token_type")
    assert [types[i] for i in ids.values()] == [3, 3, 3]  # CONTROL, as llama.cpp's converter marks special tokens
    tokens = read_field(path, "tokenizer.ggml.tokens")  # the embedding's rows past the tokenizer: [PAD<id>], UNUSED
    assert len(tokens) == model.record.backbone.vocab_size > tok.vocab_size
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-1] == 5
    card = (tmp_path / "gguf" / "README.md").read_text()
    assert "- end of text: `<|im_end|>`" in card and "- chat template: the model's own" in card


def test_end_tokens_llama_cpp_cannot_name_by_text_become_eot_and_eom(tmp_path):
    from tests.helpers import chat_model_folder

    _, tok = chat_model_folder(tmp_path / "hf")
    model = import_hf(tmp_path / "hf")
    im_end = tok.tokenizer.token_to_id("<|im_end|>")
    model.record.tokens["eos_token_ids"] = [40, im_end, 41, 42, 43]  # <|im_end|>: llama.cpp stops there by its text
    export_gguf(model, tmp_path / "gguf")
    path = tmp_path / "gguf" / "model.gguf"
    written = [read_field(path, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    assert written == [40, 41, 42]
    assert "other end tokens [43]" in (tmp_path / "gguf" / "README.md").read_text()


# --- hub pre-tokenizers ---------------------------------------------------------------------------------------------

# The hub's tokenizer.json splits (Llama 3, Qwen2.5), as llama.cpp's src/llama-vocab.cpp quotes them
LLAMA3_HUB = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_HUB = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# ...and the regexes llama.cpp runs for each name, one after the other (src/llama-vocab.cpp, llm_tokenizer_bpe)
LLAMA_CPP_REGEXES = {
    "llama-bpe": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "qwen2": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "smollm": [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"],
}
SPLIT_TEXT = ("Hello, WORLD! It's 2024: 12345 apples cost $3.14159 each.\n\n  naïve café — Straße, Ελλάδα, "
              "東京\tDON'T stop   now\r\n x=y+1; ok?? 7 8 99\n")


def hub_pre_tokenizer(name: str):
    """(pre_tokenizer, normalizer, BPE options) of the family llama.cpp calls `name`, as its tokenizer.json has them."""
    from tokenizers import Regex, normalizers, pre_tokenizers as pt

    if name == "smollm":  # SmolLM2: digits one by one, then GPT-2's byte-level split
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]), None, {}
    split = pt.Split(Regex(LLAMA3_HUB if name == "llama-bpe" else QWEN2_HUB), behavior="isolated")
    sequence = pt.Sequence([split, pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if name == "llama-bpe":
        return sequence, None, dict(ignore_merges=True)
    return sequence, normalizers.NFC(), {}  # Qwen2.5 NFC-normalizes


def hub_tokenizer(name: str, **bpe_options):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmkit.data.tokenizer import BPETokenizer

    pre, normalizer, options = hub_pre_tokenizer(name)
    tok = Tokenizer(models.BPE(**{**options, **bpe_options}))
    tok.pre_tokenizer, tok.decoder = pre, decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,  # ~430: every merge the texts allow
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 3, SPLIT_TEXT * 3], trainer=trainer)
    return BPETokenizer(tok)


def transformers_gguf_splits() -> dict:
    """The tokenizer.ggml.pre names transformers' GGUF tokenizer loader rebuilds a split for (others: GPT-2's)."""
    from transformers.integrations.gguf import gguf_tokenizer_mapping

    return getattr(gguf_tokenizer_mapping, "GGUF_PRE_TOKENIZER_SPLITS", {})


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "smollm"])
def test_hub_pre_tokenizers_export_under_llama_cpp_names(name, tmp_path):
    from tokenizers import Regex, pre_tokenizers as pt

    tok = hub_tokenizer(name)
    model = imported(tmp_path / "hf", tok, "llama")
    exported = export_gguf(model, tmp_path / "gguf")
    assert read_field(tmp_path / "gguf" / "model.gguf", "tokenizer.ggml.pre") == name
    assert (name == "qwen2") == any("NFC" in w for w in exported.warnings)
    # llama.cpp's own regexes for the name split the text where the hub's pre-tokenizer does
    llama_cpp = pt.Sequence([pt.Split(Regex(r), behavior="isolated") for r in LLAMA_CPP_REGEXES[name]]
                            + [pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    hub = tok.tokenizer.pre_tokenizer
    assert [p for p, _ in llama_cpp.pre_tokenize_str(SPLIT_TEXT)] == [p for p, _ in hub.pre_tokenize_str(SPLIT_TEXT)]
    if name not in transformers_gguf_splits():
        pytest.skip(f"transformers' GGUF tokenizer loader has no split for tokenizer.ggml.pre={name!r}")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf")
    for text in (SPLIT_TEXT, TEXT):
        ids = tok.encode(text)
        assert back(text, add_special_tokens=False)["input_ids"] == ids
        assert back.decode(ids) == text


@pytest.mark.parametrize("make, fragment", [
    (lambda: hub_tokenizer("llama-bpe", ignore_merges=False), "ignore_merges=False, but llama.cpp's llama-bpe"),
    (lambda: hub_tokenizer("qwen2", ignore_merges=True), "ignore_merges=True, but llama.cpp's qwen2"),
    (lambda: _with_pre_tokenizer("Metaspace"), "this tokenizer splits with Metaspace"),
    (lambda: _with_pre_tokenizer("Split"), r"this tokenizer splits with Split(\p{L}+, Isolated) + ByteLevel(use_regex"),
    (lambda: _with_pre_tokenizer("prefix"), "this tokenizer splits with ByteLevel(add_prefix_space=True)"),
    (lambda: _with_pre_tokenizer("NFKC"), "this tokenizer has a NFKC normalizer"),
    (lambda: _with_pre_tokenizer("post"), "post-processor puts ids [65] after every text"),
])
def test_tokenizers_llama_cpp_cannot_split_are_one_line(make, fragment, tmp_path):
    with pytest.raises(LmkitError) as error:
        export_gguf(lively_bpe_transformer(make(), **LLAMA_BLOCK), tmp_path / "gguf")
    assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not list(tmp_path.iterdir())


def _with_pre_tokenizer(kind: str):
    from tokenizers import Regex, normalizers, pre_tokenizers as pt, processors

    tok = hub_tokenizer("smollm")
    if kind == "NFKC":
        tok.tokenizer.normalizer = normalizers.NFKC()
    elif kind == "post":  # ends every text with "b", which is no end token of this model (it states none)
        tok.tokenizer.post_processor = processors.TemplateProcessing(single="$A b", special_tokens=[("b", 65)])
    else:
        tok.tokenizer.pre_tokenizer = {
            "Metaspace": pt.Metaspace(),
            "Split": pt.Sequence([pt.Split(Regex(r"\p{L}+"), behavior="isolated"),
                                  pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
            "prefix": pt.ByteLevel(add_prefix_space=True)}[kind]
    return tok
