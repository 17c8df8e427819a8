"""finetune.objective=dpo on data=preference pairs: log 2 at step 0, preferences learned, the precomputed reference
equal to a fresh frozen model's, label smoothing as cDPO's formula, LoRA training its adapters alone (and its live
reference, the base with adapters off, equal to the precomputed one), DDP equal to one process, an export that loads
and generates as any model, and each bad input as one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lmkit
from lmkit.backbones import build_backbone
from lmkit.data.tokenizer import BPETokenizer
from lmkit.export import save
from lmkit.inference import InferenceModel
from lmkit.preference import dpo_loss, sequence_logps
from lmkit.record import ModelRecord
from tests.helpers import assert_clean_error, lmkit_main, logged, run_train_py, run_train_py_each, train_py_args

WORDS = ["the", "moon", "and", "sword", "rose", "crown"]
TINY_DPO = ["data=preference", "finetune.objective=dpo", "data.seq_len=48", "data.batch_size=8",
            "data.eval_batch_size=16", "data.val_windows=16", "data.test_windows=16", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0",
            "callbacks.text_sampler=null", "logger=csv", "optim.warmup_steps=2"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose chosen response has words of the first half of WORDS and whose rejected one words of the second: a
    tiny model learns to prefer the first in a few dozen steps. Some prompts are lists of messages whose responses
    repeat them first (UltraFeedback's shape)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, 4))
        prompt = " ".join(rng.choice(WORDS, size=k))
        chosen, rejected = (" ".join(rng.choice(half, size=k)) for half in (WORDS[:3], WORDS[3:]))
        if i % 5 == 0:
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
            out.append({"prompt": messages, "chosen": messages + [{"role": "assistant", "content": chosen}],
                        "rejected": messages + [{"role": "assistant", "content": rejected}]})
        else:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A tiny Transformer with lmkit's byte-level BPE (<|endoftext|>: lmkit's default chat template ends turns with
    it), saved as an lmkit folder; and a preference set for it."""
    root = tmp_path_factory.mktemp("dpo")
    tok = BPETokenizer.train([" ".join(WORDS) * 40 + " user assistant system im_start"], vocab_size=300)
    torch.manual_seed(0)
    record = ModelRecord.from_settings(dict(kind="transformer", n_layer=1, n_head=2, n_embd=32, max_seq_len=64,
                                            dropout=0.0), tok.vocab_size, tokenizer="bpe",
                                       tokens={"eos_token_ids": [tok.end_of_text_id]})
    save(InferenceModel(build_backbone(record.backbone).eval(), tok, record), root / "base")
    return {"model": root / "base", "pairs": write_jsonl(root / "pairs.jsonl", preference_pairs(150)),
            "cache": root / "cache"}


FULL = [*TINY_DPO, "trainer.max_steps=15", "trainer.val_check_interval=15", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def full_run(base, tmp_path_factory) -> dict:
    """finetune=full, 15 steps of DPO in this process."""
    from hydra import compose, initialize_config_dir

    from lmkit.train import run
    from tests.helpers import CONF

    out = tmp_path_factory.mktemp("full") / "run"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={out}", f"paths.cache_dir={base['cache']}",
                                          f"init_from={base['model']}", f"data.path={base['pairs']}", *FULL])
    metrics, objects = run(cfg)
    return {"metrics": metrics, "module": objects["module"].cpu().eval(), "datamodule": objects["datamodule"],
            "dir": out}


