import dataclasses
import math
import re
import subprocess
import sys

import pytest
import torch

import lmkit.backbones.lstm as lstm_backbone
from lmkit.backbones import LSTM, LSTMConfig, Transformer, TransformerConfig, backbone_config
from lmkit.backbones.transformer import sinusoidal_table
from lmkit.generate import generate

V = 50


def transformer(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=16, max_seq_len=32, **kw)).eval()


LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=24, n_kv_head=1, bias=False)


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "llama"])
def test_kv_cache_matches_full_forward(position):
    model = transformer(**LLAMA) if position == "llama" else transformer(position=position)
    ids = torch.randint(0, V, (3, 20))
    full, _ = model(ids)
    state = model.init_state(3)
    prefix, state = model(ids[:, :7], state)  # prefill, then one token at a time
    steps = [prefix] + [model(ids[:, t:t + 1], state)[0] for t in range(7, 20)]
    assert state.pos == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope"])
def test_attention_is_causal(position):
    model = transformer(position=position)
    ids = torch.randint(0, V, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % V
    torch.testing.assert_close(model(ids)[0][:, :10], model(changed)[0][:, :10])
    assert not torch.allclose(model(ids)[0][:, 10:], model(changed)[0][:, 10:])


def test_chunked_prefill_after_cache_matches_full():
    model = transformer(position="rope")
    ids = torch.randint(0, V, (2, 24))
    state = model.init_state(2)
    a, state = model(ids[:, :10], state)
    b, state = model(ids[:, 10:], state)  # a multi-token chunk attending to a filled cache
    torch.testing.assert_close(torch.cat([a, b], 1), model(ids)[0], atol=1e-5, rtol=1e-5)


def lstm(cell: str = "lstm") -> LSTM:
    torch.manual_seed(0)
    return LSTM(LSTMConfig(vocab_size=V, n_layer=2, n_embd=16, cell=cell)).eval()


@pytest.mark.parametrize("make", [lambda: transformer(position="learned"), lambda: transformer(position="rope"),
                                  lambda: transformer(position="sinusoidal"), lambda: transformer(**LLAMA), lstm,
                                  lambda: lstm("gru")],
                         ids=["learned", "rope", "sinusoidal", "llama", "lstm", "gru"])
def test_stacked_rows_of_different_lengths_decode_as_if_alone(make):
    """Rows prefilled apart (as a server batches requests) decode together, each as it would alone; finished
    rows leave the batch and a new one joins mid-flight."""
    model = make()
    a, b, c, d = (torch.randint(0, V, (1, n)) for n in (3, 9, 5, 12))

    def decode(logits: torch.Tensor, state, steps: int):  # greedy; logits (B, V) of each row's last token
        seen = []  # the logits each step decodes from, compared, not just their argmax
        for _ in range(steps):
            seen.append(logits)
            logits, state = model(logits.argmax(-1, keepdim=True), state)
            logits = logits[:, -1]
        return torch.stack(seen, 1), logits, state

    def prefill(ids: torch.Tensor):
        logits, state = model(ids, model.init_state(1))
        return logits[:, -1], state

    def alone(ids: torch.Tensor, steps: int) -> torch.Tensor:
        return decode(*prefill(ids), steps)[0][0]

    rows = [prefill(x) for x in (a, b, c)]
    first, logits, state = decode(torch.cat([lg for lg, _ in rows]), model.stack_states([s for _, s in rows]), 4)
    for row, x in enumerate((a, b, c)):
        torch.testing.assert_close(first[row], alone(x, 4), atol=1e-5, rtol=1e-5)
    late_logits, late = prefill(d)
    state = model.stack_states([model.select_states(state, [1, 2]), late])  # a leaves, d joins
    second, _, _ = decode(torch.cat([logits[1:], late_logits]), state, 4)
    torch.testing.assert_close(second[0], alone(b, 8)[4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second[1], alone(c, 8)[4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second[2], alone(d, 4), atol=1e-5, rtol=1e-5)


def test_gpt2_layout_tied_embeddings_and_scaled_init():
    model = Transformer(TransformerConfig(vocab_size=V, n_layer=8, n_head=4, n_embd=64, max_seq_len=32))
    keys = set(model.state_dict())
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                 "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                 "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight",
                 "transformer.h.0.mlp.c_proj.bias", "transformer.ln_f.bias", "lm_head.weight"):
        assert name in keys
    assert model.lm_head.weight is model.transformer.wte.weight
    proj = torch.cat([b.mlp.c_proj.weight.flatten() for b in model.transformer.h])
    other = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.h])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert other.std().item() == pytest.approx(0.02, rel=0.05)


