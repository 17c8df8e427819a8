"""LoRA and QLoRA fine-tuning (`finetune=lora`): adapters on a frozen base, checkpoints of adapters alone that resume
exactly and load on their base, and merges into dense models equal to the adapted ones."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

import lmkit
from lmkit.backbones import LSTMConfig, TransformerConfig, build_backbone
from lmkit.checkpoint import read_checkpoint
from lmkit.errors import LmkitError
from lmkit.export import save
from lmkit.inference import InferenceModel
from lmkit.lora import LoRALinear, LoRASettings, adapt, merge, merged, quantize_base
from lmkit.record import ModelRecord
from lmkit.train import run
from tests.conftest import TINY

pytestmark = pytest.mark.slow

LLAMA = TransformerConfig(vocab_size=0, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64, position="rope",
                          bias=False, norm="rmsnorm", mlp="swiglu", mlp_hidden=48, tie_weights=True)
EVERY_TARGET = LoRASettings(r=4, targets=("q", "k", "v", "o", "mlp", "head"), dropout=0.0)
# a fine-tune on the embedded corpus, as short as it can be and still checkpoint
FINETUNE = ["finetune=lora", *[o for o in TINY if not o.startswith("model.")], "trainer.val_check_interval=3",
            "logger=none", "callbacks.text_sampler=null", "optim.warmup_steps=1", "optim.decay_steps=100"]


@pytest.fixture(scope="module")
def bases(trained, tmp_path_factory) -> dict[str, object]:
    """Base models saved as lmkit folders: GPT-2's block (trained), a Llama block (random, with GQA and a tied
    head), and an LSTM; all with the embedded corpus's character tokenizer."""
    tmp = tmp_path_factory.mktemp("bases")
    gpt = lmkit.load(trained["ckpt"])
    save(gpt, tmp / "gpt")
    torch.manual_seed(0)
    for name, cfg in (("llama", LLAMA), ("lstm", LSTMConfig(vocab_size=0, n_layer=1, n_embd=16))):
        cfg.vocab_size = gpt.record.backbone.vocab_size
        save(InferenceModel(build_backbone(cfg).eval(), gpt.tokenizer, ModelRecord(backbone=cfg, tokenizer="char")),
             tmp / name)
    return {"gpt": tmp / "gpt", "llama": tmp / "llama", "lstm": tmp / "lstm", "cache": trained["cache"]}


IDS = torch.randint(0, 60, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("base", ["float", "int4", "int8"])
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_an_adapted_model_starts_as_its_base_and_merges_into_the_dense_model_it_computes(bases, family, base):
    model = lmkit.load(bases[family])
    if base != "float":
        quantize_base(model, base)
    with torch.no_grad():
        before = model(IDS)
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
            # logits move by up to 0.04 (seen), the rest by its rounding alone
            error = (dense(IDS) - adapted).abs()
            assert error.max() < 0.05 and error.mean() < 2e-3, (error.max(), error.mean())
        else:  # bitsandbytes' 4-bit matmul sums in another order than a dense one (up to 2.6e-5 seen)
            tolerance = 1e-4 if base == "int4" else 1e-5
            torch.testing.assert_close(dense(IDS), adapted, atol=tolerance, rtol=tolerance)
    assert not any(isinstance(m, LoRALinear) for m in dense.backbone.modules())
    assert all(p.dtype == torch.float32 for p in dense.backbone.parameters())  # dequantized, not re-quantized
    # the head's adapter unties a tied head rather than move the embedding with it
    assert dense.record.backbone.tie_weights is False if model.record.backbone.tie_weights else True
    torch.testing.assert_close(dense.backbone.transformer.wte.weight, merge(model.backbone).transformer.wte.weight)


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
    assert exported.generate("ROMEO:", max_new_tokens=5, temperature=0).startswith("ROMEO:")


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
])
def test_bad_lora_settings_are_one_line(bases, make_cfg, overrides, message):
    overrides = [o.replace("LSTM", str(bases["lstm"])).replace("=X", f"={bases['gpt']}") for o in overrides]
    with pytest.raises(LmkitError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
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
