"""data=chat: conversations rendered with the model's chat template (checked against transformers' apply_chat_template
and its assistant-token mask), labels on the assistant's turns only, packed rows without attention across
conversations, fine-tuning runs that lower the masked loss, and each bad input as one line."""

from __future__ import annotations

import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from lmkit.backbones import build_backbone
from lmkit.data.chat import IGNORE, DEFAULT_CHAT_TEMPLATE, render_chat, resolve_template
from lmkit.data.chat_datamodule import ChatTrainBatches, Rows, pack
from lmkit.data.tokenizer import BPETokenizer
from lmkit.errors import LmkitError
from lmkit.export import save
from lmkit.hf import import_hf
from lmkit.inference import InferenceModel
from lmkit.record import ModelRecord
from tests.helpers import (KEY, NAME, Server, assert_clean_error, hf_model, run_train_py, run_train_py_each,
                           train_py_args)

WORDS = ["the", "moon", "and", "sword", "rose", "crown"]
# Qwen2-Instruct's template (a default system message, ChatML turns), its assistant text inside transformers'
# {% generation %} block so that apply_chat_template(return_assistant_tokens_mask=True) marks what lmkit should learn
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
         "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
         "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
         "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Mistral-Instruct's: roles must alternate, said through raise_exception
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the moon"},
                {"role": "assistant", "content": "and the rose"}, {"role": "user", "content": "the sword?"},
                {"role": "assistant", "content": "the crown, the moon"}]
TINY_CHAT = ["data=chat", "data.seq_len=128", "data.batch_size=4", "data.eval_batch_size=8", "data.val_windows=8",
             "data.test_windows=8", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
             "trainer.num_sanity_val_steps=0", "callbacks.text_sampler=null", "logger=none"]


def hf_chat_folder(path: Path, template: str = QWEN2) -> BPETokenizer:
    """A random Qwen2-shaped model saved as transformers saves it, with a byte-level BPE that has ChatML's special
    tokens and `template` in its tokenizer_config.json (<|im_end|> its end of sequence)."""
    tok = BPETokenizer.train([" ".join(WORDS) * 40 + " user assistant system"], vocab_size=290)
    tok.tokenizer.add_special_tokens(["<s>", "<|im_start|>", "<|im_end|>"])
    hf_model(path, family="qwen2", vocab_size=300, max_position_embeddings=128, bos_token_id=None, eos_token_id=None)
    (path / "tokenizer.json").write_text(tok.tokenizer.to_str())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
        "chat_template": template}))
    return tok


TEXTS = [" ".join(WORDS) * 40 + " user assistant system im_start"]


