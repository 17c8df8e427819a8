"""`lmkit serve`: a real server on 127.0.0.1 in a subprocess, spoken to with the official `openai` client and
raw HTTP; the batching engine alone against `InferenceModel.generate`.

One server for the module (starting one takes seconds): a tiny LSTM with random weights, API key on,
8 rows per batch (so 32 clients queue and rows join and leave mid-flight), a high max_tokens_limit (so a
stream nobody reads would run for minutes: the disconnect test sees whether its rows were freed).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

pytest.importorskip("litserve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from omegaconf import OmegaConf  # noqa: E402

from lmkit.cli import _serve  # noqa: E402
from lmkit.errors import LmkitError  # noqa: E402
from lmkit.export import save  # noqa: E402
from lmkit.inference import InferenceModel  # noqa: E402
from lmkit.serve.engine import Engine, Job, held_back  # noqa: E402
from lmkit.serve.chat import ChatFormat  # noqa: E402
from lmkit.serve.http import OpenAIEndpoints  # noqa: E402
from lmkit.serve.settings import ServeSettings  # noqa: E402
from lmkit.serve.worker import ModelAPI  # noqa: E402
from litserve.utils import LitAPIStatus  # noqa: E402
from tests.helpers import CHARS, CONF, KEY, LMKIT, NAME, Server, free_port, lively, tiny_lm  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """This module's in-process decoding is one row or a few: a second torch thread only contends (with the
    server, on a 2-core machine) and made the engine test 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(lively(tiny_lm("lstm")), tmp_path_factory.mktemp("serve") / NAME)


@pytest.fixture(scope="module")
def server(model_dir: Path):
    server = Server(model_dir, free_port(), "max_batch_size=8", "max_tokens_limit=100000", "max_n=4",
                    "max_prompt_tokens=64")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server: Server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> InferenceModel:
    import lmkit

    return lmkit.load(model_dir)


def post(server: Server, path: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=60, **kwargs)


# --- the server --------------------------------------------------------------------------------------------

def test_health_models_and_auth(server):
    assert httpx.get(server.url + "/health").text == "ok"  # load balancers probe without a key
    models = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [NAME]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = httpx.get(server.url + "/v1/models", headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert post(server, "/v1/completions", {"model": NAME, "prompt": "A"}, key=None).status_code == 401


def test_greedy_completion_is_lmkit_generates(server, client, model_dir):
    result = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=30, temperature=0)
    cli = subprocess.run([str(LMKIT), "generate", f"model={model_dir}", "prompt=ROMEO:", "max_new_tokens=30",
                          "temperature=0"], capture_output=True, text=True, check=True)
    assert cli.stdout == "ROMEO:" + result.choices[0].text + "\n"
    assert result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (6, 30, 36)


def test_seeded_sampling_is_generates(client, model):
    options = dict(max_tokens=25, temperature=0.9, top_p=0.9, seed=7)
    one = client.completions.create(model=NAME, prompt="ROMEO:", extra_body={"top_k": 12}, **options)
    want = model.generate("ROMEO:", max_new_tokens=25, temperature=0.9, top_k=12, top_p=0.9, seed=7)
    assert "ROMEO:" + one.choices[0].text == want
    two = client.completions.create(model=NAME, prompt="ROMEO:", n=2, extra_body={"top_k": 12}, **options)
    want = model.generate("ROMEO:", max_new_tokens=25, temperature=0.9, top_k=12, top_p=0.9, num_samples=2, seed=7)
    assert ["ROMEO:" + c.text for c in sorted(two.choices, key=lambda c: c.index)] == want
    assert two.choices[0].text != two.choices[1].text and two.usage.completion_tokens == 50
    # the seeds torch takes, to its ends (a negative seed s is 2**64 + s, in lmkit generate too); beyond: a 400
    edge = client.completions.create(model=NAME, prompt="A", max_tokens=5, temperature=0.9, seed=2**64 - 1)
    assert "A" + edge.choices[0].text == model.generate("A", max_new_tokens=5, temperature=0.9, seed=-1)
    with pytest.raises(LmkitError, match=r"seed=18446744073709551616 is out of range"):
        model.generate("A", seed=2**64)


