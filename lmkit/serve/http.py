"""What runs in LitServe's HTTP processes (uvicorn, forked from the main process): the OpenAI endpoints, the API key
check and every error as OpenAI's JSON.

An endpoint checks and tokenizes a request (lmkit.serve.openai), puts it on LitServe's request queue and relays
what the worker sends back, streamed or collected; when a client goes away it puts the request's id on every
worker's cancel queue, so the rows decoding it are freed.

Added over LitServe 0.2.19, whose `OpenAISpec` serves only /v1/chat/completions, always says finish_reason "stop",
has no seed or top_k and answers errors as `{"detail": ...}`: /v1/completions, /v1/models, OpenAI's own
finish reasons and error bodies, and the cancel queues.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections import deque
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmkit.serve import openai
from lmkit.serve.chat import ChatFormat
from lmkit.serve.openai import ApiError
from lmkit.serve.settings import ServeSettings

logger = logging.getLogger("lmkit.serve")


class OpenAIEndpoints(LitSpec):
    """/v1/completions, /v1/chat/completions and /v1/models."""

    def __init__(self, settings: ServeSettings, tokenizer: Any, vocab_size: int, cancels: list[Any],
                 chat: ChatFormat = ChatFormat()) -> None:
        super().__init__()
        self.settings, self.tokenizer, self.vocab_size, self.cancels = settings, tokenizer, vocab_size, cancels
        self.chat = chat
        self.api_path = "/v1/completions"  # LitServe keys its request queue by this path
        self.created = int(time.time())
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])
        self.add_endpoint("/v1/models/{model_id}", self.model, ["GET"])

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["tokenizer"] = None  # the workers decode with their own model's tokenizer
        return state

    @property
    def stream(self) -> bool:
        return True  # LitServe's continuous batching loop streams; a plain response is collected here

    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output

    def _card(self) -> dict[str, Any]:
        return {"id": self.settings.name, "object": "model", "created": self.created, "owned_by": "lmkit"}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._card()]}

    async def model(self, model_id: str) -> dict[str, Any]:
        if model_id != self.settings.name:
            raise ApiError(404, f"model {model_id!r} is not served here; this server serves {self.settings.name!r}",
                           param="model", code="model_not_found")
        return self._card()

    async def completions(self, request: Request) -> Any:
        return await self._handle(request, openai.CompletionRequest)

    async def chat_completions(self, request: Request) -> Any:
        return await self._handle(request, openai.ChatRequest)

    async def _handle(self, request: Request, schema: type[openai.Options]) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        prepared = openai.prepare(openai.parse(body, schema), model_name=self.settings.name, tokenizer=self.tokenizer,
                                  vocab_size=self.vocab_size, limits=self.settings.limits,
                                  chat_format=self.chat)
        uid = uuid.uuid4().hex
        buffer, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=buffer)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), prepared.job))
        updates = self._updates(buffer, event)
        if prepared.stream:
            return StreamingResponse(self._stream(uid, updates, prepared), media_type="text/event-stream")
        return await self._collect(uid, updates, prepared, request)

    async def _updates(self, buffer: deque, event: asyncio.Event) -> AsyncIterator[dict[str, Any]]:
        async for data, status in self.data_streamer(buffer, event, send_status=True):
            if status == LitAPIStatus.ERROR:
                raise ApiError(500, "the model's worker failed on this request (the server's log says why)",
                               type="server_error")
            yield json.loads(data)

    def _cancel(self, uid: str) -> None:
        for cancels in self.cancels:  # the request's worker is not known here: tell them all
            cancels.put(uid)

    async def _stream(self, uid: str, updates: AsyncIterator[dict[str, Any]], p: openai.Prepared) -> AsyncIterator[str]:
        rid, name, done, seen = openai.new_id(p.chat), self.settings.name, False, set()
        try:
            async for news in updates:
                if news["choices"]:
                    first = [c for c in news["choices"] if c["index"] not in seen]
                    seen.update(c["index"] for c in first)
                    if p.chat and first:  # a chat choice's first delta names the role
                        yield sse(openai.chunk(True, rid, name, first, first=True))
                    rest = [c for c in news["choices"] if c not in first] if p.chat else news["choices"]
                    if rest:
                        yield sse(openai.chunk(p.chat, rid, name, rest))
                if news["done"]:
                    done = True
                    if p.include_usage:
                        yield sse(openai.chunk(p.chat, rid, name, [],
                                               usage_=openai.usage(p.prompt_tokens, news["completion_tokens"])))
            yield "data: [DONE]\n\n"
        except ApiError as e:
            done = True
            yield sse(e.body())
        finally:  # the client went away (or the stream ended): free the request's rows
            self.response_buffer.pop(uid, None)
            if not done:
                self._cancel(uid)

    async def _collect(self, uid: str, updates: AsyncIterator[dict[str, Any]], p: openai.Prepared,
                       request: Request) -> dict[str, Any]:
        watch = asyncio.create_task(self._watch(uid, request))
        texts: dict[int, str] = {i: "" for i in range(p.job.rows)}
        reasons: dict[int, str] = {}
        completion_tokens = 0
        try:
            async for news in updates:
                for c in news["choices"]:
                    texts[c["index"]] += c["text"]
                    if c["finish_reason"]:
                        reasons[c["index"]] = c["finish_reason"]
                completion_tokens = news.get("completion_tokens", completion_tokens)
        finally:
            watch.cancel()
            self.response_buffer.pop(uid, None)
        return openai.response(p.chat, openai.new_id(p.chat), self.settings.name, texts, reasons,
                               openai.usage(p.prompt_tokens, completion_tokens))

    async def _watch(self, uid: str, request: Request) -> None:
        """A client that hangs up on a plain (not streamed) request frees its rows too."""
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        self._cancel(uid)


def sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event)}\n\n"


def check_api_key(key: str | None, request: Request) -> None:
    """Bearer-token auth on every endpoint but /health (which load balancers probe without a key)."""
    if not key or request.url.path == "/health":
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        what = "no API key given" if not given else "the API key is not this server's"
        raise ApiError(401, f"{what}: send the header 'Authorization: Bearer <api_key>'", type="authentication_error",
                       code="invalid_api_key")


def install_error_handlers(app: Any) -> None:
    """Every error as OpenAI's JSON: ours, FastAPI's (404 routes, 405), and anything unexpected (500)."""

    def reply(status: int, body: dict[str, Any]) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(body, status_code=status, headers=headers)

    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return reply(e.status, e.body())

    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return reply(e.status_code, openai.error_body(e.status_code, str(e.detail)))

    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(x) for x in first["loc"][1:]) or None
        return reply(400, openai.error_body(400, f"{param}: {first['msg']}", param))

    async def server_error(request: Request, e: Exception) -> JSONResponse:
        logger.error("unexpected error on %s", request.url.path, exc_info=e)
        return reply(500, openai.error_body(500, f"internal error ({type(e).__name__}); the server's log says more"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)