def bare_tokenizer() -> BPETokenizer:
    """A byte-level BPE without special tokens (lmkit's own reserves <|endoftext|>)."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    from lmkit.data.tokenizer import byte_level

    tok = byte_level(HFTokenizer(models.BPE()))
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return BPETokenizer(tok)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """lmkit model folders: `qwen2` (imported, with QWEN2), `plain` (lmkit's own BPE with <|endoftext|>, no template),
    `bare` (a BPE without an end-of-sequence token or template)."""
    root = tmp_path_factory.mktemp("chat_models")
    hf_chat_folder(root / "hf")
    save(import_hf(root / "hf"), root / "qwen2")
    torch.manual_seed(0)
    settings = dict(kind="transformer", n_layer=1, n_head=2, n_embd=32, max_seq_len=128)
    for name, tok in (("plain", BPETokenizer.train(TEXTS, vocab_size=300)), ("bare", bare_tokenizer())):
        tokens = {"eos_token_ids": [tok.end_of_text_id]} if tok.end_of_text_id is not None else {}
        record = ModelRecord.from_settings(settings, tok.vocab_size, tokenizer="bpe", tokens=tokens)
        save(InferenceModel(build_backbone(record.backbone).eval(), tok, record), root / name)
    return {name: root / name for name in ("qwen2", "plain", "bare")} | {"hf": root / "hf"}


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Conversations whose replies are their question backwards: a tiny model learns them in a few dozen steps."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            words = list(rng.choice(WORDS, size=int(rng.integers(1, 4))))
            messages += [{"role": "user", "content": " ".join(words)},
                         {"role": "assistant", "content": " ".join(reversed(words))}]
        out.append(messages)
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_rendering_and_labels_match_transformers(models):
    """The ids are apply_chat_template's, and the labels are exactly its assistant-token mask (the {% generation %}
    block: each reply with its <|im_end|> and newline), for conversations and for prompt + response."""
    reference = transformers.AutoTokenizer.from_pretrained(models["hf"])
    import lmkit

    model = lmkit.load(models["qwen2"])
    template = resolve_template(model.record.tokens, model.tokenizer)
    cases = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[1:4], conversations(6)[5]]
    for messages in cases:
        ids, labels = render_chat(messages, tokenizer=model.tokenizer, template=template)
        expected = reference.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        assert ids.tolist() == expected["input_ids"]
        mask = np.asarray(expected["assistant_masks"], dtype=bool)
        assert mask.any() and (labels[mask] == ids[mask]).all() and (labels[~mask] == IGNORE).all()
    # the end-of-turn token is learned: each reply's labels end "<|im_end|>\n"
    ids, labels = render_chat(CONVERSATION, tokenizer=model.tokenizer, template=template)
    im_end = model.tokenizer.tokenizer.token_to_id("<|im_end|>")
    assert (labels == im_end).sum() == 2 and (ids == im_end).sum() == 5
    # prompt + response: the response alone is learned, the prompt's own assistant turn is context
    both = render_chat(CONVERSATION[:4], "the crown, the moon", tokenizer=model.tokenizer, template=template)
    assert both.ids.tolist() == ids.tolist()
    assert model.tokenizer.tokenizer.decode([t for t in both.labels.tolist() if t != IGNORE],
                                            skip_special_tokens=False) == "the crown, the moon<|im_end|>\n"
    listed = render_chat("the moon", [{"role": "assistant", "content": "and the rose"}], tokenizer=model.tokenizer,
                         template=template)
    assert listed.ids.tolist() == reference.apply_chat_template(CONVERSATION[1:3], tokenize=True, return_dict=False)


def test_the_loss_of_a_two_turn_conversation_is_its_replies_alone_by_hand(models):
    """The training loss of a rendered two-turn conversation equals a by-hand mean over the tokens transformers marks
    as the assistant's (each read off the logits at the token before it), and no prompt position sends a gradient."""
    import lmkit
    from lmkit.lightning_module import LitLanguageModel

    model = lmkit.load(models["qwen2"])
    template = resolve_template(model.record.tokens, model.tokenizer)
    ids, labels = render_chat(CONVERSATION, tokenizer=model.tokenizer, template=template)
    mask = np.asarray(transformers.AutoTokenizer.from_pretrained(models["hf"]).apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"], bool)
    batch = Rows(ids, labels != IGNORE, np.array([0, len(ids)]), np.array([len(ids)]), None).batch([np.array([0])])
    module = LitLanguageModel.__new__(LitLanguageModel)  # (its _loss alone, on the loaded backbone)
    torch.nn.Module.__init__(module)
    module.backbone = model.backbone
    with torch.no_grad():
        loss = module._loss(batch).item()
        logits = model.backbone(torch.from_numpy(ids[None, :-1]))[0][0].double().log_softmax(-1)
        by_hand = -np.mean([logits[k - 1, ids[k]].item() for k in range(1, len(ids)) if mask[k]])
        assert loss == pytest.approx(by_hand, rel=1e-5)
    # no prompt position sends a gradient back through the logits it predicts from
    captured = []
    model.backbone.lm_head.register_forward_hook(lambda layer, args, out: captured.append(out.retain_grad() or out))
    module._loss(batch).backward()
    grad = captured[0].grad[0].abs().sum(-1)
    learned = torch.from_numpy(mask[1:])  # position k predicts token k + 1
    assert (grad[~learned] == 0).all() and (grad[learned] > 0).all()


def test_the_default_template_ends_turns_with_the_model_s_own_end_token(models):
    import lmkit

    model = lmkit.load(models["plain"])
    template = resolve_template(model.record.tokens, model.tokenizer)
    assert template.template == DEFAULT_CHAT_TEMPLATE and template.eos_token == "<|endoftext|>"
    ids, labels = render_chat(CONVERSATION[1:3], tokenizer=model.tokenizer, template=template)
    text = model.tokenizer.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    assert text == "<|im_start|>user\nthe moon<|endoftext|>\n<|im_start|>assistant\nand the rose<|endoftext|>\n"
    learned = model.tokenizer.tokenizer.decode([t for t in labels.tolist() if t != IGNORE], skip_special_tokens=False)
    assert learned == "and the rose<|endoftext|>\n"
    with pytest.raises(LmkitError, match="no chat template, and no end-of-sequence token.*data.chat_template="):
        bare = lmkit.load(models["bare"])
        resolve_template(bare.record.tokens, bare.tokenizer)


def test_packed_rows_keep_conversations_apart(models):
    """Packing: every conversation once, rows full; a packed batch's logits equal each conversation's alone (its
    positions restart, it sees no other), and its targets are each conversation's labels, shifted."""
    lengths = np.random.default_rng(0).integers(2, 40, size=200)
    rows = pack(lengths, 65)
    assert sorted(np.concatenate(rows).tolist()) == list(range(200))
    assert all(lengths[r].sum() <= 65 for r in rows) and lengths.sum() / (65 * len(rows)) > 0.95

    import lmkit

    model = lmkit.load(models["qwen2"])
    template = resolve_template(model.record.tokens, model.tokenizer)
    rendered = [render_chat(c, tokenizer=model.tokenizer, template=template) for c in conversations(5)]
    ids = np.concatenate([r.ids for r in rendered])
    learn = np.concatenate([r.labels != IGNORE for r in rendered])
    starts = np.cumsum([0] + [len(r.ids) for r in rendered])
    lengths = np.diff(starts)
    width = int(lengths[:3].sum()) + 5  # three conversations and some padding in row 0, two in row 1
    assert lengths[3:].sum() <= width
    batch = Rows(ids, learn, starts, lengths, width).batch([np.array([0, 1, 2]), np.array([3, 4])])
    assert batch.tokens == int(lengths.sum())  # (both rows end in padding: every token is an input)
    for position_kind in ("rope", "learned"):
        torch.manual_seed(0)
        record = ModelRecord.from_settings(dict(kind="transformer", n_layer=2, n_head=2, n_embd=32, max_seq_len=256,
                                                position=position_kind), 300)
        backbone = build_backbone(record.backbone).eval()
        with torch.no_grad():
            packed, _ = backbone(batch.inputs, documents=batch.documents)
            for row, docs in enumerate([[0, 1, 2], [3, 4]]):
                at = 0
                for d in docs:
                    n = int(lengths[d])
                    alone, _ = backbone(torch.from_numpy(rendered[d].ids[None, :n - 1]))
                    torch.testing.assert_close(packed[row, at:at + n - 1], alone[0], atol=1e-5, rtol=1e-5)
                    labels = rendered[d].labels
                    assert batch.targets[row, at:at + n - 1].tolist() == labels[1:n].tolist()
                    if at + n - 1 < batch.targets.size(1):
                        assert batch.targets[row, at + n - 1] == IGNORE  # the next conversation's first token
                    at += n
    end = int(lengths[:3].sum())  # row 0's padding: no targets, a document of its own
    assert (batch.targets[0, end - 1:] == IGNORE).all() and (batch.documents[0, end:] == -1).all()


def test_training_batches_shard_by_rank_and_resume(models, tmp_path):
    """W ranks of batch B draw the rows one rank of batch W*B draws; batch i depends on (seed, i) alone."""
    rows = Rows(np.arange(1000) % 300, np.ones(1000, dtype=bool), np.arange(0, 1001, 10), np.full(100, 10), None)
    units = [np.array([d]) for d in range(100)]
    whole = ChatTrainBatches(rows, units, 8, seed=3)
    parts = [ChatTrainBatches(rows, units, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _, big, a, b in zip(range(30), whole, *parts):  # 30 batches of 8: past two passes over the 100 rows
        assert torch.equal(big.inputs, torch.cat([a.inputs, b.inputs]))
    later = next(iter(ChatTrainBatches(rows, units, 8, seed=3, start=17)))
    assert torch.equal(later.inputs, [b for _, b in zip(range(18), whole)][-1].inputs)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_fine_tuning_on_chat_lowers_the_masked_loss(finetune, models, make_cfg, tmp_path):
    import lmkit
    from lmkit.train import run

    records = [{"messages": c} if i % 10 else {"instruction": "backwards", "input": c[-2]["content"],
                                               "output": c[-1]["content"]} for i, c in enumerate(conversations(120))]
    data = write_jsonl(tmp_path / "chats.jsonl", records)
    cfg = make_cfg(f"init_from={models['qwen2']}", *TINY_CHAT, f"data.path={data}", "data.prompt_field=instruction",
                   "data.response_field=output", "data.input_field=input", f"finetune={finetune}",
                   "trainer.max_steps=30", "trainer.val_check_interval=30", "optim.warmup_steps=3",
                   f"optim.lr={3e-3 if finetune == 'full' else 1e-2}")
    metrics, objects = run(cfg)
    datamodule = objects["datamodule"]
    base = lmkit.load(models["qwen2"]).backbone
    nll = count = 0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            logits, _ = base(batch.inputs, documents=batch.documents)
            nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(),
                                                     reduction="sum").item()
            count += int((batch.targets != IGNORE).sum())
    before = nll / count  # the masked loss, over the same validation rows
    assert metrics["val_loss"] < 0.75 * before, (metrics["val_loss"], before)
    assert 0.3 < metrics["chat_masked_fraction"] < 0.9 and metrics["chat_packing_efficiency"] > 0.8
    trained = lmkit.load(metrics["last_ckpt"])
    assert trained.record.tokens["chat_template"] == QWEN2  # the template it learned travels with it
    im_end = trained.tokenizer.tokenizer.token_to_id("<|im_end|>")
    assert trained.record.tokens["eos_token_ids"] == [im_end]  # (already the model's end token: none added)


@pytest.mark.slow
def test_lora_on_chat_under_fsdp(models, tmp_path, cache_dir):
    """Two CPU processes, FSDP2 with LoRA on a meta-built base: each rank its slice of the packed rows (the slicing is
    checked above), the document mask through the sharded model, the masked loss reduced over both ranks."""
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in conversations(80)])
    result = run_train_py(f"init_from={models['qwen2']}", *TINY_CHAT, f"data.path={data}", "finetune=lora",
                          "data.batch_size=2", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                          "trainer.max_steps=4", "trainer.val_check_interval=4", "optim.warmup_steps=1",
                          run_dir=tmp_path / "run", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and np.isfinite(metrics["val_loss"]) and metrics["chat_conversations"] > 50


def test_bad_chat_inputs_are_one_line_each(models, tmp_path):
    def records(name: str, rows: list) -> Path:
        return write_jsonl(tmp_path / f"{name}.jsonl", [{"messages": c} for c in conversations(20)] + rows)

    mistral = tmp_path / "mistral.jinja"
    mistral.write_text(MISTRAL)
    long_reply = " ".join(["the moon and the rose"] * 60)
    cases = {
        "fields": ([f"init_from={models['qwen2']}", f"data.path={records('fields', [{'question': 'the moon'}])}"],
                   ["fields.jsonl, record 21: the record has neither a 'messages' list (data.messages_field) nor "
                    "string fields 'prompt' and 'response' (data.prompt_field, data.response_field); its fields: "
                    "question"]),
        "alternate": ([f"init_from={models['qwen2']}", f"data.path={records('alternate', [])}",
                       f"data.chat_template={mistral}"],
                      ["alternate.jsonl, record 1:", "Conversation roles must alternate user/assistant"]),
        "no_template": ([f"init_from={models['bare']}", f"data.path={records('no_template', [])}"],
                        ["no chat template, and no end-of-sequence token", "data.chat_template="]),
        "long": ([f"init_from={models['qwen2']}",
                  f"data.path={records('long', [{'prompt': 'the moon', 'response': long_reply}])}"],
                 ["long.jsonl, record 21: an assistant response of", "longer than data.seq_len=128"]),
        "masked": ([f"init_from={models['qwen2']}", "data.path=" + str(write_jsonl(
                    tmp_path / "masked.jsonl", [{"messages": [{"role": "user", "content": "the moon"}]}] * 5))],
                   ["every token of data.path=", "is masked: none of its 5 records has an assistant turn"]),
        "not_json": ([f"init_from={models['qwen2']}", f"data.path={tmp_path / 'broken.jsonl'}"],
                     ["broken.jsonl, record 2: not JSON"]),
    }
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    results = run_train_py_each({name: train_py_args(*overrides, *TINY_CHAT, run_dir=tmp_path / name / "run",
                                                     cache_dir=tmp_path / name / "cache")
                                 for name, (overrides, _) in cases.items()}, cwd=tmp_path)
    for name, (_, fragments) in cases.items():
        result = results[name]
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert_clean_error(result, *fragments, run_dir=tmp_path / name / "run")
        assert not list((tmp_path / name / "cache").rglob("*.tmp-*"))  # nothing half-written


def echo_conversations(prompts: list[str]) -> list[dict]:
    """One exchange each: the assistant answers the user's words backwards."""
    return [{"messages": [{"role": "user", "content": p},
                          {"role": "assistant", "content": " ".join(reversed(p.split()))}]} for p in prompts]


@pytest.mark.slow
def test_a_model_fine_tuned_on_chat_exports_and_serves_held_out_answers(models, make_cfg, tmp_path):
    """SFT -> export -> `lmkit serve`: the chat endpoint renders a conversation as training rendered it (the model's
    own template, recorded with it), and the fine-tuned model answers questions it never saw, each reply the
    question's words backwards, ending at its end-of-turn token."""
    pytest.importorskip("litserve")
    openai = pytest.importorskip("openai")
    import lmkit
    from lmkit.serve.chat import ChatFormat
    from lmkit.train import run
    from tests.helpers import free_port

    prompts = sorted({" ".join(p) for p in itertools.product(WORDS, repeat=2)} |
                     {" ".join(p) for p in itertools.product(WORDS, repeat=3)})
    held_out = prompts[::9]  # 28 of 252, kept out of training
    seen = [p for p in prompts if p not in held_out]
    data = write_jsonl(tmp_path / "chats.jsonl", echo_conversations(seen * 2))
    cfg = make_cfg(f"init_from={models['qwen2']}", *TINY_CHAT, f"data.path={data}",
                   "data.batch_size=8", "trainer.max_steps=200", "trainer.val_check_interval=200",
                   "optim.warmup_steps=10", "optim.lr=1e-2")  # (93% of the held-out answers right, measured)
    metrics, _ = run(cfg)
    out = save(lmkit.load(metrics["last_ckpt"]), tmp_path / "tuned")
    model = lmkit.load(out)
    question = [{"role": "user", "content": held_out[0]}]
    template = resolve_template(model.record.tokens, model.tokenizer)
    rendered = render_chat(question, "", tokenizer=model.tokenizer, template=template)
    reply_start = int(np.flatnonzero(rendered.labels != IGNORE)[0])
    # what the server renders for the question is what training rendered before a reply
    assert model.tokenizer.encode(ChatFormat.of(model).prompt(question)) == rendered.ids[:reply_start].tolist()
    server = Server(out, free_port(), "workers=2")  # two model processes behind one endpoint
    try:
        server.wait_ready()
        assert len(server.inference_workers()) == 2
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

        def ask(question: str):
            return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                                  max_tokens=12, temperature=0).choices[0]

        with ThreadPoolExecutor(4) as pool:  # concurrent, so both workers take requests
            answers = list(pool.map(ask, held_out))
    finally:
        server.stop()
    right = [a.message.content == " ".join(reversed(p.split())) and a.finish_reason == "stop"
             for p, a in zip(held_out, answers)]
    assert sum(right) >= 0.8 * len(held_out), [(p, a.message.content) for p, a in zip(held_out, answers)]
