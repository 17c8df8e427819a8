"""`lmkit export format=peft`: a LoRA checkpoint's adapters in PEFT's format, checked by peft itself on the base's
`format=hf` export (transformers' GPT2LMHeadModel and LlamaForCausalLM), against lmkit's adapted and merged models."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import lmkit
from lmkit.export import save
from lmkit.hf import export_hf
from lmkit.hf import export_peft
from lmkit.train import run
from tests.helpers import CONF, FINETUNE, hf_model, lmkit_main, one_error_line

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow

IDS = torch.randint(0, 60, (2, 24), generator=torch.Generator().manual_seed(0))
TARGETS = {"every": "[q,k,v,o,mlp,head]", "q_v": "[q,v]"}


@pytest.fixture(scope="module")
def checkpoints(bases, tmp_path_factory) -> dict[tuple[str, str], object]:  # noqa: F811
    """LoRA checkpoints: (base family, targets) -> path; a high learning rate, so the adapters move the logits."""
    from hydra import compose, initialize_config_dir

    tmp = tmp_path_factory.mktemp("lora")
    paths = {}
    for family in ("gpt", "llama"):
        for name, targets in TARGETS.items():
            out = tmp / f"{family}-{name}"
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose("train", overrides=[
                    f"paths.output_dir={out}", f"paths.cache_dir={bases['cache']}", *FINETUNE,
                    f"init_from={bases[family]}", f"finetune.targets={targets}", "finetune.r=4", "optim.lr=0.05",
                    "trainer.max_steps=3"])
            metrics, _ = run(cfg)
            paths[family, name] = metrics["last_ckpt"]
    return paths


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def lmkit_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[..., : model.record.backbone.vocab_size]


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_peft_on_the_hf_base_computes_the_lora_checkpoint(bases, checkpoints, family, targets, tmp_path):
    ckpt = checkpoints[family, targets]
    adapted = lmkit.load(ckpt)
    export_hf(lmkit.load(bases[family]), tmp_path / "hf")
    export_peft(adapted, tmp_path / "peft")

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["fan_in_fan_out"] is (family == "gpt")
    if family == "gpt" and targets == "every":  # q, k, v: one c_attn adapter of rank 3r (alpha 3 * 16), the rest r
        assert (config["r"], config["lora_alpha"]) == (4, 16.0)
        assert config["rank_pattern"] == {"attn.c_attn": 12} and config["alpha_pattern"] == {"attn.c_attn": 48.0}
    elif family == "gpt":  # c_attn alone (q, v): one rank, 2r, for every module
        assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (8, 32.0, {})
    else:
        assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (4, 16.0, {}, {})

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    before = hf_logits(base, IDS)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ours = lmkit_logits(adapted, IDS)
    assert (ours - before).abs().max() > 0.05  # the adapters moved the logits
    theirs = hf_logits(model, IDS)
    print(f"{family}/{targets}: max |peft - lmkit| = {(theirs - ours).abs().max():.2e}")
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    untied = "head" in TARGETS[targets] and base.config.tie_word_embeddings
    if untied:  # PEFT's merge would add B @ A to the tied tensor, moving the embedding: untie first, as PEFT advises
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", tie_word_embeddings=False).eval()
        base.lm_head.weight.data = base.get_input_embeddings().weight.data.clone()
        model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    dense = model.merge_and_unload()
    save(adapted, tmp_path / "merged")  # what `lmkit export model=<checkpoint>` writes
    torch.testing.assert_close(hf_logits(dense, IDS), lmkit_logits(lmkit.load(tmp_path / "merged"), IDS),
                               atol=1e-4, rtol=1e-4)


def test_the_head_adapter_on_a_tied_hf_head_is_exact_unmerged_and_peft_merge_moves_the_embedding(
        bases, checkpoints, tmp_path):
    """What the module docstring claims: PEFT adds a tied head's adapter to lm_head's output only (exact, above);
    its merge_and_unload writes B @ A into the one tied tensor, so the embedding moves as well."""
    export_hf(lmkit.load(bases["llama"]), tmp_path / "hf")
    export_peft(lmkit.load(checkpoints["llama", "every"]), tmp_path / "peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    embedding = base.get_input_embeddings().weight.detach().clone()
    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        dense = peft.PeftModel.from_pretrained(base, tmp_path / "peft").merge_and_unload()
    assert not torch.equal(dense.get_input_embeddings().weight, embedding)


def test_the_cli_writes_peft_format_and_refuses_a_model_without_adapters(bases, checkpoints, tmp_path):
    result = lmkit_main("export", f"model={checkpoints['llama', 'q_v']}", "format=peft", f"out={tmp_path / 'peft'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert config["base_model_name_or_path"] is None  # an lmkit-trained base: its HF folder is wherever format=hf goes

    refused = lmkit_main("export", f"model={bases['llama']}", "format=peft", f"out={tmp_path / 'none'}")
    one_error_line(refused, "format=peft writes LoRA adapters; this model has none")
    assert not (tmp_path / "none").exists()


def test_a_base_imported_from_hugging_face_is_named_as_base_model(tmp_path):
    """Fine-tuning an imported model: the adapters apply to the folder it came from, which the config names."""
    from lmkit.hf import import_hf
    from lmkit.hf import hf_source_of_base

    hf_model(tmp_path / "hf")
    save(import_hf(tmp_path / "hf"), tmp_path / "base")
    torch.save({"lmkit": {"lora_base": {"path": str(tmp_path / "base")}}}, tmp_path / "lora.ckpt")  # its one key read
    assert hf_source_of_base(tmp_path / "lora.ckpt") == str((tmp_path / "hf").resolve())


def test_a_base_format_hf_cannot_write_is_refused_in_one_line(bases, tmp_path):
    """No base export, no adapters for it: format=hf's own refusal (here GPT-2 blocks with an untied head)."""
    from hydra import compose, initialize_config_dir

    from lmkit.backbones import build_backbone
    from lmkit.inference import InferenceModel

    gpt = lmkit.load(bases["gpt"])
    cfg = dataclasses.replace(gpt.record.backbone, tie_weights=False)
    save(InferenceModel(build_backbone(cfg).eval(), gpt.tokenizer, gpt.record.replace(backbone=cfg)), tmp_path / "base")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        metrics, _ = run(compose("train", overrides=[
            f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={bases['cache']}", *FINETUNE,
            f"init_from={tmp_path / 'base'}", "trainer.max_steps=1", "trainer.val_check_interval=1"]))
    result = lmkit_main("export", f"model={metrics['last_ckpt']}", "format=peft", f"out={tmp_path / 'peft'}")
    one_error_line(result, "format=hf needs a GPT-2- or Llama-shaped Transformer", "tie_weights=False")
    assert not (tmp_path / "peft").exists()


