"""LoRA and QLoRA fine-tuning (`finetune=lora`): adapters on a frozen base, checkpoints of adapters alone that resume
exactly and load on their base, and merges into dense models equal to the adapted ones."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest
import torch

import lmkit
from lmkit.backbones import build_backbone
from lmkit.checkpoint import read_checkpoint
from lmkit.errors import LmkitError
from lmkit.export import save
from lmkit.inference import InferenceModel
from lmkit.lora import (LoRALinear, LoRASettings, TrainableTokens, adapt, merged, quantize_base,
                        quantized_base, token_ids)
from lmkit.record import ModelRecord
from lmkit.train import run
from tests.helpers import FINETUNE, HALF, LORA_LLAMA, decode_by_hand, finetune, finetune_here, logged

pytestmark = pytest.mark.slow

EVERY_TARGET = LoRASettings(r=4, targets=("q", "k", "v", "o", "mlp", "head"), dropout=0.0)


IDS = torch.randint(0, 60, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("base", ["float", "int4", "int8"])
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_an_adapted_model_starts_as_its_base_and_merges_into_the_dense_model_it_computes(bases, family, base):
    model = lmkit.load(bases[family])
    if base != "float":
        quantize_base(model, base)
    torch.manual_seed(0)  # (the adapters' A and the B drawn below: the bounds below are for this draw)
    with torch.no_grad():
        before = model(IDS)
        embedding = model.backbone.transformer.wte(torch.arange(model.record.backbone.vocab_size))
        adapt(model.backbone, EVERY_TARGET)
        torch.testing.assert_close(model(IDS), before, atol=0, rtol=0)  # B starts at zero
        adapters = [m for m in model.backbone.modules() if isinstance(m, LoRALinear)]
        per_layer = 2 + (3 if family == "llama" else 2)  # attention 2, MLP 2 (GELU) or 3 (SwiGLU)
        assert len(adapters) == per_layer * model.record.backbone.n_layer + 1  # and the head
        assert set(adapters[0].lora_a) == {"q", "k", "v"}  # each of the fused projection's parts has its own pair
        for b in (b for m in adapters for b in m.lora_b.values()):
            b.normal_(0, 0.2)
        adapted = model(IDS)
        assert (adapted - before).abs().max() > 0.1
        dense = merged(model)
        if base == "int8":  # LLM.int8 also rounds the activations, which a dense merge no longer does: a few
            # logits move by up to 0.04, the rest by its rounding alone (max / mean over the draws of seeds 0-3:
            # gpt 0.008-0.016 / 0.0011-0.0018, llama 0.007-0.037 / 0.0007-0.0014; seed 0 is the first of each)
            error = (dense(IDS) - adapted).abs()
            assert error.max() < 0.05 and error.mean() < 2e-3, (error.max(), error.mean())
        else:  # bitsandbytes' 4-bit matmul sums in another order than a dense one (up to 2.6e-5 seen)
            tolerance = 1e-4 if base == "int4" else 1e-5
            torch.testing.assert_close(dense(IDS), adapted, atol=tolerance, rtol=tolerance)
    assert not any(isinstance(m, LoRALinear) for m in dense.backbone.modules())
    assert all(p.dtype == torch.float32 for p in dense.backbone.parameters())  # dequantized, not re-quantized
    # the head's adapter unties a tied head rather than move the embedding with it: the embedding is the base's
    assert dense.record.backbone.tie_weights is False if model.record.backbone.tie_weights else True
    with torch.no_grad():  # (every row looked up: a quantized base's embedding dequantizes as it does)
        merged_embedding = dense.backbone.transformer.wte(torch.arange(model.record.backbone.vocab_size))
    torch.testing.assert_close(merged_embedding, embedding, atol=0, rtol=0)
    assert (dense.backbone.lm_head.weight[:len(embedding)] - embedding).abs().max() > 0.01  # while the head moved


def test_a_4bit_base_passes_gradients_without_keeping_a_float_weight(bases):
    model = lmkit.load(bases["llama"])
    quantize_base(model, "int4")
    layer = model.backbone.transformer.h[0].mlp.up
    x = torch.randn(3, layer.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert not any(t.shape == (layer.out_features, layer.in_features) for t in saved)  # QLoRA's memory
    y.square().sum().backward()
    reference = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(reference, layer.quantized.dequantize()).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)


def test_a_lora_run_trains_the_adapters_alone_and_its_checkpoint_loads_on_its_base(bases, make_cfg, tmp_path, caplog):
    caplog.set_level("INFO", logger="lmkit")
    metrics, objects = run(make_cfg(*FINETUNE, f"init_from={bases['llama']}", "trainer.max_steps=3"))
    assert any("parameters train" in r.message and "LoRA (r=8 on q,k,v,o,mlp)" in r.message for r in caplog.records)
    base = lmkit.load(bases["llama"]).backbone.state_dict()
    trained_state = objects["module"].backbone.state_dict()
    for name, tensor in base.items():  # the base is frozen (its tensors sit under `.base.` once wrapped)
        wrapped = name.replace("c_attn.", "c_attn.base.").replace("c_proj.", "c_proj.base.")
        for part in ("gate.", "up."):
            wrapped = wrapped.replace(f"mlp.{part}", f"mlp.{part}base.")
        assert torch.equal(trained_state[wrapped], tensor), name
    checkpoint = read_checkpoint(metrics["last_ckpt"])
    assert checkpoint["state_dict"] and all(".lora_" in k for k in checkpoint["state_dict"])
    assert any(v.abs().sum() > 0 for k, v in checkpoint["state_dict"].items() if ".lora_b." in k)  # they trained
    assert checkpoint["lmkit"]["lora_base"]["path"] == str(bases["llama"].resolve())

    loaded = lmkit.load(metrics["last_ckpt"])  # base plus adapters, unmerged
    assert any(isinstance(m, LoRALinear) for m in loaded.backbone.modules())
    module = objects["module"].cpu().eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), module(IDS), atol=1e-6, rtol=1e-6)
        save(loaded, tmp_path / "merged")  # what `lmkit export model=<checkpoint>` writes: the merge
        torch.testing.assert_close(lmkit.load(tmp_path / "merged")(IDS), module(IDS), atol=1e-5, rtol=1e-5)
    assert loaded.generate("ROMEO:", max_new_tokens=10, temperature=0) == \
        lmkit.load(tmp_path / "merged").generate("ROMEO:", max_new_tokens=10, temperature=0)


def test_a_lora_run_resumes_exactly(bases, make_cfg, tmp_path):
    common = [*FINETUNE, f"init_from={bases['gpt']}"]
    run(make_cfg(*common, "trainer.max_steps=6", output_dir=tmp_path / "straight"))
    run(make_cfg(*common, "trainer.max_steps=3", output_dir=tmp_path / "resumed"))
    run(make_cfg(*common, "trainer.max_steps=6", "resume=true", output_dir=tmp_path / "resumed"))
    straight, resumed = (read_checkpoint(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("straight", "resumed"))
    assert resumed["global_step"] == straight["global_step"] == 6 and straight["state_dict"]
    for name, tensor in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_qlora_trains_on_an_int4_base_and_compresses_after(bases, make_cfg, caplog):
    caplog.set_level("INFO", logger="lmkit")
    metrics, objects = run(make_cfg(*FINETUNE, f"init_from={bases['llama']}", "finetune.base=int4",
                                    "trainer.max_steps=3", "compression=int4"))
    line = next(r.message for r in caplog.records if "int4 base" in r.message)
    # of the whole base (its 4-bit weights are buffers): about 30% for this tiny model, not 98% as of its norms
    assert float(re.search(r"\(([\d.]+)%\)", line).group(1)) < 50, line
    assert type(objects["module"].backbone.transformer.h[0].attn.c_attn.base).__name__ == "Int4Linear"
    loaded = lmkit.load(metrics["last_ckpt"])  # the base quantized again, as in training
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), objects["module"].cpu().eval()(IDS), atol=1e-5, rtol=1e-5)
    exported = lmkit.load(metrics["export_dir"])  # merged (dequantized + B @ A), then int4 by the recipe
    assert [r["plugin"] for r in exported.record.compression] == ["int4"]
    # its greedy text is what the decoding loop written out gives, and it is the trained model, rounded to int4
    assert exported.generate("ROMEO:", max_new_tokens=5, temperature=0) == decode_by_hand(exported, "ROMEO:", 5)
    with torch.no_grad():
        trained = objects["module"](IDS)
        error = float((exported(IDS) - trained).norm() / trained.norm())
    assert error < 0.06, error  # measured 0.034 (norm-relative); a model other than the trained one is ~1


@pytest.mark.parametrize("overrides, message", [
    (["finetune=lora"], "finetune=lora trains adapters on a pretrained model: give init_from=PATH"),
    (["finetune=lora", "finetune.r=0", "init_from=X"], "finetune.r=0 must be an integer of at least 1"),
    (["finetune=lora", "finetune.targets=[q,attn]", "init_from=X"], "finetune.targets=['q', 'attn']: each must be"),
    (["finetune=lora", "finetune.alpha=0", "init_from=X"], "finetune.alpha=0 must be a positive number"),
    (["finetune=lora", "finetune.base=int2", "init_from=X"], "finetune.base='int2' is not one of"),
    (["finetune=lora", "init_from=X", "compression=prune", "compression.prune.during_training=true",
      "compression.prune.criterion=magnitude"], "compression.prune works during training, which finetune=lora"),
    (["finetune=lora", "init_from=LSTM"], "finetune=lora adapts a Transformer's projections; this model is "
                                          "model.kind=lstm"),
    (["finetune=lora", "init_from=X", "finetune.trainable_tokens=[e,Zz]"],
     "finetune.trainable_tokens: 'Zz' is not a token of this model's tokenizer (it encodes to 2 tokens)"),
    (["finetune=lora", "init_from=X", "finetune.trainable_tokens=[9999]"],
     "finetune.trainable_tokens: id 9999 is outside this model's vocabulary"),
    (["finetune=lora", "init_from=LSTM", "finetune.train_embeddings=true"],
     "finetune.train_embeddings=true is part of finetune=lora, which adapts a Transformer; this model is "
     "model.kind=lstm"),
    (["finetune=lora", "init_from=X", "finetune.train_embeddings=true", "finetune.trainable_tokens=[e]"],
     "finetune.train_embeddings=true trains every row of the embedding, and finetune.trainable_tokens names some"),
    (["finetune=full", "init_from=X", "+finetune.train_embeddings=true"],
     "finetune.train_embeddings is a finetune=lora setting; finetune=full trains every weight"),
    (["finetune=lora", "init_from=X", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
      "finetune.trainable_tokens=[e]"], "finetune.trainable_tokens under trainer=fsdp"),
])
def test_bad_lora_settings_are_one_line(bases, make_cfg, overrides, message):
    overrides = [o.replace("LSTM", str(bases["lstm"])).replace("=X", f"={bases['gpt']}") for o in overrides]
    with pytest.raises(LmkitError, match="^" + re.escape(message)):
        run(make_cfg(*FINETUNE[1:], *overrides, "trainer.max_steps=1"))


def test_a_checkpoint_whose_base_is_gone_or_changed_says_so(bases, make_cfg, tmp_path):
    shutil.copytree(bases["gpt"], tmp_path / "base")
    metrics, _ = run(make_cfg(*FINETUNE, f"init_from={tmp_path / 'base'}", "trainer.max_steps=3"))
    other = lmkit.load(tmp_path / "base")
    with torch.no_grad():
        other.backbone.lm_head.weight.add_(0.01)
    save(other, tmp_path / "base", overwrite=True)
    with pytest.raises(LmkitError, match="but the model there now has other weights"):
        lmkit.load(metrics["last_ckpt"])
    with pytest.raises(LmkitError, match="holds adapters for the base .* not init_from="):
        run(make_cfg(*FINETUNE, f"init_from={tmp_path / 'base'}", "trainer.max_steps=6", "resume=true"))
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(LmkitError, match="which is missing: put that model back there"):
        lmkit.load(metrics["last_ckpt"])


def test_named_tokens_train_their_rows_alone_and_a_tied_head_moves_with_them(bases):
    model = lmkit.load(bases["gpt"])
    vocab = model.record.backbone.vocab_size
    settings = LoRASettings(r=4, dropout=0.0, targets=("q", "v"), trainable_tokens=("e", "R", 5, "e"))
    named = token_ids(settings.trainable_tokens, model.tokenizer, vocab)
    assert named == model.tokenizer.encode("eR") + [5]  # texts as the tokenizer's tokens, each once
    with torch.no_grad():
        table = model.backbone.transformer.wte(torch.arange(vocab))
        before = model(IDS)
        adapt(model.backbone, settings, model.tokenizer)
        # the rows start as the base's (a tied head computes their logits in a matmul of its own: float rounding)
        torch.testing.assert_close(model(IDS), before, atol=1e-5, rtol=1e-5)
        tokens = model.backbone.transformer.wte
        assert isinstance(tokens, TrainableTokens) and model.backbone.lm_head.rows is tokens.rows  # one tensor
        tokens.rows.normal_(0, 0.5)
        moved = (tokens(torch.arange(vocab)) != table).any(-1).nonzero().flatten().tolist()
        assert moved == sorted(named)
        x = torch.randn(3, model.record.backbone.n_embd)
        logits, base_logits = model.backbone.lm_head(x), model.backbone.lm_head.base(x)
        assert (logits != base_logits).any(0).nonzero().flatten().tolist() == sorted(named)
        torch.testing.assert_close(logits[:, named], x @ tokens.rows.t())
        dense = merged(model)
        assert dense.record.backbone.tie_weights  # still tied: the tokens' input and output rows stay one
        assert torch.equal(dense.backbone.transformer.wte.weight[named], tokens.rows)
        torch.testing.assert_close(dense(IDS), model(IDS), atol=1e-5, rtol=1e-5)
    assert {n for n, p in model.backbone.named_parameters() if p.requires_grad and ".lora_" not in n} == \
        {"transformer.wte.rows"}


@pytest.mark.parametrize("base", ["int4", "int8"])
def test_a_qlora_base_is_quantized_part_by_part_as_it_is_read_as_the_plugin_quantizes_it_whole(
        bases, tmp_path, monkeypatch, base):
    """No moment holds the whole float model: each block is read, then quantized, before the next is read."""
    from lmkit.parallel.materialize import read_pretrained
    from lmkit.plugins import CompressContext, make, plugin_class

    gpt = lmkit.load(bases["gpt"])
    deep = dataclasses.replace(LORA_LLAMA, n_layer=6, vocab_size=gpt.record.backbone.vocab_size)
    torch.manual_seed(1)
    save(InferenceModel(build_backbone(deep).eval(), gpt.tokenizer, ModelRecord(backbone=deep, tokenizer="char")),
         tmp_path / "deep")
    whole = lmkit.load(tmp_path / "deep")
    make(base).apply(whole, CompressContext(cache_dir=""))  # the plugin's own, on the whole float model

    with torch.device("meta"):
        backbone = build_backbone(deep)
    real_floats = []  # the float bytes held each time a part is handed to the plugin
    quantize_part = plugin_class(base).quantize_part

    def watched(plugin, part):
        real_floats.append(sum(t.numel() * t.element_size() for t in (*backbone.parameters(), *backbone.buffers())
                               if t.is_floating_point() and not t.is_meta))
        return quantize_part(plugin, part)

    monkeypatch.setattr(plugin_class(base), "quantize_part", watched)
    parts = quantized_base(backbone, base, pretrained=read_pretrained(tmp_path / "deep", backbone)).eval()
    assert len(real_floats) == deep.n_layer + 1 and max(real_floats) < deep.num_parameters() * 4 / 4
    assert parts.state_dict().keys() == whole.backbone.state_dict().keys()
    for name, tensor in whole.backbone.state_dict().items():
        assert torch.equal(parts.state_dict()[name], tensor), name
    with torch.no_grad():
        torch.testing.assert_close(parts(IDS)[0], whole(IDS), atol=0, rtol=0)
    if base == "int4":  # trained embeddings stay float, exactly the file's, a tied head with them
        with torch.device("meta"):
            backbone = build_backbone(deep)
        tensors = read_pretrained(tmp_path / "deep", backbone)
        kept = quantized_base(backbone, base, float_embedding=True, pretrained=tensors)
        assert kept.lm_head.weight is kept.transformer.wte.weight
        assert torch.equal(kept.transformer.wte.weight, lmkit.load(tmp_path / "deep").backbone.transformer.wte.weight)


@pytest.mark.parametrize("extra", [["finetune.train_embeddings=true"],
                                   ["finetune.base=int4", "finetune.trainable_tokens=[e,R,5]"]],
                         ids=["every-row", "qlora-named-tokens"])
def test_trained_embedding_rows_resume_exactly_load_on_their_base_and_merge(bases, make_cfg, tmp_path, extra):
    # (every validation checkpointed: Lightning 2.6 rewrites last.ckpt only when a top-k checkpoint is saved)
    common = [*FINETUNE, f"init_from={bases['gpt']}", "optim.lr=0.02", "callbacks.model_checkpoint.save_top_k=-1",
              *extra]
    run(make_cfg(*common, "trainer.max_steps=6", output_dir=tmp_path / "straight"))
    run(make_cfg(*common, "trainer.max_steps=3", output_dir=tmp_path / "resumed"))
    metrics, objects = run(make_cfg(*common, "trainer.max_steps=6", "resume=true", output_dir=tmp_path / "resumed"))
    straight, resumed = (read_checkpoint(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("straight", "resumed"))
    assert resumed["global_step"] == straight["global_step"] == 6
    for name, tensor in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    # the checkpoint keeps the adapters and the trained rows (a tied head's name for them too), nothing else
    every_row = extra == ["finetune.train_embeddings=true"]
    kept = {k.removeprefix("backbone.") for k in resumed["state_dict"] if ".lora_" not in k}
    assert kept == ({"transformer.wte.weight", "lm_head.weight"} if every_row else
                    {"transformer.wte.rows", "lm_head.rows"})

    loaded = lmkit.load(metrics["last_ckpt"])  # the base, quantized again for QLoRA, with adapters and rows
    module = objects["module"].cpu().eval()
    vocab = loaded.record.backbone.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), module(IDS), atol=1e-6, rtol=1e-6)
        save(loaded, tmp_path / "merged")  # every export but format=peft writes the merge
        dense = lmkit.load(tmp_path / "merged")
        torch.testing.assert_close(dense(IDS), module(IDS), atol=1e-5, rtol=1e-5)
        assert dense.record.backbone.tie_weights
        table = dense.backbone.transformer.wte.weight[:vocab]
        base = loaded.backbone.transformer.wte
        moved = (table != (base.weight if every_row else base.base(torch.arange(vocab))).detach()[:vocab]).any(-1)
        if every_row:  # the trained table is the model's, and the tied head's
            base_table = lmkit.load(bases["gpt"]).backbone.transformer.wte.weight[:vocab]
            assert (table != base_table).any(-1).float().mean() > 0.5
        else:  # the named rows moved, the rest is the (dequantized) base's
            assert moved.nonzero().flatten().tolist() == sorted(loaded.tokenizer.encode("eR") + [5])


def test_lora_under_ddp_on_two_processes_equals_one_process_at_the_same_global_batch(trained, tmp_path):
    """Two DDP ranks of batch 4 against one process of batch 8: the same losses step by step, the same adapters and
    trained embedding (a tied head's gradient reduced with the embedding's) at the end."""

    lora = ["finetune=lora", "finetune.dropout=0", "finetune.train_embeddings=true", f"init_from={trained['ckpt']}",
            "trainer.max_steps=6", "trainer.val_check_interval=6"]
    a = finetune_here(*lora, run_dir=tmp_path / "one", cache_dir=trained["cache"])
    b = finetune("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *HALF, *lora, run_dir=tmp_path / "ddp",
              cache_dir=trained["cache"])
    assert b["world_size"] == 2 and len(logged(tmp_path / "one")) == 6
    assert logged(tmp_path / "ddp") == pytest.approx(logged(tmp_path / "one"), rel=1e-5)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    one, ddp = (read_checkpoint(m["last_ckpt"])["state_dict"] for m in (a, b))
    assert one.keys() == ddp.keys() and "backbone.transformer.wte.weight" in one
    for name, tensor in one.items():
        torch.testing.assert_close(ddp[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
