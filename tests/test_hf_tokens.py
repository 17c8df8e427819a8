"""What an imported tokenizer brings beyond its vocabulary: the end-of-sequence token generation stops at, and the
model's own chat template, against `transformers` (generate, AutoTokenizer.apply_chat_template) as the reference."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lmkit.errors import LmkitError
from lmkit.export import load, save
from lmkit.hf import export_hf, import_hf
from lmkit.serve import openai
from lmkit.serve.chat import ChatFormat
from lmkit.serve.engine import Engine
from lmkit.serve.settings import Limits
from tests.helpers import MESSAGES, PROMPT, V, chat_model_folder

def free_run(hf, ids: list[int]) -> list[int]:
    """transformers' 12 greedy tokens after `ids`, with no end token."""
    out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def drawn_end_token(new: list[int], at: int) -> int:
    """A token the model draws on its own, first at `at` or after: as end token, its first appearance ends a text."""
    return next(t for i, t in enumerate(new) if i >= at and t not in new[:i])


def test_generation_stops_at_the_end_of_sequence_token_as_transformers_does(tmp_path):
    hf, tok = chat_model_folder(tmp_path / "hf")
    ids = tok.encode(PROMPT)
    new = free_run(hf, ids)
    eos_id = drawn_end_token(new, 4)
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}))
    model = import_hf(tmp_path / "hf")
    assert model.record.tokens["eos_token_ids"] == [eos_id, tok.tokenizer.token_to_id("<|im_end|>")]
    text = model.generate(PROMPT, max_new_tokens=12, temperature=0)
    reference = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=eos_id,
                            pad_token_id=eos_id)[0].tolist()
    assert reference[-1] == eos_id and len(reference) < len(ids) + 12  # transformers stopped early, at eos
    assert text == tok.decode(reference[:-1])  # lmkit stopped there too, without the end token's text
    assert model.generate(PROMPT, max_new_tokens=12, temperature=0, num_samples=2) == [text, text]
    # the end token survives save and load, and format=hf
    save(model, tmp_path / "art")
    assert load(tmp_path / "art").generate(PROMPT, max_new_tokens=12, temperature=0) == text
    export_hf(load(tmp_path / "art"), tmp_path / "back")
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["eos_token_id"][0] == eos_id


def test_the_chat_template_renders_and_encodes_as_transformers(tmp_path):
    chat_model_folder(tmp_path / "hf")
    model = import_hf(tmp_path / "hf")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    chat = ChatFormat.of(model)
    expected = reference.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert chat.prompt(MESSAGES) == expected and expected.startswith("<s><|im_start|>system\n")
    expected_ids = reference(expected, add_special_tokens=False)["input_ids"]
    request = openai.ChatRequest(model="m", messages=MESSAGES)
    limits = Limits(max_tokens=8, max_tokens_limit=8, max_n=1, max_prompt_tokens=64)
    job = openai.prepare(request, model_name="m", tokenizer=model.tokenizer, vocab_size=V, limits=limits,
                         chat_format=chat).job
    assert job.prompts == [expected_ids] and job.stop == []  # the reply ends at <|im_end|>, not at a blank line
    # format=hf writes the template and the end token back where transformers reads them
    export_hf(model, tmp_path / "back")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == expected
    assert back.eos_token == "<|im_end|>" and back.bos_token == "<s>"


def test_the_server_engine_ends_a_reply_at_the_end_token(tmp_path):
    hf, tok = chat_model_folder(tmp_path / "hf")
    eos_id = drawn_end_token(free_run(hf, tok.encode(PROMPT)), 3)
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}))
    model = import_hf(tmp_path / "hf")
    engine = Engine(model, max_rows=4)
    engine.arrive("r", openai.Job(prompts=[tok.encode(PROMPT)], n=2, max_tokens=12, temperature=0))
    texts, reasons = {}, {}
    while engine.busy():
        for news in engine.step().values():
            for c in news["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    expected = model.generate(PROMPT, max_new_tokens=12, temperature=0)[len(PROMPT):]
    assert texts == {0: expected, 1: expected} and reasons == {0: "stop", 1: "stop"}


def test_a_template_that_does_not_compile_is_one_line(tmp_path):
    chat_model_folder(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{% for %}"}))
    with pytest.raises(LmkitError, match="^the model's chat template does not compile"):
        ChatFormat.of(import_hf(tmp_path / "hf"))


def test_a_template_that_refuses_a_conversation_is_a_400(tmp_path):
    chat_model_folder(tmp_path / "hf")
    model = import_hf(tmp_path / "hf")
    model.record.tokens["chat_template"] = "{{ raise_exception('roles must alternate') }}"
    request = openai.ChatRequest(model="m", messages=MESSAGES)
    with pytest.raises(openai.ApiError, match="roles must alternate"):
        openai.prepare(request, model_name="m", tokenizer=model.tokenizer, vocab_size=V,
                       limits=Limits(8, 8, 1, 64), chat_format=ChatFormat.of(model))
