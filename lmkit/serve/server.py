"""The main process of `lmkit serve`: LitServe started over the worker side (lmkit.serve.worker) and the HTTP side
(lmkit.serve.http), the URL printed once it answers, and every process stopped on SIGINT or SIGTERM.

LitServe spawns its inference workers (each loads the model) and forks its HTTP servers (uvicorn) from here; the
one thing they share beyond LitServe's own queues is a cancel queue per worker, made here, spawn-safe.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import urllib.request
from typing import Any

import litserve as ls

from lmkit.serve.chat import ChatFormat
from lmkit.serve.http import OpenAIEndpoints, install_error_handlers
from lmkit.serve.settings import ServeSettings
from lmkit.serve.worker import ModelAPI


def run(settings: ServeSettings, tokenizer: Any, chat: ChatFormat = ChatFormat()) -> None:
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


def announce_when_ready(settings: ServeSettings, stop: threading.Event) -> None:
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
