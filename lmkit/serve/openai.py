"""OpenAI's HTTP schema: request bodies, their checks, responses and error JSON (chat prompts: `lmkit.serve.chat`).

Every check happens here, in the HTTP process, before a request reaches the model's worker: a bad
request is a 4xx with OpenAI's error body `{"error": {"message", "type", "param", "code"}}` and the
worker never sees it. Unknown fields are ignored (clients send options they do not need); options
that would change the output and that lmkit does not implement (`echo`, `logprobs`, penalties, ...)
are refused rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmkit.errors import LmkitError
from lmkit.generate import SEEDS
from lmkit.serve.chat import ChatFormat, TemplateRefusal
from lmkit.serve.engine import Job
from lmkit.serve.settings import Limits

MAX_STOPS = 4  # as OpenAI
MAX_PROMPTS = 2048  # prompts in one request, as OpenAI


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    return ApiError(status, message, param=param, type=kind if status < 500 else "server_error").body()


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class Options(BaseModel):
    """What /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)  # OpenAI's default
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)  # not OpenAI's, but vLLM's and lmkit generate's
    n: int = Field(1, ge=1)
    seed: Optional[int] = Field(None, ge=SEEDS[0], le=SEEDS[1])  # what torch's generators take (lmkit generate's)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # OpenAI options lmkit does not implement: accepted at their no-op values only
    logprobs: Optional[Union[bool, int]] = None
    echo: bool = False
    best_of: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    suffix: Optional[str] = None
    tools: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None


class CompletionRequest(Options):
    prompt: Union[str, list[str], list[int], list[list[int]]]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None


class ChatRequest(Options):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens


FIELDS = {name for model in (CompletionRequest, ChatRequest, Message, TextPart, StreamOptions)
          for name in model.model_fields}
UNSUPPORTED = {"logprobs": (None, False, 0), "echo": (False,), "best_of": (None, 1), "presence_penalty": (0,),
               "frequency_penalty": (0,), "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []),
               "response_format": (None, {"type": "text"})}

@dataclass
class Prepared:
    job: Job
    prompt_tokens: int
    chat: bool
    stream: bool
    include_usage: bool


def parse(body: Any, schema: type[Options]) -> Options:
    """A request body as `schema`, or a 400 naming the first bad field and its value."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        # the location without pydantic's union tags ("str", "list[int]"): field names and list indices
        param = ".".join(str(part) for part in first["loc"] if isinstance(part, int) or part in FIELDS) or None
        given = f" (got {first['input']!r})" if first["type"] != "missing" else ""
        raise ApiError(400, f"{param}: {first['msg']}{given}", param=param) from None


def prepare(request: Options, *, model_name: str, tokenizer: Any, vocab_size: int, limits: Limits,
            chat_format: ChatFormat = ChatFormat()) -> Prepared:
    """Check a parsed request against the model and the server's limits; tokenize its prompts (a conversation in
    the model's `chat_format`)."""
    if request.model != model_name:
        raise ApiError(404, f"model {request.model!r} is not served here; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    for name, allowed in UNSUPPORTED.items():
        value = getattr(request, name)
        if value not in allowed:
            raise ApiError(400, f"{name}={value!r} is not supported by lmkit serve", param=name)
    chat = isinstance(request, ChatRequest)
    max_tokens = (request.max_completion_tokens or request.max_tokens) if chat else request.max_tokens
    max_tokens = limits.max_tokens if max_tokens is None else max_tokens
    param = "max_completion_tokens" if chat and request.max_completion_tokens else "max_tokens"
    if max_tokens > limits.max_tokens_limit:
        raise ApiError(400, f"{param}={max_tokens} is above this server's limit of {limits.max_tokens_limit}",
                       param=param)
    if request.n > limits.max_n:
        raise ApiError(400, f"n={request.n} is above this server's limit of {limits.max_n}", param="n")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOPS or any(not s for s in stop):
        raise ApiError(400, f"stop={request.stop!r}: give at most {MAX_STOPS} non-empty strings", param="stop")
    if chat:
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                     "".join(p.text for p in m.content or [])} for m in request.messages]
        try:
            text = chat_format.prompt(messages)
        except TemplateRefusal as e:
            raise ApiError(400, f"messages: the model's chat template refuses them ({e})", param="messages") from None
        prompts = [tokenize(text, lambda t: chat_format.encode(t, tokenizer), "messages")]
        stop = stop if request.stop is not None else chat_format.default_stop
    else:
        prompts = prompt_ids(request.prompt, tokenizer, vocab_size)
    for i, ids in enumerate(prompts):
        if len(ids) > limits.max_prompt_tokens:
            where = "messages" if chat else "prompt" if len(prompts) == 1 else f"prompt.{i}"
            raise ApiError(400, f"{where}: {len(ids)} tokens, above this server's limit of {limits.max_prompt_tokens}",
                           param="messages" if chat else "prompt")
    job = Job(prompts=prompts, n=request.n, max_tokens=max_tokens, temperature=request.temperature,
              top_k=request.top_k, top_p=request.top_p if request.top_p < 1 else None, seed=request.seed, stop=stop)
    usage = request.stream_options is not None and request.stream_options.include_usage
    return Prepared(job, sum(len(p) for p in prompts), chat, request.stream, usage)


def prompt_ids(prompt: Any, tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """OpenAI's four prompt shapes: a text, texts, token ids, lists of token ids."""
    if isinstance(prompt, str):
        return [tokenize(prompt, tokenizer.encode, "prompt")]
    if not prompt:
        raise ApiError(400, "prompt is an empty list", param="prompt")
    if len(prompt) > MAX_PROMPTS and not isinstance(prompt[0], int):
        raise ApiError(400, f"prompt: {len(prompt)} prompts in one request, more than {MAX_PROMPTS}", param="prompt")
    if isinstance(prompt[0], str):
        return [tokenize(text, tokenizer.encode, f"prompt.{i}") for i, text in enumerate(prompt)]
    prompts = [prompt] if isinstance(prompt[0], int) else prompt
    for i, ids in enumerate(prompts):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if not ids or bad:
            raise ApiError(400, f"prompt.{i}: token ids must be in [0, {vocab_size}), got {bad[:3] or ids}",
                           param="prompt")
    return prompts


def tokenize(text: str, encode: Callable[[str], list[int]], param: str) -> list[int]:
    try:
        ids = encode(text)
    except LmkitError as e:  # a character tokenizer names the characters it lacks
        raise ApiError(400, f"{param}: {e}", param=param) from None
    if not ids:
        raise ApiError(400, f"{param} is empty: give at least one character", param=param)
    return ids


# --- responses -----------------------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(chat: bool, rid: str, model: str, texts: dict[int, str], reasons: dict[int, str],
             usage_: dict[str, int]) -> dict[str, Any]:
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                    "finish_reason": reasons[i]} for i in sorted(texts)]
    else:
        choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]} for i in sorted(texts)]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage_}


def chunk(chat: bool, rid: str, model: str, choices: list[dict[str, Any]], first: bool = False,
          usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed event; `choices` are the engine's `{"index", "text", "finish_reason"}`."""
    if chat:
        delta = lambda c: ({"role": "assistant", "content": c["text"]} if first else {"content": c["text"]})  # noqa: E731
        choices = [{"index": c["index"], "delta": delta(c), "logprobs": None, "finish_reason": c["finish_reason"]}
                   for c in choices]
    else:
        choices = [{"index": c["index"], "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}
                   for c in choices]
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