def test_sinusoidal_table_is_the_classic_formula():
    table = sinusoidal_table(50, 8)
    pos, i = 37, 2
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)), abs=1e-5)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 8)), abs=1e-5)


def test_transformer_refuses_sequences_beyond_its_context():
    with pytest.raises(ValueError, match="max_seq_len=32"):
        transformer()(torch.zeros(1, 33, dtype=torch.long))


def test_bias_free_and_untied_options():
    model = transformer(bias=False, tie_weights=False, gelu="tanh")
    assert model.transformer.h[0].attn.c_attn.bias is None and model.transformer.ln_f.bias is None
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model(torch.zeros(1, 4, dtype=torch.long))[0].shape == (1, 4, V)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("hidden", [None, 24])
def test_recurrent_state_carries_between_calls(cell, hidden):
    torch.manual_seed(0)
    model = LSTM(LSTMConfig(vocab_size=V, n_layer=2, n_embd=16, hidden_size=hidden, cell=cell)).eval()
    ids = torch.randint(0, V, (2, 12))
    full, _ = model(ids)
    a, state = model(ids[:, :5])
    b, _ = model(ids[:, 5:], state)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)
    assert model.head.weight is model.embedding.weight  # tied, through a projection when widths differ
    assert (model.proj is not None) == (hidden is not None)


def onednn_seen(model: LSTM) -> list[bool]:
    """torch.backends.mkldnn.enabled as each call of `model.rnn` found it (what its kernel choice reads)."""
    seen: list[bool] = []
    model.rnn.register_forward_pre_hook(lambda *_: seen.append(torch.backends.mkldnn.enabled))
    return seen