def test_streaming_completion_and_chat(server, client):
    whole = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=40, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 40
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=30, temperature=0)
    streamed = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=30, temperature=0,
                                                   stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    raw = post(server, "/v1/chat/completions", {"model": NAME, "messages": messages, "max_tokens": 5, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_chat_is_the_documented_template(client):
    messages = [{"role": "user", "content": "Who art thou?"}]
    prompt = ChatFormat().prompt(messages)
    assert prompt == "USER:\nWho art thou?\n\nASSISTANT:\n"
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=60, temperature=0)
    completion = client.completions.create(model=NAME, prompt=prompt, max_tokens=60, temperature=0, stop=["\n\n"])
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.choices[0].finish_reason == completion.choices[0].finish_reason


def test_stop_sequences(client):
    whole = client.completions.create(model=NAME, prompt="BEN:", max_tokens=60, temperature=0).choices[0].text
    stop = next(whole[i:i + 2] for i in range(3, len(whole) - 2) if whole[i:i + 2] not in whole[:i + 1])
    cut = whole[:whole.index(stop)]
    result = client.completions.create(model=NAME, prompt="BEN:", max_tokens=60, temperature=0, stop=[stop, "#"])
    assert (result.choices[0].text, result.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model=NAME, prompt="BEN:", max_tokens=60, temperature=0, stop=stop,
                                         stream=True)
    pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in streamed]
    assert "".join(text for text, _ in pieces) == cut and pieces[-1][1] == "stop"


def test_n_and_a_list_of_prompts(client, model):
    result = client.completions.create(model=NAME, prompt=["A", "ROMEO:"], n=2, max_tokens=10, temperature=0)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    want = [model.generate(p, max_new_tokens=10, temperature=0)[len(p):] for p in ("A", "A", "ROMEO:", "ROMEO:")]
    assert [c.text for c in result.choices] == want
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (7, 40)
    ids = client.completions.create(model=NAME, prompt=model.encode("ROMEO:"), max_tokens=10, temperature=0)
    assert ids.choices[0].text == want[2]


def test_32_concurrent_clients_all_answered_as_if_alone(server, model):
    """8 rows per batch: requests queue, join mid-flight and leave; each still decodes as it would alone."""
    prompts = ["A", "ROMEO:", "Be it so, my lord", "O"]
    want = {p: model.generate(p, max_new_tokens=20, temperature=0)[len(p):] for p in prompts}

    async def clients() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
            async def one(i: int) -> tuple[str, str]:
                prompt = prompts[i % len(prompts)]
                stream = await c.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0,
                                                    stream=True)
                return prompt, "".join([chunk.choices[0].text async for chunk in stream])

            return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(clients())
    assert len(results) == 32 and all(text == want[prompt] for prompt, text in results)


