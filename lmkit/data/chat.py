"""Conversations and instruction records as training examples: a chat template's text, its token ids, and which of
them the model learns to write (the assistant turns, each with its end-of-turn token).

    render_chat(prompt, response=None, *, tokenizer, template) -> Rendered(ids, labels)

is the one function supervised fine-tuning (`data=chat`, lmkit.data.chat_datamodule) and preference data build on.
A conversation is rendered as `transformers`' `apply_chat_template(messages, tokenize=False)` renders it, through the
same Jinja sandbox `lmkit serve` uses (lmkit.serve.chat.ChatFormat), then tokenized whole, with no special tokens
added, as `apply_chat_template(..., tokenize=True)` tokenizes it: the ids are transformers' ids.

Which characters an assistant turn wrote is read off the template itself, without markers in it: the text of the
conversation up to that turn with `add_generation_prompt=True` (the prompt the model sees at inference) is a prefix
of the text up to and including the turn; what lies between is the turn, as the template writes it (the reply and
the template's end of turn: ChatML's `<|im_end|>\\n`, Llama 3's `<|eot_id|>`, the default's end-of-sequence token).
Those characters' tokens are the labels; a token that straddles the turn's first character (a SentencePiece word
with its leading space) is one. A template that rewrites earlier turns once later ones follow (one that drops past
reasoning) has no such prefixes, and is refused in one line.

The default template, for a model that brings none (one lmkit trained, GPT-2): ChatML's layout, each turn closed
by the model's own end-of-sequence token, which generation already stops at; see `DEFAULT_CHAT_TEMPLATE`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lmkit.data.tokenizer import END_OF_TEXT, Tokenizer
from lmkit.errors import LmkitError
from lmkit.serve.chat import ChatFormat, TemplateRefusal, _compiled

IGNORE = -100  # a label that is not learned: F.cross_entropy's default ignore_index

# ChatML's layout (Qwen2's, SmolLM2's) with the model's own end-of-sequence token ending each turn: the role headers
# are plain text to a vocabulary without <|im_start|>, and the end of a reply is the one token a model without a
# template already ends its texts with (lmkit's BPE and GPT-2: <|endoftext|>), so `lmkit generate` and `lmkit serve`
# stop there. A fine-tuned model records the template it learned (tokens.chat_template), and `lmkit serve` uses it.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


class Rendered(NamedTuple):
    """A rendered conversation: `ids` (int64), and `labels`, `ids` where the token belongs to a learned assistant
    turn and IGNORE (-100) elsewhere; aligned with `ids`, not shifted (the model predicts labels[k] from ids[:k])."""
    ids: np.ndarray
    labels: np.ndarray


Messages = Sequence[Mapping[str, Any]]


def resolve_template(tokens: Mapping[str, Any], tokenizer: Tokenizer, setting: str | None = None) -> ChatFormat:
    """The chat format a model is trained with: `setting` (data.chat_template: Jinja source, or the path of a file of
    it) when given, else the model's own (`tokens["chat_template"]`, lmkit.record.TOKENS), else
    DEFAULT_CHAT_TEMPLATE, which needs an end-of-sequence token (`tokens["eos_token_ids"]`, or the tokenizer's
    END_OF_TEXT). One LmkitError line when there is none, or the tokenizer cannot carry a template."""
    if not hasattr(tokenizer, "tokenizer"):
        raise LmkitError(f"data=chat needs a tokenizer with special tokens (a byte-level BPE, as Hugging Face models "
                         f"and lmkit's tokenizer=bpe have); this model's is {tokenizer.kind!r}")
    tokens = dict(tokens)
    if not tokens.get("eos_token_ids") and tokenizer.end_of_text_id is not None:
        tokens["eos_token_ids"] = [tokenizer.end_of_text_id]
    if setting:
        template = _template_setting(setting)
    elif tokens.get("chat_template"):
        template = tokens["chat_template"]
    elif tokens.get("eos_token_ids"):
        template = DEFAULT_CHAT_TEMPLATE
    else:
        raise LmkitError("the model has no chat template, and no end-of-sequence token to end the turns of lmkit's "
                         f"default template with (its tokenizer lacks {END_OF_TEXT}): give one, "
                         "data.chat_template=FILE.jinja (Jinja, as Hugging Face's chat_template)")
    return ChatFormat.with_template(template, tokens, tokenizer)


def _template_setting(setting: str) -> str:
    if "{" in setting:  # Jinja source
        source = setting
    else:
        path = Path(setting).expanduser()
        if not path.is_file():
            raise LmkitError(f"data.chat_template={setting}: no such file (give a Jinja file or Jinja source)")
        source = path.read_text(encoding="utf-8")
    try:
        _compiled(source)
    except Exception as e:  # jinja2's TemplateSyntaxError and friends
        raise LmkitError(f"data.chat_template does not compile ({type(e).__name__}: {e})") from None
    return source


def render_chat(prompt: str | Messages, response: str | Messages | None = None, *, tokenizer: Tokenizer,
                template: ChatFormat) -> Rendered:
    """Render a conversation with `template` (see `resolve_template`) and tokenize it with `tokenizer` (its ids equal
    `apply_chat_template(messages, tokenize=True)`'s), labelling the assistant turns the model learns.

    `prompt`: a list of messages ({"role", "content"}, OpenAI's shape; content a string or a list of text parts), or
    a string (one user message). `response`: None, to learn every assistant turn of `prompt` (supervised
    fine-tuning on whole conversations); or a string (one assistant message) or a list of messages, appended to
    `prompt`, to learn the assistant turns of `response` alone, the prompt's own being context (instruction records;
    preference pairs, rendered once with the chosen and once with the rejected response: both share the prompt's
    ids). A turn's labels hold what the template writes for it after the generation prompt: the reply and its
    end-of-turn token. A conversation with no assistant turn to learn has no labels (all IGNORE).

    One LmkitError line (without the record's location, which the caller adds) for a malformed message, the
    template's refusal (its `raise_exception` message: roles that do not alternate, say), or a template whose text
    for the turns before an assistant turn changes once that turn follows."""
    before = _messages(prompt, "user")
    after = _messages(response, "assistant") if response is not None else []
    messages = before + after
    first = len(before) if response is not None else 0
    learned = [i for i in range(first, len(messages)) if messages[i]["role"] == "assistant"]
    try:
        text = template.render(messages, add_generation_prompt=False)
        spans = []
        for i in learned:
            start = template.render(messages[:i], add_generation_prompt=True)
            end = template.render(messages[:i + 1], add_generation_prompt=False)
            if not (end.startswith(start) and text.startswith(end)):
                raise LmkitError(f"the chat template renders the turns before assistant message {i + 1} differently "
                                 "once it follows, so its reply cannot be told apart from the prompt: give a template "
                                 "whose texts grow turn by turn (data.chat_template=FILE.jinja)")
            spans.append((len(start), len(end)))
    except TemplateRefusal as e:
        raise LmkitError(f"the chat template refuses the conversation: {e}") from None
    encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.int64)
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    if spans and len(ids):
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        learn = np.zeros(len(ids), dtype=bool)
        for a, b in spans:  # a token is learned when its characters overlap the turn's
            learn |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
        labels[learn] = ids[learn]
    return Rendered(ids, labels)


def _messages(value: str | Messages, role: str) -> list[dict[str, Any]]:
    """`value` as a list of messages with string content (a string: one message of `role`)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, Sequence) or not value:
        raise LmkitError(f"a conversation must be a non-empty list of messages or a string, got {_short(value)}")
    out = []
    for n, message in enumerate(value, start=1):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise LmkitError(f"message {n} is not an object with a string 'role': {_short(message)}")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI's content parts: the text ones, joined (as lmkit serve reads them)
            content = "".join(p["text"] for p in content
                              if isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str))
        if not isinstance(content, str):
            raise LmkitError(f"message {n} ({message['role']}) has no string 'content': {_short(message)}")
        out.append({**message, "content": content})
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def end_of_turn_ids(rendered: Rendered, tokenizer: Tokenizer) -> list[int]:
    """The special tokens a rendered conversation's learned turns hold (the template's end of turn: <|im_end|>,
    <|eot_id|>, the end-of-sequence token), in order of appearance: what generation should stop at."""
    special = {i for i, t in tokenizer.tokenizer.get_added_tokens_decoder().items() if t.special}
    seen: list[int] = []
    for token in rendered.labels[rendered.labels != IGNORE].tolist():
        if token in special and token not in seen:
            seen.append(token)
    return seen