def prefill_and_steps(model: LSTM, ids: torch.Tensor, prompt: int = 6) -> torch.Tensor:
    """Logits of a prefill of `prompt` tokens, then one-token steps over the rest of `ids`."""
    logits, state = model(ids[:, :prompt])
    out = [logits]
    for t in range(prompt, ids.size(1)):
        logits, state = model(ids[:, t:t + 1], state)
        out.append(logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("batch", [1, 64])
def test_lstm_inference_skips_onednn_on_small_steps_with_the_same_logits(batch, monkeypatch):
    """Eval-mode one-token steps up to ONEDNN_OFF_MAX_BATCH rows run torch's own kernel (bench/README.md,
    lstm_cpu); their logits are oneDNN's to float rounding, at batch 1 and at a batch forced onto that path."""
    torch.manual_seed(0)
    model = LSTM(LSTMConfig(vocab_size=V, n_layer=2, n_embd=32)).eval()
    ids = torch.randint(0, V, (batch, 10))
    seen = onednn_seen(model)
    with torch.no_grad():
        if batch > lstm_backbone.ONEDNN_OFF_MAX_BATCH:
            assert not model.skips_onednn(model.embedding(ids[:, :1]))  # by default a large batch keeps oneDNN
            monkeypatch.setattr(lstm_backbone, "ONEDNN_OFF_MAX_BATCH", batch)
        fast = prefill_and_steps(model, ids)
        assert seen == [True] + [False] * 4  # the prefill keeps oneDNN, each step skips it
        assert torch.backends.mkldnn.enabled  # and turns it back on
        monkeypatch.setattr(lstm_backbone, "ONEDNN_OFF_MAX_BATCH", 0)  # the path before: oneDNN for every call
        before = prefill_and_steps(model, ids)
        assert seen[5:] == [True] * 5
    torch.testing.assert_close(fast, before, atol=1e-5, rtol=0)


def test_lstm_training_keeps_onednn_and_a_user_choice_stands():
    torch.manual_seed(0)
    model = LSTM(LSTMConfig(vocab_size=V, n_layer=1, n_embd=16)).train()
    seen = onednn_seen(model)
    first, state = model(torch.randint(0, V, (1, 1)))
    second, state = model(torch.randint(0, V, (1, 1)), state)
    (first.sum() + second.sum()).backward()  # one-token calls at batch 1 in training: oneDNN's path, gradients flow
    assert seen == [True, True] and model.rnn.weight_hh_l0.grad.abs().sum() > 0
    model.eval()
    torch.backends.mkldnn.enabled = False  # a user who turned oneDNN off keeps it off
    try:
        with torch.no_grad():
            model(torch.randint(0, V, (1, 1)), state)
        assert seen == [True, True, False] and not torch.backends.mkldnn.enabled
    finally:
        torch.backends.mkldnn.enabled = True


def test_lstm_greedy_text_is_the_same_on_either_path(monkeypatch):
    torch.manual_seed(0)
    model = LSTM(LSTMConfig(vocab_size=V, n_layer=1, n_embd=32)).eval()
    with torch.no_grad():  # lively weights: at the default init greedy decoding soon repeats one token
        for p in model.parameters():
            p.normal_(0, 0.5)
    prompt = torch.randint(0, V, (1, 5))
    fast = generate(model, prompt, max_new_tokens=24, temperature=0)
    monkeypatch.setattr(lstm_backbone, "ONEDNN_OFF_MAX_BATCH", 0)
    assert torch.equal(fast, generate(model, prompt, max_new_tokens=24, temperature=0))
    assert len(set(fast[0, 5:].tolist())) > 3  # a text, not one token repeated


def test_backbone_config_names_unknown_options():
    with pytest.raises(ValueError, match="n_head"):
        backbone_config("lstm", vocab_size=V, n_head=4)
    with pytest.raises(ValueError, match="kind='mamba'"):
        backbone_config("mamba", vocab_size=V)
    with pytest.raises(ValueError, match="not divisible"):
        backbone_config("transformer", vocab_size=V, n_embd=30, n_head=4)


def test_backbones_artifacts_deploy_and_serve_import_no_training_stack():
    """DESIGN's boundaries: what builds, loads, exports and serves a model needs neither Lightning nor Hydra."""
    modules = ["lmkit.backbones", "lmkit.export", "lmkit.inference", "lmkit.hf", "lmkit.deploy.gguf",
               "lmkit.deploy.onnx", "lmkit.serve.settings", "lmkit.serve.worker", "lmkit.serve.http",
               "lmkit.serve.server"]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ImportError as e:  # (an optional runtime this machine lacks: litserve, onnx)\n"
            "        print('skipped', name, e)\n"
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf') if m in sys.modules]\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_padded_vocabulary_stays_inside_the_model():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=16, max_seq_len=16, pad_vocab_to=64))
    assert model.transformer.wte.weight.shape == (64, 16) and model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, V, (2, 8))
    logits, _ = model(ids)
    assert logits.shape == (2, 8, V)
    state = model.init_state(2)
    steps = [model(ids[:, t:t + 1], state)[0] for t in range(8)]
    torch.testing.assert_close(torch.cat(steps, 1), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [
    TransformerConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=16, max_seq_len=32),
    TransformerConfig(vocab_size=V, n_layer=3, n_head=4, n_embd=32, max_seq_len=8, bias=False, tie_weights=False,
                      position="rope", pad_vocab_to=64, mlp_ratio=2),
    TransformerConfig(vocab_size=V, n_layer=2, n_head=4, n_embd=32, position="sinusoidal", layer_heads=[1, 3],
                      layer_ffn=[8, 40]),
    TransformerConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=12, position="rope",
                      norm="rmsnorm", mlp="swiglu", mlp_hidden=40, bias=False, tie_weights=False),
    TransformerConfig(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, norm="rmsnorm", bias=False,
                      qkv_bias=True, mlp="swiglu", layer_heads=[4, 2], layer_ffn=[8, 16]),
    TransformerConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=16, bias=True, qkv_bias=False, mlp_hidden=20),
    LSTMConfig(vocab_size=V, n_layer=2, n_embd=16),
    LSTMConfig(vocab_size=V, n_layer=3, n_embd=16, hidden_size=24, cell="gru"),
    LSTMConfig(vocab_size=V, n_layer=1, n_embd=16, hidden_size=8, tie_weights=False),
], ids=lambda c: f"{c.kind}")
def test_num_parameters_is_what_the_build_has(config):
    from lmkit.backbones import build_backbone

    assert config.num_parameters() == sum(p.numel() for p in build_backbone(config).parameters())