BAD = [  # (path, body, status, param)
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/completions", {"model": NAME}, 400, "prompt"),
    ("/v1/completions", {"prompt": "A"}, 400, "model"),
    ("/v1/completions", {"model": NAME, "prompt": "A", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "A", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "A", "max_tokens": 100001}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "A", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "A", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "A", "n": 5}, 400, "n"),
    ("/v1/completions", {"model": NAME, "prompt": "A", "seed": 2**64}, 400, "seed"),
    ("/v1/completions", {"model": NAME, "prompt": "A", "seed": -2**63 - 1}, 400, "seed"),
    ("/v1/completions", {"model": NAME, "prompt": "A", "seed": 1.5}, 400, "seed"),
    ("/v1/completions", {"model": NAME, "prompt": "A", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "A", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": NAME, "prompt": "Déjà vu"}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [9999]}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "A" * 65}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [[1], [1] * 65]}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "A"}, 404, "model"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_an_openai_error_and_the_server_lives_on(server, client, path, body, status, param):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param"} and error["param"] == param and error["message"]
    assert client.completions.create(model=NAME, prompt="A", max_tokens=3, temperature=0).choices[0].text


def test_bad_input_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens=100001 is above this server's limit of 100000"):
        client.completions.create(model=NAME, prompt="A", max_tokens=100001)
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' is not served here"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_a_client_that_hangs_up_frees_its_rows(server, client):
    """8 streams of 100000 tokens fill the batch; if hanging up did not free their rows, the next request
    would wait minutes behind them."""
    body = {"model": NAME, "prompt": "A", "max_tokens": 100000, "stream": True}
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
        for _ in range(8):
            with http.stream("POST", server.url + "/v1/completions", json=body) as stream:
                assert next(stream.iter_lines()).startswith("data: ")
    started = time.monotonic()
    quick = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    assert len(quick.completions.create(model=NAME, prompt="A", max_tokens=5).choices[0].text) == 5
    assert time.monotonic() - started < 30


def test_option_errors_are_one_line(model_dir, server, monkeypatch):
    for args, message in [(["runtime=onnx"], f"runtime=onnx: {model_dir} is not an ONNX export"),
                          (["runtime=tf"], "runtime='tf' is not one of torch, onnx"),
                          (["host=localhost"], "host='localhost': LitServe binds only 127.0.0.1, 0.0.0.0, ::"),
                          (["port=80"], "port=80 is not in 1024-65535"),
                          ([f"port={server.port}"], f"port={server.port}: cannot listen on 127.0.0.1:{server.port}"),
                          (["max_batch_size=0"], "max_batch_size=0 must be at least 1"),
                          (["max_tokens=500", "max_tokens_limit=100"], "max_tokens=500 is above max_tokens_limit")]:
        with pytest.raises(LmkitError, match=message.replace("?", r"\?").replace("[", r"\[")):
            _serve([f"model={model_dir}", *args])
    monkeypatch.setitem(sys.modules, "litserve", None)  # as if the extra were not installed
    with pytest.raises(LmkitError, match=r"pip install 'lmkit\[serve\]'"):
        _serve([f"model={model_dir}"])


def test_serve_keys_are_conf_serves():
    assert [f.name for f in fields(ServeSettings)] == list(OmegaConf.load(CONF / "serve.yaml").keys())


def test_sigterm_stops_the_server_and_its_processes(server):
    """Last: it stops the module's server."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    assert children  # LitServe's worker, HTTP server and manager
    assert server.stop() == 0
    assert "lmkit serve: stopped" in "".join(server.lines) and "Traceback" not in "".join(server.lines)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
             and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]
    assert not alive


def test_an_onnx_transformer_serves_32_clients_as_generate_and_frees_the_rows_of_those_who_hang_up(tmp_path):
    """runtime=onnx, a Transformer with a 32-token context, 32 rows per batch: 32 clients fill the batch with
    endless streams and hang up, so the next 32 are served only if their rows were freed; those 32 (prompts of
    different lengths, one longer than the context, greedy and seeded, some re-priming as they decode) each
    get `lmkit generate`'s text for the same export."""
    pytest.importorskip("onnxruntime")
    import lmkit
    from lmkit.deploy.onnx import export_onnx

    onnx_dir = export_onnx(lively(tiny_lm("transformer")), tmp_path / NAME)
    with pytest.raises(LmkitError, match="is an ONNX export: serve it with runtime=onnx"):
        _serve([f"model={onnx_dir}"])
    model = lmkit.load(onnx_dir)
    prompts = ["ROMEO:", "A", "Be it so, my lord, and more than that: O noble", "O, I am slain"]  # the third: 46 tokens
    assert len(model.encode(prompts[2])) > 32
    requests = [dict(prompt=prompts[i % 4], max_tokens=20 + i, temperature=0.9, seed=i) if i % 2 else
                dict(prompt=prompts[i % 4], max_tokens=20 + i, temperature=0) for i in range(32)]
    server = Server(onnx_dir, free_port(), "runtime=onnx", "max_batch_size=32", "max_tokens_limit=1000000")
    try:
        server.wait_ready()

        async def hang_up_then_ask() -> list[str]:
            async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
                async def endless() -> None:
                    body = {"model": NAME, "prompt": "A", "max_tokens": 1000000, "stream": True}
                    async with http.stream("POST", server.url + "/v1/completions", json=body) as stream:
                        async for line in stream.aiter_lines():
                            assert line.startswith("data: ")
                            return  # hang up after the first text

                await asyncio.gather(*(endless() for _ in range(32)))
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
                async def one(request: dict) -> str:
                    stream = await c.completions.create(model=NAME, stream=True, **request)
                    return "".join([chunk.choices[0].text async for chunk in stream])

                return await asyncio.gather(*(one(r) for r in requests))

        texts = asyncio.run(hang_up_then_ask())
        for request, text in zip(requests, texts):
            prompt = request["prompt"]
            want = model.generate(prompt, max_new_tokens=request["max_tokens"], temperature=request["temperature"],
                                  seed=request.get("seed"))
            assert prompt + text == want, request
        os.killpg(server.proc.pid, signal.SIGINT)  # Ctrl-C at a console reaches the whole process group
        assert server.proc.wait(30) == 0
        assert "lmkit serve: stopped" in "".join(server.lines) and "Traceback" not in "".join(server.lines)
        assert "one request at a time" not in "".join(server.lines)
    finally:
        server.stop()


def in_process_api(model: InferenceModel) -> ModelAPI:
    """The server's model side, started in this process over `model` (as a worker's `setup` starts it)."""
    settings = ServeSettings(model="", name=NAME, runtime="torch", device=None, host="127.0.0.1", port=8000,
                             max_batch_size=8, batch_timeout=0.0, workers=1, threads=None, stream_interval=0.0,
                             api_key=None, max_tokens=16, max_tokens_limit=16, max_n=1, max_prompt_tokens=64,
                             log_level="warning")
    cancels = [queue.Queue()]
    api = ModelAPI(settings, OpenAIEndpoints(settings, model.tokenizer, model.tokenizer.vocab_size, cancels), cancels)
    api.start(model, worker=0)
    return api


def test_an_onnx_transformer_exported_before_past_mask_serves_one_request_at_a_time_and_says_so(capsys):
    pytest.importorskip("onnxruntime")
    import lmkit

    old = lmkit.load(Path(__file__).parent / "data" / "format1-transformer-onnx")
    api = in_process_api(old)
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and said[0].startswith(f"lmkit serve: {NAME} serves one request at a time: its ONNX")
    api.add_request("a", Job([old.encode("ROMEO:")], n=1, max_tokens=3, temperature=0))
    api.add_request("b", Job([old.encode("A")], n=1, max_tokens=3, temperature=0))
    assert not api.has_capacity()  # b waits for a
    while api.has_active_requests():
        api.step(None)


def test_a_request_added_while_a_failed_step_resets_is_answered_or_kept():
    """LitServe adds requests on its event loop while a step runs in a thread. A step that fails resets the
    engine and answers every active request with an error; a request added meanwhile must be either answered
    and gone from the engine, or kept and served, never both (LitServe forgets an answered request, and the
    engine's later news for it would fail LitServe's loop and every request in it). The interleaving is
    forced, not hoped for: a profile hook adds the request just as the failing step's `Engine.reset` returns."""
    model = lively(tiny_lm("lstm"))
    api = in_process_api(model)
    api.add_request("bad", Job([[len(CHARS)]], n=1, max_tokens=3, temperature=0))  # no such token: the step raises
    late = threading.Thread(target=api.add_request, args=("late", Job([model.encode("A")], n=1, max_tokens=3,
                                                                         temperature=0)))

    def add_late_at_reset(frame, event, arg):
        if event == "return" and frame.f_code is Engine.reset.__code__:
            late.start()
            late.join(0.2)  # it waits for the failed step to finish answering (or slips in, without a lock)

    outputs = []

    def failing_step() -> None:
        sys.setprofile(add_late_at_reset)
        try:
            outputs.extend(api.step(None))
        finally:
            sys.setprofile(None)

    step = threading.Thread(target=failing_step)
    step.start()
    step.join()
    late.join()
    assert {(o.uid, o.status) for o in outputs} == {("bad", LitAPIStatus.ERROR)}
    text = ""
    while api.has_active_requests():
        for o in api.step(None):
            assert o.uid == "late" and o.status in (LitAPIStatus.OK, LitAPIStatus.FINISH_STREAMING)
            text += "".join(c["text"] for c in o.output["choices"]) if o.output else ""
    assert text == model.generate("A", max_new_tokens=3, temperature=0)[1:] and not api.active


# --- the engine alone ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, runtime", [("transformer", "torch"), ("lstm", "torch"), ("transformer", "onnx"),
                                           ("lstm", "onnx")])
