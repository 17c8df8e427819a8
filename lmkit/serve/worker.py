"""What runs in each of LitServe's inference workers (spawned): the model behind an `Engine`, fed by LitServe's
continuous batching loop.

The loop admits requests between decoding steps while the engine has free rows, and sends each request's news
(at most every `stream_interval`) back to the HTTP process that queued it. A request whose client went away
arrives as its id on this worker's cancel queue (the HTTP side has no other way to reach a worker).

LitServe 0.2.19's loop needs three fixes, made in `Loop`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from fastapi import Request
from litserve.loops.continuous_batching_loop import ContinuousBatchingLoop, Output
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus

from lmkit.serve.engine import Engine, Job
from lmkit.serve.http import check_api_key
from lmkit.serve.settings import ServeSettings

logger = logging.getLogger("lmkit.serve")


def load_model(path: str, runtime: str, device: str | None) -> Any:
    """The model behind the server: anything `lmkit.load` returns, torch or ONNX (one interface). The one
    place a runtime is chosen; `runtime` (torch or onnx: ServeSettings.check) says which the user meant, so a
    mix-up is an error, not a surprise."""
    import lmkit
    from lmkit.deploy.onnx_runtime import is_onnx_export
    from lmkit.errors import LmkitError

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

    def __init__(self, settings: ServeSettings, spec: LitSpec, cancels: list[Any]) -> None:
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
        # LitServe looks for auth on the LitAPI, but calls it in the HTTP processes, before a request is queued
        check_api_key(self.settings.api_key, request)


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