def test_dpo_starts_at_log_2_and_learns_the_preferences(full_run):
    losses, margins = (logged(full_run["dir"], key) for key in ("train_loss", "train_reward_margin"))
    assert len(losses) == 15
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # the policy is the reference: no preference yet
    assert abs(margins[0]) < 1e-5
    assert np.mean(losses[-3:]) < 0.6 * losses[0]
    module, dm, metrics = full_run["module"], full_run["datamodule"], full_run["metrics"]
    with torch.no_grad():  # every training pair, preferred now
        _, margins = module._dpo(dm.pair_batch(dm.evaluated_pairs("train")))
    assert (margins > 0).float().mean() > 0.95 and margins.mean() > 0.5
    assert np.mean(logged(full_run["dir"], "train_preference_accuracy")[-5:]) > 0.95
    # val_loss is the DPO loss over the validation pairs (their mean over pairs), beside its margin and accuracy
    with torch.no_grad():
        margins = torch.cat([module._dpo(batch)[1] for batch in dm.val_dataloader()])
    assert metrics["val_loss"] == pytest.approx(F.softplus(-margins).mean().item(), abs=1e-5)
    assert metrics["val_reward_margin"] == pytest.approx(margins.mean().item(), abs=1e-5)
    assert metrics["val_preference_accuracy"] == pytest.approx((margins > 0).float().mean().item())
    assert metrics["val_ppl"] is None and metrics["preference_pairs"] == 135


def test_the_precomputed_reference_equals_a_fresh_frozen_model(base, full_run):
    module, dm = full_run["module"], full_run["datamodule"]
    fresh = lmkit.load(base["model"]).backbone
    for split in ("train", "val", "test"):
        pairs = dm.evaluated_pairs(split)
        batch = dm.pair_batch(pairs[:40])
        with torch.no_grad():
            scores = sequence_logps(fresh, batch.inputs, batch.targets)
        n = len(batch.pairs)
        torch.testing.assert_close(module.reference_logps[batch.pairs], torch.stack([scores[:n], scores[n:]], 1),
                                   atol=1e-5, rtol=1e-6)
    # the checkpoint carries them: a resumed run scores against the model it started from
    saved = torch.load(full_run["metrics"]["last_ckpt"], weights_only=True)["lmkit"]["reference_logps"]
    torch.testing.assert_close(saved, module.reference_logps.cpu())


def test_the_dpo_loss_of_a_pair_equals_a_by_hand_computation(base, full_run):
    """One pair, scored token by token from its record: each response rendered after its prompt with the chat
    template, each of its tokens' log-probability read off the logits of the tokens before it alone (no batch, no
    padding), summed, under the trained policy and the model it started from; then DPO's formula in plain floats."""
    from lmkit.data.chat import IGNORE, render_chat, resolve_template

    module, dm = full_run["module"], full_run["datamodule"]
    reference = lmkit.load(base["model"])
    template = resolve_template(reference.record.tokens, reference.tokenizer)
    records = [json.loads(line) for line in base["pairs"].read_text().splitlines()]

    def logp(backbone, prompt, response, per_token: bool = False) -> float:
        ids, labels = render_chat(prompt, response, tokenizer=reference.tokenizer, template=template)
        assert len(ids) <= 49  # (data.seq_len=48: nothing was cut; the shortest pairs are chosen below)
        total = 0.0
        with torch.no_grad():
            for k in np.flatnonzero(labels != IGNORE):
                logits = backbone(torch.from_numpy(ids[None, :k]))[0][0, -1].double()
                total += (logits.log_softmax(-1)[labels[k]]).item()
        return total / int((labels != IGNORE).sum()) if per_token else total

    beta = module.dpo.beta
    for k in dm.evaluated_pairs("val")[::-1][:3].tolist():  # (longest first: the three shortest)
        record = records[k]
        prompt = record["prompt"]
        chosen, rejected = record["chosen"], record["rejected"]
        if isinstance(chosen, list):  # (a response list repeating the prompt's messages: the reply alone is scored)
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
        z = beta * ((logp(module.backbone, prompt, chosen) - logp(reference.backbone, prompt, chosen))
                    - (logp(module.backbone, prompt, rejected) - logp(reference.backbone, prompt, rejected)))
        by_hand = -math.log(1 / (1 + math.exp(-z)))
        with torch.no_grad():
            loss, margin, chosen_nll = module._scores(dm.pair_batch(np.array([k])))
        assert margin.item() == pytest.approx(z, abs=1e-4) and loss.item() == pytest.approx(by_hand, abs=1e-4)
        # finetune.sft_weight's term (RPO): the chosen response's mean negative log-likelihood per token
        assert chosen_nll.item() == pytest.approx(-logp(module.backbone, prompt, chosen, per_token=True), abs=1e-5)