def test_engine_rows_joining_and_leaving_decode_as_generate(kind, runtime, tmp_path):
    """Requests of different lengths join a running batch and leave it; a 16-token Transformer re-primes
    its context several times. Each request's text equals InferenceModel.generate's (greedy and seeded),
    with torch and with onnxruntime (an ONNX Transformer's rows padded through its past_mask)."""
    model = lively(tiny_lm(kind, **({"max_seq_len": 16} if kind == "transformer" else {})))
    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
        import lmkit
        from lmkit.deploy.onnx import export_onnx

        model = lmkit.load(export_onnx(model, tmp_path / kind))
    engine = Engine(model, max_rows=6)
    jobs = {}
    for i, prompt in enumerate(["ROMEO:", "A", "Be it so, my lord, and more", "O"]):
        jobs[f"greedy{i}"] = (prompt, Job([model.encode(prompt)], n=1, max_tokens=30 + 7 * i, temperature=0))
        jobs[f"seeded{i}"] = (prompt, Job([model.encode(prompt)], n=2, max_tokens=40, temperature=0.9, top_k=20,
                                          seed=i))
    texts: dict[str, dict[int, str]] = {uid: {} for uid in jobs}
    waiting = list(jobs)
    while waiting or engine.busy():
        if waiting and engine.has_capacity():
            uid = waiting.pop(0)
            engine.arrive(uid, jobs[uid][1])
        for uid, news in engine.step().items():
            for c in news["choices"]:
                texts[uid][c["index"]] = texts[uid].get(c["index"], "") + c["text"]
    for uid, (prompt, job) in jobs.items():
        want = model.generate(prompt, max_new_tokens=job.max_tokens, temperature=job.temperature, top_k=job.top_k,
                              num_samples=job.n, seed=job.seed)
        want = [want] if isinstance(want, str) else want
        assert [prompt + texts[uid][i] for i in range(job.n)] == want, uid


