"""The LitServe side of `lmkit serve`: a LitAPI on LitServe's continuous batching loop, and the HTTP endpoints.

Processes (LitServe's): the main process checks the options and the model, then LitServe starts its
inference workers (spawned; each loads the model and runs an `Engine`) and its HTTP servers (uvicorn,
forked). An HTTP server checks and tokenizes a request, queues it on LitServe's request queue and
relays what the worker sends back; the worker's `ContinuousBatchingLoop` admits requests between
decoding steps while there are free rows, and sends each request's news (at most every
`stream_interval`).

What LitServe 0.2.19 does not give, added here in small pieces: the OpenAI endpoints beyond chat (its
`OpenAISpec` serves only /v1/chat/completions, always says finish_reason "stop", has no seed or
top_k and answers errors as `{"detail": ...}`), a way to tell a worker that a client went away (a
queue per worker that the HTTP side puts the request's id on), and three fixes to its continuous
batching loop (see `Loop`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import urllib.request
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import litserve as ls
import torch
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.loops.continuous_batching_loop import ContinuousBatchingLoop, Output
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmkit.serve import openai
from lmkit.serve.chat import ChatFormat
from lmkit.serve.engine import Engine, Job
from lmkit.serve.openai import ApiError, Limits

logger = logging.getLogger("lmkit.serve")
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds


@dataclass
class Settings:
    """`lmkit serve`'s options as the server needs them (conf/serve.yaml documents each)."""

    model: str
    name: str
    runtime: str
    device: str | None
    host: str
    port: int
    max_batch_size: int
    batch_timeout: float
    workers: int
    api_key: str | None
    limits: Limits
    stream_interval: float
    threads: int | None
    log_level: str


def load_model(path: str, runtime: str, device: str | None) -> Any:
    """The model behind the server: anything `lmkit.load` returns, torch or ONNX (one interface). The one
    place a runtime is chosen; `runtime` says which the user meant, so a mix-up is an error, not a surprise."""
    import lmkit
    from lmkit.deploy.onnx_runtime import is_onnx_export
    from lmkit.errors import LmkitError

    if runtime not in ("torch", "onnx"):
        raise LmkitError(f"runtime={runtime!r} is not one of torch, onnx")
    onnx = is_onnx_export(Path(path))
    if runtime == "torch" and onnx:
        raise LmkitError(f"{path} is an ONNX export: serve it with runtime=onnx")
    if runtime == "onnx" and not onnx:
        raise LmkitError(f"runtime=onnx: {path} is not an ONNX export (lmkit export format=onnx writes one)")
    return lmkit.load(path, device=device)


class CancelledIds:
    """Recently cancelled request ids, bounded: a cancel can overtake its request (still queued)."""

    def __init__(self, size: int = 4096) -> None:
        self.ids: OrderedDict[str, None] = OrderedDict()
        self.size = size

    def add(self, uid: str) -> None:
        self.ids[uid] = None
        while len(self.ids) > self.size:
            self.ids.popitem(last=False)


