"""Export, load, generate and GPT-2 interop, checked against the real `transformers` implementation."""

import json
import subprocess
import sys

import pytest
import torch

import lmkit
from lmkit.data.tokenizer import BPETokenizer
from lmkit.errors import LmkitError
from lmkit.export import save
from lmkit.generate import generate, sample_next
from lmkit.hf import export_hf, import_hf
from tests.helpers import CHARS, decode_by_hand, lively, tiny_lm

transformers = pytest.importorskip("transformers")

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
    # The tokens transformers' own decoding loop picks, greedy and sampled: its sampling draws with
    # torch.multinomial from the global generator, so seeding that as lmkit seeds its own gives the same draws.
    prompt = torch.tensor([tok.encode("to be")])
    for seed in (None, 0, 1):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            reference = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                                    do_sample=seed is not None, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0)
        assert reference.shape == (1, prompt.shape[1] + 20)
        temperature = 0 if seed is None else 1.0  # (greedy soon repeats one token on random weights; sampling not)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        assert torch.equal(generate(model.backbone, prompt, max_new_tokens=20, temperature=temperature,
                                    generator=generator), reference), seed
        text = model.generate("to be", max_new_tokens=20, temperature=temperature, seed=seed)
        assert text == tok.decode(reference[0].tolist()), seed


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
    assert result.stdout == model.generate("ROMEO:", max_new_tokens=10, seed=1) + "\n"  # the same text, same seed


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
    model = lively(tiny_lm("transformer", max_seq_len=16, n_layer=3), std=0.5)
    text = model.generate("AB", max_new_tokens=40, temperature=1.0, seed=0)
    # token by token what full forward passes over the documented context (re-primed with its latest three
    # quarters when full) draw from the same seed: the cache is exact across re-primes, positions included
    assert text == decode_by_hand(model, "AB", 40, seed=0)
    assert len(text) == 42 and set(text) <= set(CHARS)


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_sampling_draws_each_token_from_the_model_with_the_seeded_generator(kind):
    model = lively(tiny_lm(kind))
    for temperature in (1.0, 0.7):
        text = model.generate("ROMEO:", max_new_tokens=20, temperature=temperature, seed=3)
        assert text == decode_by_hand(model, "ROMEO:", 20, seed=3, temperature=temperature), temperature
    assert model.generate("ROMEO:", max_new_tokens=20, temperature=0) == decode_by_hand(model, "ROMEO:", 20)


def test_same_seed_same_samples_and_num_samples():
    model = tiny_lm()
    a = model.generate("ROMEO:", max_new_tokens=20, temperature=1.0, num_samples=3, seed=7)
    b = model.generate("ROMEO:", max_new_tokens=20, temperature=1.0, num_samples=3, seed=7)
    assert a == b and len(a) == 3 and len(set(a)) > 1
    assert all(t.startswith("ROMEO:") and len(t) == 26 and set(t) <= set(CHARS) for t in a)
    other = model.generate("ROMEO:", max_new_tokens=20, temperature=1.0, num_samples=3, seed=8)
    assert all(x != y for x, y in zip(a, other))  # another seed, other text


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
    for bad, message in ((dict(top_k=0), "top_k=0 must be at least 1"), (dict(top_p=0.0), r"top_p=0.0 in \(0, 1\]"),
                         (dict(top_p=1.5), r"top_p=1.5 in \(0, 1\]"), (dict(num_samples=0), "num_samples=0"),
                         (dict(temperature=-1.0), "temperature=-1.0 must not be negative")):
        with pytest.raises(LmkitError, match=message):
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