def test_grouped_query_attention_shares_each_kv_head_with_its_group():
    """With n_kv_head=n_head and each kv head copied to its query heads, GQA is plain attention: kv head j serves
    query heads j*g .. j*g+g-1."""
    torch.manual_seed(0)
    gqa = Transformer(TransformerConfig(vocab_size=V, n_layer=2, n_head=4, n_embd=16, max_seq_len=32,
                                        **LLAMA)).eval()  # 4 query heads of 4 over 1 kv head: g=4
    full = Transformer(dataclasses.replace(gqa.config, n_kv_head=None)).eval()
    state = gqa.state_dict()
    for i in range(2):
        name = f"transformer.h.{i}.attn.c_attn.weight"
        q, k, v = state[name].split([16, 4, 4])
        state[name] = torch.cat([q, k.repeat(4, 1), v.repeat(4, 1)])
    full.load_state_dict(state)
    ids = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(gqa(ids)[0], full(ids)[0], atol=1e-5, rtol=1e-5)


def test_rms_norm_is_llamas_in_fp32_then_the_gain():
    """The reference is transformers' LlamaRMSNorm: normalised in fp32, cast back, then the gain (in bf16 too)."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from lmkit.backbones.transformer import RMSNorm

    ours, theirs = RMSNorm(8, eps=1e-5), llama.LlamaRMSNorm(8, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.arange(8.0))
        theirs.weight.copy_(torch.arange(8.0))
    x = torch.randn(3, 8) * 30
    for weights, inputs in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16),  # (bf16-mixed)
                            (torch.bfloat16, torch.bfloat16)):
        ours, theirs = ours.to(weights), theirs.to(weights)
        torch.testing.assert_close(ours(x.to(inputs)), theirs(x.to(inputs)), atol=0, rtol=0)
    assert not any(name.endswith("bias") for name, _ in transformer(**LLAMA).named_parameters())


@pytest.mark.parametrize("options,message", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}, position="rope"), "rope_type='yarn' is not implemented"),
    (dict(rope_scaling={"type": "llama3", "factor": 8.0}, position="rope"), "needs a number for low_freq_factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "needs rope"),
    (dict(n_kv_head=3), "not divisible by model.n_kv_head=3"),
    (dict(norm="layer"), "model.norm='layer'"),
    (dict(mlp="relu"), "model.mlp='relu'"),
    (dict(n_kv_head=1, layer_heads=[1, 1]), "whole groups of 2"),
])
def test_llama_options_refuse_bad_values_in_one_line(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        backbone_config("transformer", vocab_size=V, n_layer=2, n_head=2, n_embd=16, **options)


def test_rope_scaling_reads_hf_older_type_key_and_scales_long_wavelengths():
    from lmkit.backbones.transformer import rope_frequencies

    cfg = TransformerConfig(vocab_size=V, n_embd=16, n_head=2, position="rope",
                            rope_scaling={"type": "linear", "factor": 4.0})
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    plain = rope_frequencies(8, 10000.0)
    torch.testing.assert_close(rope_frequencies(8, 10000.0, cfg.rope_scaling), plain / 4)
    llama3 = rope_frequencies(8, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    # wavelengths 2*pi (under 64/4: kept), ~6283 (over 64/1: slowed 8x); those between are interpolated
    assert llama3[0] == plain[0] and llama3[-1] == plain[-1] / 8  # short wavelengths kept, long ones slowed
