"""How /v1/chat/completions turns a conversation into a prompt: the model's own chat template when its tokenizer
brought one (`record.tokens["chat_template"]`, from an imported model's tokenizer_config.json), else a scene.

The scene, for a model trained on plays: each message is a speech headed by its speaker, and the reply is the next
speech, which ends at the blank line before the speech after it. So
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
becomes the prompt "SYSTEM:\nBe brief.\n\nUSER:\nWho art thou?\n\nASSISTANT:\n", and unless the request gives
`stop`, the reply stops at "\n\n". A model's own template is Jinja, rendered as transformers'
`apply_chat_template` renders it (a sandbox, `add_generation_prompt=True`); its reply ends at the model's
end-of-sequence token, which the engine stops at.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lmkit.errors import LmkitError

SCENE_STOP = ["\n\n"]


@dataclass(frozen=True)
class ChatFormat:
    """A model's chat format: plain strings, so the HTTP processes it is pickled to compile the template once each."""

    template: str | None = None  # Jinja source; None: the scene
    bos_token: str = ""  # what the template's `bos_token` and `eos_token` print
    eos_token: str = ""

    @classmethod
    def of(cls, model: Any) -> ChatFormat:
        """The format of a loaded model; a template that does not compile is one LmkitError line."""
        tokens = model.record.tokens
        if "chat_template" not in tokens:
            return cls()
        return cls.with_template(tokens["chat_template"], tokens, model.tokenizer)

    @classmethod
    def with_template(cls, template: str, tokens: dict[str, Any], tokenizer: Any) -> ChatFormat:
        """`template` (Jinja source) with the `bos_token` and `eos_token` of a model's token conventions (`tokens`,
        lmkit.record.TOKENS) and its (BPE) `tokenizer`; a template that does not compile is one LmkitError line."""
        vocab = tokenizer.tokenizer  # a template comes with a Hugging Face (BPE) tokenizer
        eos = tokens.get("eos_token_ids") or []
        chat = cls(template,
                   bos_token=vocab.id_to_token(tokens["bos_token_id"]) if "bos_token_id" in tokens else "",
                   eos_token=vocab.id_to_token(eos[0]) if eos else "")
        try:
            _compiled(chat.template)
        except Exception as e:  # jinja2's TemplateSyntaxError and friends
            raise LmkitError(f"the model's chat template does not compile ({type(e).__name__}: {e})") from None
        return chat

    @property
    def default_stop(self) -> list[str]:
        return [] if self.template else SCENE_STOP

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt for `messages` ({role, content} with text content), ending where the reply begins."""
        if self.template is None:
            return "".join(f"{m['role'].upper()}:\n{m['content']}\n\n" for m in messages) + "ASSISTANT:\n"
        return self.render(messages, add_generation_prompt=True)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        """The template's text for `messages`, as `apply_chat_template(..., tokenize=False)` renders it (with
        `add_generation_prompt`, ending where the reply begins). Its refusals, and its failures, are TemplateRefusal
        lines. (lmkit.data.chat renders training conversations through here.)"""
        try:
            return _compiled(self.template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateRefusal:
            raise
        except Exception as e:  # what the template's author did not foresee (a role, a missing key): the request's
            raise TemplateRefusal(f"{type(e).__name__}: {e}") from None

    def encode(self, text: str, tokenizer: Any) -> list[int]:
        """A rendered prompt's ids. A template writes its special tokens itself (Llama 3's starts with
        `bos_token`), so the tokenizer adds none, as transformers' `apply_chat_template` encodes."""
        if self.template is None:
            return tokenizer.encode(text)
        return tokenizer.tokenizer.encode(text, add_special_tokens=False).ids


@lru_cache(maxsize=4)
def _compiled(template: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # a template is data: it may not reach Python

    def raise_exception(message: str) -> None:
        raise TemplateRefusal(message)

    # transformers' environment: {% break %} / {% continue %}, and {% generation %} blocks (which mark the assistant's
    # text for its return_assistant_tokens_mask) rendered as their contents
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_generation(), loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


@lru_cache(maxsize=1)
def _generation() -> type:
    """The `{% generation %}...{% endgeneration %}` tag of transformers' chat templates, rendering its contents."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_contents"), [], [], body).set_lineno(lineno)

        def _contents(self, caller: Any) -> str:
            return caller()

    return Generation


class TemplateRefusal(ValueError):
    """The template's own `raise_exception(...)`: the conversation is not one it renders (a 400, its message)."""
