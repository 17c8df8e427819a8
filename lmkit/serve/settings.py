"""`lmkit serve`'s options, one record: the command line fills it (conf/serve.yaml holds each key's default and
says what it does), the main process checks it, and every worker and HTTP process reads it (pickled).

Imports nothing heavy: `lmkit serve` reads it before LitServe or torch are imported, and `--help` without either.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Optional

from lmkit.errors import LmkitError

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass
class Limits:
    """The server's caps and defaults on a request, as the schema's checks (lmkit.serve.openai) take them."""

    max_tokens: int  # when a request gives none
    max_tokens_limit: int
    max_n: int
    max_prompt_tokens: int  # a longer prompt is refused before it reaches a worker


# Fields in conf/serve.yaml's order (tests/test_serve.py holds the two equal). Optional text is spelled
# `Optional[str]`: lmkit.cli.parse reads the spelling to let `null` unset it.
@dataclass
class ServeSettings:
    model: str
    name: Optional[str]  # `lmkit.serve.serve` fills it in (the model's folder or file name) before the server starts
    runtime: str
    device: Optional[str]
    host: str
    port: int
    max_batch_size: int
    batch_timeout: float
    workers: int
    threads: Optional[int]
    stream_interval: float
    api_key: Optional[str]
    max_tokens: int
    max_tokens_limit: int
    max_n: int
    max_prompt_tokens: int
    log_level: str

    @property
    def limits(self) -> Limits:
        return Limits(self.max_tokens, self.max_tokens_limit, self.max_n, self.max_prompt_tokens)

    def check(self) -> None:
        """Each wrong option as one line naming it; the port also when it is taken, before minutes of loading."""
        if self.runtime not in ("torch", "onnx"):
            raise LmkitError(f"runtime={self.runtime!r} is not one of torch, onnx")
        if self.host not in HOSTS:
            raise LmkitError(f"host={self.host!r}: LitServe binds only {', '.join(HOSTS)}")
        if not 1024 <= self.port <= 65535:
            raise LmkitError(f"port={self.port} is not in 1024-65535")
        for key in ("max_batch_size", "workers", "max_tokens", "max_tokens_limit", "max_n", "max_prompt_tokens"):
            if getattr(self, key) < 1:
                raise LmkitError(f"{key}={getattr(self, key)} must be at least 1")
        for key in ("batch_timeout", "stream_interval"):
            if getattr(self, key) < 0:
                raise LmkitError(f"{key}={getattr(self, key)} must not be negative")
        if self.threads is not None and self.threads < 1:
            raise LmkitError(f"threads={self.threads} must be at least 1 (or null)")
        if self.max_tokens > self.max_tokens_limit:
            raise LmkitError(f"max_tokens={self.max_tokens} is above max_tokens_limit={self.max_tokens_limit}")
        if self.log_level not in LOG_LEVELS:
            raise LmkitError(f"log_level={self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, self.port))
            except OSError as e:
                raise LmkitError(f"port={self.port}: cannot listen on {self.host}:{self.port} ({e.strerror})") from None