# Trained embedding rows, as PEFT holds them: named tokens on GPT-2's tied head (trainable_token_indices, which PEFT
# ties to the head), every row of a tied Llama beside a head adapter (every id as trainable_token_indices), every row
# of an untied Llama (modules_to_save=[embed_tokens]).
EMBEDDINGS = {"gpt-tokens": ("gpt", ["finetune.targets=[q,v]", "finetune.trainable_tokens=[e,R,5]"]),
              "llama-every-row-head": ("llama", ["finetune.targets=[q,k,v,o,mlp,head]",
                                                  "finetune.train_embeddings=true"]),
              "untied-every-row": ("untied", ["finetune.targets=[q,v]", "finetune.train_embeddings=true"])}


@pytest.fixture(scope="module")
def embedding_checkpoints(bases, tmp_path_factory) -> dict[str, tuple[object, object]]:  # noqa: F811
    """case -> (LoRA checkpoint, its base folder); the untied base is the Llama block with its head untied."""
    from hydra import compose, initialize_config_dir

    from lmkit.backbones import build_backbone
    from lmkit.inference import InferenceModel

    tmp = tmp_path_factory.mktemp("lora_embeddings")
    llama = lmkit.load(bases["llama"])
    untied = dataclasses.replace(llama.record.backbone, tie_weights=False)
    torch.manual_seed(2)
    save(InferenceModel(build_backbone(untied).eval(), llama.tokenizer, llama.record.replace(backbone=untied)),
         tmp / "untied")
    folders = {"gpt": bases["gpt"], "llama": bases["llama"], "untied": tmp / "untied"}
    out = {}
    for case, (family, overrides) in EMBEDDINGS.items():
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[
                f"paths.output_dir={tmp / case}", f"paths.cache_dir={bases['cache']}", *FINETUNE,
                f"init_from={folders[family]}", "finetune.r=4", "optim.lr=0.05", "trainer.max_steps=3", *overrides])
        metrics, _ = run(cfg)
        out[case] = (metrics["last_ckpt"], folders[family])
    return out


@pytest.mark.parametrize("case", EMBEDDINGS)
def test_peft_loads_trained_embedding_rows_and_computes_the_lora_checkpoint(embedding_checkpoints, case, tmp_path):
    ckpt, base_folder = embedding_checkpoints[case]
    adapted = lmkit.load(ckpt)
    vocab = adapted.record.backbone.vocab_size
    export_hf(lmkit.load(base_folder), tmp_path / "hf")
    export_peft(adapted, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    named = adapted.tokenizer.encode("eR") + [5]
    if case == "gpt-tokens":
        assert config["trainable_token_indices"] == named and config["modules_to_save"] is None
    elif case == "llama-every-row-head":
        assert config["trainable_token_indices"] == list(range(vocab)) and "lm_head" in config["target_modules"]
    else:
        assert config["modules_to_save"] == ["embed_tokens"] and config["trainable_token_indices"] is None

    ids = torch.cat([IDS, torch.tensor([named * 8])])  # (the named tokens in every role, input and target)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    before = hf_logits(base, ids)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ours = lmkit_logits(adapted, ids)
    assert (ours[2] - before[2]).abs().max() > 0.05  # the adapters and rows moved the named tokens' logits
    theirs = hf_logits(model, ids)
    print(f"{case}: max |peft - lmkit| = {(theirs - ours).abs().max():.2e}")
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    if case != "llama-every-row-head":  # (PEFT's merge would add the head's B @ A to the tied tensor: see above)
        save(adapted, tmp_path / "merged")
        torch.testing.assert_close(hf_logits(model.merge_and_unload(), ids),
                                   lmkit_logits(lmkit.load(tmp_path / "merged"), ids), atol=1e-4, rtol=1e-4)
