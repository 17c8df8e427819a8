"""`lmkit serve`: an OpenAI-compatible HTTP server for any model `lmkit.load` returns, on LitServe.

    engine.py   continuous batching over the loaded-model interface (torch and lmkit.generate only)
    openai.py   OpenAI's request/response schema, its checks, the chat template, error JSON
    server.py   the LitAPI, LitServe's continuous batching loop and the HTTP endpoints

LitServe (the `serve` extra) is imported only here, when serving.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from lmkit.errors import LmkitError

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def serve(a: Any) -> None:
    """Serve `a.model` (options: lmkit.cli.ServeArgs, defaults in conf/serve.yaml) until SIGINT or SIGTERM."""
    try:
        import litserve  # noqa: F401
    except ImportError:
        raise LmkitError("lmkit serve needs LitServe, which is not installed: pip install 'lmkit[serve]'") from None
    from lmkit.serve.chat import ChatFormat
    from lmkit.serve.openai import Limits
    from lmkit.serve.server import HOSTS, Settings, load_model, run

    check(a, HOSTS)
    model = load_model(a.model, a.runtime, a.device)
    if not getattr(model, "has_tokenizer", True):
        raise LmkitError(f"{a.model} has no tokenizer: lmkit serve takes and returns text")
    tokenizer, chat = model.tokenizer, ChatFormat.of(model)
    del model  # the workers load their own; this process only tokenizes
    path = Path(a.model)
    settings = Settings(model=a.model, name=a.name or (path.resolve().name if path.is_dir() else path.stem),
                        runtime=a.runtime, device=a.device, host=a.host, port=a.port, max_batch_size=a.max_batch_size,
                        batch_timeout=a.batch_timeout, workers=a.workers, api_key=a.api_key or None,
                        limits=Limits(a.max_tokens, a.max_tokens_limit, a.max_n, a.max_prompt_tokens),
                        stream_interval=a.stream_interval, threads=a.threads, log_level=a.log_level)
    run(settings, tokenizer, chat)


def check(a: Any, hosts: tuple[str, ...]) -> None:
    """The options, each wrong one as one line naming it."""
    if a.runtime not in ("torch", "onnx"):
        raise LmkitError(f"runtime={a.runtime!r} is not one of torch, onnx")
    if a.host not in hosts:
        raise LmkitError(f"host={a.host!r}: LitServe binds only {', '.join(hosts)}")
    if not 1024 <= a.port <= 65535:
        raise LmkitError(f"port={a.port} is not in 1024-65535")
    for key in ("max_batch_size", "workers", "max_tokens", "max_tokens_limit", "max_n", "max_prompt_tokens"):
        if getattr(a, key) < 1:
            raise LmkitError(f"{key}={getattr(a, key)} must be at least 1")
    for key in ("batch_timeout", "stream_interval"):
        if getattr(a, key) < 0:
            raise LmkitError(f"{key}={getattr(a, key)} must not be negative")
    if a.threads is not None and a.threads < 1:
        raise LmkitError(f"threads={a.threads} must be at least 1 (or null)")
    if a.max_tokens > a.max_tokens_limit:
        raise LmkitError(f"max_tokens={a.max_tokens} is above max_tokens_limit={a.max_tokens_limit}")
    if a.log_level not in LOG_LEVELS:
        raise LmkitError(f"log_level={a.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((a.host, a.port))
        except OSError as e:
            raise LmkitError(f"port={a.port}: cannot listen on {a.host}:{a.port} ({e.strerror})") from None