def test_engine_a_row_that_stops_rides_along_and_its_sibling_draws_as_in_generate():
    """n=2 with a stop sequence: a row that stops early stays in the batch, unused, so the other row of its
    prompt draws exactly what `generate(num_samples=2, seed)` draws for it; each text is generate's, cut."""
    model = lively(tiny_lm("transformer", max_seq_len=16))
    want = [t[len("ROMEO:"):] for t in model.generate("ROMEO:", max_new_tokens=40, temperature=0.9, num_samples=2,
                                                      seed=5)]
    stop = next(want[0][i:i + 2] for i in range(1, 30) if want[0][i:i + 2] not in want[1][:30])
    engine = Engine(model, max_rows=4)
    engine.arrive("r", Job([model.encode("ROMEO:")], n=2, max_tokens=40, temperature=0.9, seed=5, stop=[stop]))
    texts, reasons = {0: "", 1: ""}, {}
    while engine.busy():
        for c in engine.step().get("r", {"choices": []})["choices"]:
            texts[c["index"]] += c["text"]
            reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    cut = [w[:w.find(stop)] if stop in w else w for w in want]
    assert texts == {0: cut[0], 1: cut[1]} and reasons[0] == "stop"


def decode_all(engine: Engine, arrivals: dict[int, list[tuple[str, Job]]]) -> dict[str, dict[int, tuple[str, str]]]:
    """Step the engine until idle, handing it `arrivals[i]` before step i; each request's (text, finish_reason)
    per choice index."""
    out: dict[str, dict[int, tuple[str, str]]] = {}
    step = 0
    while step <= max(arrivals) or engine.busy():
        for uid, job in arrivals.get(step, []):
            engine.arrive(uid, job)
        for uid, news in engine.step().items():
            for c in news["choices"]:
                text, reason = out.setdefault(uid, {}).get(c["index"], ("", None))
                out[uid][c["index"]] = (text + c["text"], c["finish_reason"] or reason)
        step += 1
    return out


@pytest.mark.parametrize("max_seq_len", [32, 3])
def test_engine_a_group_done_at_once_on_a_full_context_leaves_without_being_fed(max_seq_len):
    """A prompt cut to the context that finishes at its first token (max_tokens=1, or a stop sequence that
    first token hits) holds a full cache: fed one more token, the backbone would raise and the server answer
    every request with a 500. It leaves at once; the requests beside it decode as generate does. At
    max_seq_len=3 a re-primed context (the latest 3/4) is full as well: a group finishing there leaves too."""
    model = lively(tiny_lm("transformer", max_seq_len=max_seq_len))
    long = "Be it so, my lord, and more than that: O"  # 40 tokens
    first = model.generate(long, max_new_tokens=1, temperature=0)[len(long):]
    # "done at re-prime" ends on the token drawn right after its context (and "other"'s, beside it) is re-primed
    others = {"other": ("ROMEO:", 40), "done at re-prime": ("ROMEO:", max_seq_len - 6 + 2 if max_seq_len > 6 else 5)}
    arrivals = {0: [(uid, Job([model.encode(p)], n=1, max_tokens=k, temperature=0)) for uid, (p, k) in others.items()],
                2: [("one", Job([model.encode(long)], n=1, max_tokens=1, temperature=0)),
                    ("stop", Job([model.encode(long)], n=2, max_tokens=10, temperature=0, stop=[first]))]}
    out = decode_all(Engine(model, max_rows=8), arrivals)
    assert out["one"] == {0: (first, "length")}
    assert out["stop"] == {0: ("", "stop"), 1: ("", "stop")}
    for uid, (prompt, max_tokens) in others.items():
        assert out[uid] == {0: (model.generate(prompt, max_new_tokens=max_tokens, temperature=0)[len(prompt):],
                                "length")}, uid


def test_held_back_keeps_what_could_start_a_stop_sequence():
    assert held_back("the end.\n", ["\n\n"]) == 1
    assert held_back("the end.", ["\n\n"]) == 0
    assert held_back("abc STO", ["STOP", "x"]) == 3
    assert held_back("abc", []) == 0