def test_label_smoothing_changes_the_loss_as_cdpo_says(full_run):
    z = torch.linspace(-4, 4, 9)
    zero = torch.zeros(9)
    for eps in (0.0, 0.1, 0.3):
        losses, margins = dpo_loss(z / 0.5, zero, zero, zero, beta=0.5, label_smoothing=eps)
        torch.testing.assert_close(margins, z)
        torch.testing.assert_close(losses, (1 - eps) * F.softplus(-z) + eps * F.softplus(z))
    # through the trained model: the smoothed loss is the plain one plus eps * margin (softplus(z) - softplus(-z) = z)
    module, dm = full_run["module"], full_run["datamodule"]
    batch = next(iter(dm.val_dataloader()))
    finetune = module.hparams.finetune
    with torch.no_grad():
        plain, margins = module._dpo(batch)
        finetune["label_smoothing"] = 0.25
        try:
            smoothed, same = module._dpo(batch)
        finally:
            finetune["label_smoothing"] = 0.0
    torch.testing.assert_close(same, margins)
    torch.testing.assert_close(smoothed, plain + 0.25 * margins, atol=1e-6, rtol=1e-5)
    assert dpo_loss(zero, zero, zero, zero, beta=0.1, label_smoothing=0.25)[0] == pytest.approx([math.log(2)] * 9)


