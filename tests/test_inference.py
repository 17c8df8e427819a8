"""Export, load, generate and GPT-2 interop, checked against the real `transformers` implementation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmkit
from lmkit.backbones import backbone_config, build_backbone
from lmkit.record import ModelRecord
from lmkit.data.tokenizer import BPETokenizer, CharTokenizer
from lmkit.errors import LmkitError
from lmkit.export import save
from lmkit.generate import generate, sample_next
from lmkit.hf import export_hf, import_hf
from lmkit.inference import InferenceModel

transformers = pytest.importorskip("transformers")

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def tiny_lm(kind: str = "transformer", **options) -> InferenceModel:
    torch.manual_seed(0)
    defaults = dict(n_layer=2, n_head=2, n_embd=16, max_seq_len=32) if kind == "transformer" else dict(n_layer=2, n_embd=16)
    record = ModelRecord(backbone=backbone_config(kind, len(CHARS), **{**defaults, **options}), tokenizer="char")
    return InferenceModel(build_backbone(record.backbone).eval(), CharTokenizer(CHARS), record)


def random_gpt2(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=97, seed=0):
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, vocab_size=vocab_size))
    with torch.no_grad():  # every tensor random, biases and LayerNorm gains included: default init hides bugs
        for p in hf.parameters():
            p.normal_(0, 0.3)
    return hf.eval()


@pytest.mark.parametrize("shape", [dict(), dict(n_layer=3, n_head=4, n_embd=64, vocab_size=211),
                                   dict(n_layer=1, n_head=1, n_embd=8, n_positions=16)])
@pytest.mark.parametrize("safe", [True, False])
def test_gpt2_import_matches_transformers(shape, safe, tmp_path):
    hf = random_gpt2(**shape)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=safe)
    model = import_hf(tmp_path / "hf")
    ids = torch.randint(0, hf.config.vocab_size, (2, min(20, hf.config.n_positions)))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    assert model.backbone.lm_head.weight is model.backbone.transformer.wte.weight


def test_hf_export_round_trips_exactly(tmp_path):
    hf = random_gpt2(n_layer=2, n_head=4, n_embd=32)
    hf.save_pretrained(tmp_path / "hf")
    model = import_hf(tmp_path / "hf")
    export_hf(model, tmp_path / "back")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    for name, tensor in hf.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, atol=0, rtol=0)
    reimported = import_hf(tmp_path / "back")
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(reimported.backbone.state_dict()[name], tensor), name


def test_gpt2_tokenizer_beside_the_checkpoint_is_used(tmp_path):
    hf = random_gpt2(vocab_size=300)
    hf.save_pretrained(tmp_path / "hf")
    tok = BPETokenizer.train(["to be or not to be, that is the question\n" * 40], vocab_size=300)
    tok.tokenizer.model.save(str(tmp_path / "hf"))  # vocab.json + merges.txt, as GPT-2 ships them
    model = import_hf(tmp_path / "hf")
    assert model.tokenizer.encode("to be or not") == tok.encode("to be or not")
    assert model.generate("to be", max_new_tokens=5, seed=0).startswith("to be")


def test_import_without_tokenizer_keeps_ids_and_says_what_is_missing(tmp_path):
    random_gpt2().save_pretrained(tmp_path / "hf")
    save(import_hf(tmp_path / "hf"), tmp_path / "art")
    model = lmkit.load(tmp_path / "art")
    assert json.loads((tmp_path / "art" / "config.json").read_text())["tokenizer"] is None
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 97)
    with pytest.raises(LmkitError, match="no tokenizer.*model.tokenizer ="):
        model.generate("hello")


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_artifact_reloads_bit_exact_without_lightning_or_hydra(kind, tmp_path):
    model = tiny_lm(kind)
    save(model, tmp_path / "art")
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                                    "tokenizer.json"]
    ids = torch.randint(0, len(CHARS), (2, 12))
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(model(ids).detach(), tmp_path / "logits.pt")
    code = f"""
import sys, torch, lmkit
model = lmkit.load({str(tmp_path / 'art')!r})
ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
expected = torch.load({str(tmp_path / 'logits.pt')!r}, weights_only=True)
assert torch.equal(model(ids), expected)
loaded = [m for m in ("lightning", "pytorch_lightning", "hydra", "omegaconf") if m in sys.modules]
assert not loaded, loaded
print(model.generate("ROMEO:", max_new_tokens=10, seed=1))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ROMEO:")


def test_export_dtype_and_overwrite_rules(tmp_path):
    model = tiny_lm()
    save(model, tmp_path / "bf16", dtype="bf16")
    loaded = lmkit.load(tmp_path / "bf16")
    assert loaded.backbone.lm_head.weight.dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left alone
    assert lmkit.load(tmp_path / "bf16", dtype="fp32").backbone.lm_head.weight.dtype == torch.float32
    with pytest.raises(LmkitError, match="not empty.*overwrite=true"):
        save(model, tmp_path / "bf16")
    save(model, tmp_path / "bf16", overwrite=True)
    assert lmkit.load(tmp_path / "bf16").backbone.lm_head.weight.dtype == torch.float32
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_greedy_generation_is_the_same_with_and_without_cache(kind):
    model = tiny_lm(kind)
    ids = torch.randint(0, len(CHARS), (3, 5))
    cached = generate(model.backbone, ids, max_new_tokens=20, temperature=0)
    uncached = generate(model.backbone, ids, max_new_tokens=20, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_generation_slides_past_a_learned_context():
    model = tiny_lm("transformer", max_seq_len=16)
    text = model.generate("AB", max_new_tokens=40, seed=0)
    assert len(text) == 42


def test_same_seed_same_samples_and_num_samples():
    model = tiny_lm()
    a = model.generate("ROMEO:", max_new_tokens=20, temperature=1.0, num_samples=3, seed=7)
    b = model.generate("ROMEO:", max_new_tokens=20, temperature=1.0, num_samples=3, seed=7)
    assert a == b and len(a) == 3 and len(set(a)) > 1


def test_top_k_and_top_p_never_sample_outside_their_sets():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    gen = torch.Generator().manual_seed(0)
    topk = set(torch.topk(logits, 5).indices.flatten().tolist())
    for _ in range(200):
        for row, tok in enumerate(sample_next(logits, temperature=1.0, top_k=5, generator=gen).flatten().tolist()):
            assert tok in torch.topk(logits[row], 5).indices.tolist() and tok in topk
    probs = logits.softmax(-1)
    for _ in range(200):
        for row, tok in enumerate(sample_next(logits, temperature=1.0, top_p=0.5, generator=gen).flatten().tolist()):
            order = probs[row].argsort(descending=True)
            mass_before = probs[row][order[:(order == tok).nonzero().item()]].sum().item()
            assert mass_before < 0.5  # the token is inside the smallest set covering top_p


def test_sampling_settings_out_of_range_are_refused():
    model = tiny_lm()
    for bad in (dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(num_samples=0)):
        with pytest.raises(LmkitError):
            model.generate("AB", max_new_tokens=2, **bad)


def test_prompt_with_unknown_characters():
    model = tiny_lm()
    with pytest.raises(LmkitError, match="'é€'"):
        model.generate("café €", max_new_tokens=2)
    assert model.clean_prompt("café €", "skip") == "caf "


def test_hf_export_of_a_padded_vocabulary_drops_the_padding(tmp_path):
    model = tiny_lm("transformer", pad_vocab_to=64)
    assert model.backbone.transformer.wte.weight.shape[0] == 64
    export_hf(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, len(CHARS), (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