class Loop(ContinuousBatchingLoop):
    """LitServe's continuous batching loop with three fixes for 0.2.19: it waits for work when idle instead
    of spinning on the CPU; it steps until a step has news to send (LitServe's loop sleeps 10 ms after a
    step with none); and a request held back while the batch was full joins as soon as rows free up
    (LitServe's prefill retries held requests only after the next new request or a 1 s poll)."""

    _wake: asyncio.Event | None = None

    def _wakeup(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        return self._wake

    def add_request(self, uid: str, request: Any, lit_api: ls.LitAPI, lit_spec: Any, transport: Any = None) -> None:
        super().add_request(uid, request, lit_api, lit_spec, transport)
        self._wakeup().set()

    async def run(self, lit_api: ls.LitAPI, *args: Any) -> None:
        if not lit_api.has_active_requests():
            wake = self._wakeup()
            try:
                await asyncio.wait_for(wake.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                return
            wake.clear()
            if lit_api.batch_timeout:  # let more requests join the first step
                await asyncio.sleep(lit_api.batch_timeout)
        await super().run(lit_api, *args)

    async def prefill(self, pending_requests: list, lit_api: ls.LitAPI, lit_spec: Any, request_queue: Any,
                      transport: Any, **kwargs: Any) -> list:
        if not pending_requests:
            return await super().prefill(pending_requests, lit_api, lit_spec, request_queue, transport, **kwargs)
        while pending_requests and self.has_capacity(lit_api):  # as LitServe admits held requests
            response_queue_id, uid, request = pending_requests.pop(0)
            self.response_queue_ids[uid] = response_queue_id
            self.add_request(uid, request, lit_api, lit_spec, transport)
        if pending_requests:
            await asyncio.sleep(0.002)  # rows free up at the end of a step, every few ms
        return pending_requests

    async def step(self, prev_outputs: list[Output] | None, lit_api: ls.LitAPI, lit_spec: Any) -> list[Output]:
        return await asyncio.to_thread(self._steps, prev_outputs, lit_api)

    @staticmethod
    def _steps(prev_outputs: list[Output] | None, lit_api: ls.LitAPI) -> list[Output]:
        while True:
            outputs = lit_api.step(prev_outputs)
            if outputs or not lit_api.has_active_requests():
                return outputs


class ModelAPI(ls.LitAPI):
    """Runs in each inference worker: the engine, fed by LitServe's loop."""

    def __init__(self, settings: Settings, spec: LitSpec, cancels: list[Any]) -> None:
        super().__init__(max_batch_size=settings.max_batch_size, batch_timeout=settings.batch_timeout, spec=spec,
                         loop=Loop())
        self.settings = settings
        self.cancels = cancels  # one queue per worker: ids of requests whose client went away
        self.engine: Engine | None = None

    def setup(self, device: str) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the main process stops us
        s = self.settings
        logging.getLogger("litserve").setLevel(s.log_level.upper())  # a spawned worker starts with LitServe's INFO
        # one core stays with each worker's HTTP process; on a small machine a second torch thread only contends
        torch.set_num_threads(s.threads or max(1, ((os.cpu_count() or 1) - s.workers) // s.workers))
        self.start(load_model(s.model, s.runtime, s.device or device), int(os.environ.get("LITSERVE_WORKER_ID", "0")))

    def start(self, model: Any, worker: int) -> None:
        """The engine and its bookkeeping over a loaded model: `setup` after the process-wide settings (and tests)."""
        self.engine = Engine(model, max_rows=self.settings.max_batch_size)
        if self.engine.unbatched and worker == 0:
            print(f"lmkit serve: {self.settings.name} serves one request at a time: {self.engine.unbatched}",
                  file=sys.stderr, flush=True)
        self.cancel_queue = self.cancels[worker]
        self.cancelled = CancelledIds()  # cancels of requests this worker has not seen (yet)
        self.to_cancel: deque[str] = deque()  # cancels for the engine's next step
        self.unsent: dict[str, dict[str, Any]] = {}  # news not yet sent, by request
        self.last_sent: dict[str, float] = {}
        self.active: set[str] = set()  # requests given to the engine and not finished: what a failure must answer
        # add_request runs on LitServe's event loop, step in a thread of its own: a failed step's reset and its
        # answer to every active request must not interleave with a request being added (whose group would
        # stay in the engine with no one to answer)
        self.lock = threading.Lock()

    # LitServe's continuous batching hooks
    def add_request(self, uid: str, request: Job) -> None:
        with self.lock:
            self.active.add(uid)
            self.engine.arrive(uid, request)
        if uid in self.cancelled.ids:  # its client went away while it waited in LitServe's queue
            self.to_cancel.append(uid)

    def has_capacity(self) -> bool:
        return self.engine.has_capacity()

    def has_active_requests(self) -> bool:
        return self.engine.busy()

    def step(self, prev_outputs: list[Output] | None) -> list[Output]:
        self._drain_cancels()
        cancel = set()
        while self.to_cancel:
            cancel.add(self.to_cancel.popleft())
        try:
            news = self.engine.step(cancel)
        except Exception as e:  # a bug, not a bad request (those never get here): fail what is running, live on
            logger.exception("decoding step failed")
            with self.lock:  # every request the engine forgets is answered, and none added meanwhile is forgotten
                self.engine.reset()
                failed, self.active = self.active, set()
            self.unsent.clear()
            self.last_sent.clear()
            return [Output(uid, RuntimeError(f"decoding failed: {e}"), LitAPIStatus.ERROR) for uid in failed]
        for uid, update in news.items():
            if update.get("cancelled"):
                self.unsent.pop(uid, None)
            else:
                merge(self.unsent.setdefault(uid, {"choices": [], "done": False}), update)
        return self._due(news)

    def _due(self, news: dict[str, dict[str, Any]]) -> list[Output]:
        """Send a request's news when it has its first text, when it is done, and otherwise at most once per
        `stream_interval`: each message costs two process hops, and a char model makes thousands of tokens/s."""
        now, outputs = time.monotonic(), []
        for uid in [u for u, n in news.items() if n.get("cancelled")]:
            outputs.append(Output(uid, None, LitAPIStatus.FINISH_STREAMING))
            self.last_sent.pop(uid, None)
            self.active.discard(uid)
        for uid, update in list(self.unsent.items()):
            last = self.last_sent.get(uid)
            if not (update["done"] or last is None or now - last >= self.settings.stream_interval):
                continue
            if update["choices"] or update["done"]:
                outputs.append(Output(uid, self.unsent.pop(uid), LitAPIStatus.OK))
                self.last_sent[uid] = now
            if update["done"]:
                outputs.append(Output(uid, None, LitAPIStatus.FINISH_STREAMING))
                self.last_sent.pop(uid, None)
                self.active.discard(uid)
        return outputs

    def _drain_cancels(self) -> None:
        while True:
            try:
                uid = self.cancel_queue.get_nowait()
            except queue.Empty:
                return
            if self.engine.knows(uid):
                self.to_cancel.append(uid)
            else:  # not arrived yet, another worker's, or already done
                self.cancelled.add(uid)

    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        return output if output is not None else ""

    def authorize(self, request: Request) -> None:
        """Bearer-token auth on every endpoint but /health (which load balancers probe without a key)."""
        key = self.settings.api_key
        if not key or request.url.path == "/health":
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            what = "no API key given" if not given else "the API key is not this server's"
            raise ApiError(401, f"{what}: send the header 'Authorization: Bearer <api_key>'", type="authentication_error",
                           code="invalid_api_key")


class OpenAIEndpoints(LitSpec):
    """/v1/completions, /v1/chat/completions and /v1/models, in the HTTP processes."""

    def __init__(self, settings: Settings, tokenizer: Any, vocab_size: int, cancels: list[Any],
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


def merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    """Fold one step's news of a request into what is waiting to be sent: texts append, per choice."""
    choices = {c["index"]: c for c in into["choices"]}
    for c in update["choices"]:
        if c["index"] in choices:
            choices[c["index"]]["text"] += c["text"]
            choices[c["index"]]["finish_reason"] = c["finish_reason"]
        else:
            choices[c["index"]] = dict(c)
    into["choices"] = list(choices.values())
    into["done"] = update["done"]
    if "completion_tokens" in update:
        into["completion_tokens"] = update["completion_tokens"]


def sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event)}\n\n"


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


def announce_when_ready(settings: Settings, stop: threading.Event) -> None:
    """Print the URL once /health answers 200 (the workers have loaded the model and uvicorn listens)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(settings.host, settings.host)
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"http://{host}:{settings.port}/health", timeout=1) as r:
                if r.status == 200:
                    print(f"lmkit serve: {settings.name} at http://{settings.host}:{settings.port}/v1 "
                          "(OpenAI API; Ctrl-C stops)", flush=True)
                    return
        except OSError:
            pass
        stop.wait(0.2)


def run(settings: Settings, tokenizer: Any, chat: ChatFormat = ChatFormat()) -> None:
    """Serve until SIGINT or SIGTERM; `tokenizer` (the model's) checks and counts prompts in the HTTP processes, and
    `chat` (the model's) turns conversations into them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the HTTP processes are forked after tokenizing
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    context = mp.get_context("spawn")  # LitServe spawns its workers; their queues must be spawn-safe
    cancels = [context.Queue() for _ in range(settings.workers)]
    spec = OpenAIEndpoints(settings, tokenizer, tokenizer.vocab_size, cancels, chat)
    api = ModelAPI(settings, spec, cancels)
    device = settings.device or "cpu"
    server = ls.LitServer(api, accelerator="cuda" if device.startswith("cuda") else "cpu", devices=1,
                          workers_per_device=settings.workers, timeout=False)
    server.uvicorn_graceful_timeout = 5  # open streams get this long to finish when stopping
    install_error_handlers(server.app)

    main = os.getpid()

    def on_signal(signum: int, frame: Any) -> None:
        if os.getpid() != main:  # a forked process (uvicorn re-raises the signal once it has shut down): go quietly
            os._exit(0)
        raise KeyboardInterrupt  # LitServe's graceful shutdown, for SIGTERM as for Ctrl-C

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop = threading.Event()
    threading.Thread(target=announce_when_ready, args=(settings, stop), daemon=True).start()
    try:
        server.run(host=settings.host, port=settings.port, log_level=settings.log_level, generate_client_file=False)
    except KeyboardInterrupt:  # before LitServe's own handler was in place (while starting)
        pass
    finally:
        stop.set()
        for child in mp.active_children():  # whatever a stop during start-up left behind
            child.terminate()
            child.join(5)
    print("lmkit serve: stopped", file=sys.stderr, flush=True)