def test_lora_dpo_trains_the_adapters_alone(base, make_cfg, tmp_path):
    """The base stays as it was; the checkpoint holds the adapters; the live reference (the base with its adapters
    off: no copy) gives the precomputed reference's losses."""
    from lmkit.train import run

    common = [f"init_from={base['model']}", f"data.path={base['pairs']}", *TINY_DPO, "finetune=lora",
              "finetune.dropout=0", "trainer.max_steps=6", "trainer.val_check_interval=6", "optim.lr=1e-2"]
    metrics, objects = run(make_cfg(*common, output_dir=tmp_path / "pre"))
    backbone = objects["module"].backbone
    trained = {name for name, p in backbone.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in name for name in trained)
    base_state = lmkit.load(base["model"]).backbone.state_dict()
    for name, tensor in backbone.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(tensor, base_state[name.replace(".base.", ".")]), name
    assert any(p.abs().sum() > 0 for name, p in backbone.named_parameters() if ".lora_b." in name)
    saved = torch.load(metrics["last_ckpt"], weights_only=True)
    assert saved["state_dict"] and all(".lora_" in k for k in saved["state_dict"])
    losses = logged(tmp_path / "pre")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and losses[-1] < losses[0]
    run(make_cfg(*common, "finetune.reference=live", output_dir=tmp_path / "live"))
    assert logged(tmp_path / "live") == pytest.approx(losses, rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_dpo_under_ddp_equals_one_process(base, full_run, tmp_path):
    """Two DDP ranks of 4 pairs against full_run's one process of 8: the same losses step by step, the same
    validation, the same reference table (each rank scores its share, then all gather them)."""
    result = run_train_py(f"init_from={base['model']}", f"data.path={base['pairs']}", *FULL, "trainer=ddp",
                          "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=4", "data.eval_batch_size=8",
                          run_dir=tmp_path / "ddp", cache_dir=base["cache"])
    assert result.returncode == 0, result.stderr[-3000:]
    ddp, one = json.loads((tmp_path / "ddp" / "metrics.json").read_text()), full_run["metrics"]
    assert ddp["world_size"] == 2
    assert logged(tmp_path / "ddp") == pytest.approx(logged(full_run["dir"]), rel=1e-5)
    for key in ("val_loss", "val_reward_margin", "val_preference_accuracy", "test_loss"):
        assert ddp[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    table = torch.load(ddp["last_ckpt"], weights_only=True)["lmkit"]["reference_logps"]
    torch.testing.assert_close(table, full_run["module"].reference_logps, atol=1e-5, rtol=1e-6)


def test_a_dpo_model_exports_loads_generates_and_evaluates(base, full_run, tmp_path, monkeypatch):
    from lmkit.serve.chat import ChatFormat

    out = tmp_path / "exported"
    result = lmkit_main("export", f"model={full_run['metrics']['last_ckpt']}", f"out={out}")
    assert result.returncode == 0, result.stderr
    model = lmkit.load(out)
    assert model.record.data["source"] == "preference" and model.record.tokens["chat_template"]
    prompt = ChatFormat.of(model).prompt([{"role": "user", "content": "the moon"}])  # as lmkit serve renders chats
    text = model.generate(prompt, max_new_tokens=6, temperature=0, seed=0)  # (special tokens are not printed)
    assert "the moon\n<|im_start|>assistant\n" in text and text.split("assistant\n", 1)[1].strip()
    monkeypatch.setenv("LMKIT_CACHE", str(base["cache"]))
    result = lmkit_main("eval", f"model={out}")  # its own test split: the pairs' prompt + chosen, as text
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert np.isfinite(found["perplexity"]) and found["tokens"] > 0


def test_bad_preference_inputs_are_one_line_each(base, tmp_path):
    good = preference_pairs(20)

    def records(name: str, rows: list) -> Path:
        return write_jsonl(tmp_path / f"{name}.jsonl", good + rows)

    long = " ".join(["the moon and the rose"] * 30)
    model = f"init_from={base['model']}"
    cases = {
        "empty": ([model, f"data.path={records('empty', [{'prompt': 'the', 'chosen': ' ', 'rejected': 'moon'}])}"],
                  ["empty.jsonl, record 21: the chosen response is empty ('chosen', data.chosen_field)"]),
        "fields": ([model, f"data.path={records('fields', [{'prompt': 'the', 'response': 'moon'}])}"],
                   ["fields.jsonl, record 21: the record has no 'chosen' (data.chosen_field), 'rejected' "
                    "(data.rejected_field) (a string or a list of messages); its fields: prompt, response"]),
        "long": ([model, f"data.path={records('long', [{'prompt': 'the', 'chosen': 'moon', 'rejected': long}])}"],
                 ["long.jsonl, record 21: the rejected response of", "is longer than data.seq_len=48"]),
        "not_pairs": ([model, "data=chat", f"data.path={base['pairs']}"],
                      ["finetune.objective=dpo learns from preference pairs, not from data=chat: use data=preference"]),
        "beta": ([model, f"data.path={base['pairs']}", "finetune.beta=0"], ["finetune.beta=0 must be a positive"]),
        "sft_weight": ([model, f"data.path={base['pairs']}", "finetune.sft_weight=-1"],
                       ["finetune.sft_weight=-1 must be a number >= 0"]),
        "live_full": ([f"data.path={base['pairs']}", "tokenizer=file", f"tokenizer.path={base['model']}/tokenizer.json",
                       "finetune.reference=live"], ["finetune.reference=live with finetune=full", "init_from="]),
    }
    results = run_train_py_each({name: train_py_args(*TINY_DPO, *overrides, run_dir=tmp_path / name / "run",
                                                     cache_dir=tmp_path / name / "cache")
                                 for name, (overrides, _) in cases.items()}, cwd=tmp_path)
    for name, (_, fragments) in cases.items():
        result = results[name]
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert_clean_error(result, *fragments, run_dir=tmp_path / name / "run")
