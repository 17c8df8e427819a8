"""`lmkit serve`: an OpenAI-compatible HTTP server for any model `lmkit.load` returns, on LitServe.

    settings.py  the options (ServeSettings: the command line's record, which the server reads) and their checks
    engine.py    continuous batching over the loaded-model interface (torch and lmkit.generate only)
    openai.py    OpenAI's request/response schema, its checks, error JSON
    chat.py      a conversation as a prompt: the model's own chat template, or a scene for a model trained on plays
    worker.py    the inference worker process: the LitAPI over an Engine, on LitServe's continuous batching loop
    http.py      the HTTP processes: the OpenAI endpoints, the API key, errors as OpenAI's JSON
    server.py    the main process: LitServe started over both, stopped on a signal

LitServe (the `serve` extra) is imported only here, when serving.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lmkit.errors import LmkitError
from lmkit.serve.settings import ServeSettings


def serve(settings: ServeSettings) -> None:
    """Serve `settings.model` (defaults in conf/serve.yaml) until SIGINT or SIGTERM."""
    try:
        import litserve  # noqa: F401
    except ImportError:
        raise LmkitError("lmkit serve needs LitServe, which is not installed: pip install 'lmkit[serve]'") from None
    from lmkit.serve.chat import ChatFormat
    from lmkit.serve.server import run
    from lmkit.serve.worker import load_model

    settings.check()
    model = load_model(settings.model, settings.runtime, settings.device)
    if not getattr(model, "has_tokenizer", True):
        raise LmkitError(f"{settings.model} has no tokenizer: lmkit serve takes and returns text")
    tokenizer, chat = model.tokenizer, ChatFormat.of(model)
    del model  # the workers load their own; this process only tokenizes
    path = Path(settings.model)
    name = settings.name or (path.resolve().name if path.is_dir() else path.stem)
    run(replace(settings, name=name), tokenizer, chat)