def record_messages(record: Any, fields: Mapping[str, str | None]) -> tuple[str | Messages, str | Messages | None]:
    """The `(prompt, response)` of one record for render_chat: a conversation (`fields["messages"]`: its messages,
    None), or an instruction record (`fields["prompt"]` and `fields["response"]`, with `fields["input"]` appended to
    the prompt after a blank line and `fields["system"]` as a system message when those are named and present).
    One LmkitError line (without location) for a record with neither shape."""
    if not isinstance(record, Mapping):
        raise LmkitError(f"the record is not an object: {_short(record)}")
    key = fields.get("messages")
    if key and record.get(key) is not None:
        return record[key], None
    prompt, response = record.get(fields["prompt"]), record.get(fields["response"])
    if not isinstance(prompt, str) or not isinstance(response, str):
        wanted = (f"string fields {fields['prompt']!r} and {fields['response']!r} "
                  "(data.prompt_field, data.response_field)")
        wanted = f"neither a {key!r} list (data.messages_field) nor {wanted}" if key else f"no {wanted}"
        raise LmkitError(f"the record has {wanted}; its fields: {', '.join(map(str, record)) or 'none'}")
    extra = record.get(fields["input"]) if fields.get("input") else None
    if isinstance(extra, str) and extra:
        prompt = f"{prompt}\n\n{extra}"
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    system = record.get(fields["system"]) if fields.get("system") else None
    if isinstance(system, str) and system:
        messages.insert(0, {"role": "system", "content": system})
    return messages, response
