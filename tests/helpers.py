"""What several test modules share, so that none imports another: one-line-error checks, the runs' logs, tiny
models, Hugging Face folders, a `lmkit serve` process, and callbacks that tests add to real runs with
`+callbacks.<name>._target_=tests.helpers...`. Optional packages (transformers, ...) are imported inside the
functions that need them: a module skips for its own missing imports only. (Fixtures: conftest.py.)"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from lmkit.backbones import TransformerConfig, backbone_config, build_backbone
from lmkit.data.tokenizer import BPETokenizer, CharTokenizer
from lmkit.inference import InferenceModel
from lmkit.record import ModelRecord

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# A model and batch small enough that a training step takes milliseconds on two cores.
TINY = ["model.n_layer=1", "model.n_embd=32", "data.seq_len=32", "data.batch_size=8", "data.eval_batch_size=16",
        "data.val_windows=16", "data.test_windows=16", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0"]
TINY_TRANSFORMER = TINY + ["model.n_head=2"]


# --- train.py and lmkit, run as users run them -------------------------------------------------------------------


def write_tiny_corpus(path: Path) -> Path:
    """A small corpus of short, repetitive lines a tiny model can learn by heart, written at `path`."""
    lines = [f"{name}: {verb} the {thing}." for name in ("ANNE", "BEN", "CLEO", "DAN")
             for verb in ("sees", "takes", "loves") for thing in ("moon", "sword", "rose", "crown")]
    path.write_text("\n".join(lines * 12) + "\n", encoding="utf-8")
    return path


def train_py_args(*overrides: str, run_dir: Path, cache_dir: Path) -> list[str]:
    """The arguments of `python train.py` for a run in `run_dir` with the token cache in `cache_dir`."""
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's own flags (-m) go before the overrides
    return [*flags, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}",
            *(o for o in overrides if not o.startswith("-"))]


def run_in_process(*overrides: str, run_dir: Path, cache_dir: Path) -> dict:
    """The run `run_train_py` would make, in this process: the one-process reference of a multi-process test needs no
    process of its own (starting one, importing torch and Lightning, takes seconds). Its metrics.json."""
    from lmkit.train import run

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={run_dir}", f"paths.cache_dir={cache_dir}", *overrides])
    run(cfg)
    return json.loads((run_dir / "metrics.json").read_text())


def run_train_py(*overrides: str, run_dir: Path, cache_dir: Path, timeout: int = 600,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python train.py ...` in a subprocess, as a user runs it."""
    cmd = [sys.executable, str(ROOT / "train.py"), *train_py_args(*overrides, run_dir=run_dir, cache_dir=cache_dir)]
    return subprocess.run(cmd, cwd=run_dir.parent, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# `python train.py ARGS` for each command line in turn, in one interpreter: train.py run as __main__ (runpy) with
# its sys.argv, its stdout and stderr the files given (file descriptors 1 and 2, so what Lightning, Hydra, warnings
# or a traceback print lands there, as in a process of its own), its exit code what SystemExit carries (an
# uncaught exception prints its traceback and gives 1, as the interpreter does). Hydra's global state is cleared
# after each, as a new process would start without it.
_EACH = """
import json, os, runpy, sys, traceback
from hydra.core.global_hydra import GlobalHydra

script, cases = sys.argv[1], json.load(open(sys.argv[2]))
sys.path[0] = os.path.dirname(script)  # as `python train.py` starts: the script's folder first
codes = []
for argv, out, err in cases:
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out, "w") as fo, open(err, "w") as fe:
        os.dup2(fo.fileno(), 1); os.dup2(fe.fileno(), 2)
        sys.argv, code = [script, *argv], 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
            os.close(saved[0]); os.close(saved[1])
            GlobalHydra.instance().clear()
    codes.append(code)
print(json.dumps(codes))
"""


def run_train_py_each(cases: dict[str, list[str]], cwd: Path,
                      timeout: int = 600) -> dict[str, subprocess.CompletedProcess]:
    """`python train.py ARGS` for each `name: ARGS` (train_py_args), all in one interpreter, one after the other:
    what each printed and its exit code. For command lines that train.py refuses before training, whose
    checks need a process but not one each (its start, importing torch and Lightning, takes seconds)."""
    files = cwd / "train_py_each"
    files.mkdir()
    plan = [(argv, str(files / f"{i}.out"), str(files / f"{i}.err")) for i, argv in enumerate(cases.values())]
    (files / "cases.json").write_text(json.dumps(plan))
    result = subprocess.run([sys.executable, "-c", _EACH, str(ROOT / "train.py"), str(files / "cases.json")],
                            cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    codes = json.loads(result.stdout.splitlines()[-1])
    return {name: subprocess.CompletedProcess([sys.executable, str(ROOT / "train.py"), *argv], code,
                                              Path(out).read_text(), Path(err).read_text())
            for name, (argv, out, err), code in zip(cases, plan, codes)}


def lmkit_main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`lmkit ARGS` in this process: what the `lmkit` script runs (lmkit.cli.main, with that command line and `env`
    added to the environment), what it printed and its exit code. For the commands other than train, which need no
    process of their own (an exception other than the SystemExit of a one-line error propagates, and fails the test;
    test_commands.py and test_install.py run the `lmkit` script itself)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from lmkit.cli import main

    out, err, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    saved = {k: os.environ.get(k) for k in env or {}}
    sys.argv = ["lmkit", *args]
    os.environ.update(env or {})
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["lmkit", *args], code, out.getvalue(), err.getvalue())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a server or a rendezvous the test starts next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sigterm_train_py_when(ready: Callable[[], bool], *overrides: str, run_dir: Path,
                          cache_dir: Path) -> tuple[int, str]:
    """Start `python train.py ...`, send it SIGTERM (as SLURM does before pre-emption) once `ready()` says training is
    under way, and return its exit code and stderr."""
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}",
           f"paths.cache_dir={cache_dir}"]
    log = run_dir.parent / "stderr.log"  # a file, not a pipe: an unread pipe fills up and stalls the child
    with open(log, "w") as err:
        # a session of its own: whatever happens, the ranks it started go with it
        proc = subprocess.Popen(cmd, cwd=run_dir.parent, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not ready():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, log.read_text()


# --- one-line refusals -----------------------------------------------------------------------------------------------


def one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A refused command: non-zero exit, no traceback, exactly one `error: ` line holding every fragment."""
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str, run_dir: Path) -> None:
    """`one_error_line`, and a refused training run left nothing in its folder."""
    one_error_line(result, *fragments)
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoints").exists()


# --- training runs ---------------------------------------------------------------------------------------------------

FSDP2 = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"]
HALF = ["data.batch_size=4", "data.eval_batch_size=8"]  # per rank: two ranks make a single run's batch of 8
# LoRA on a base (conftest.py's `bases`) and the embedded corpus, as short as it can be and still checkpoint
FINETUNE = ["finetune=lora", *[o for o in TINY if not o.startswith("model.")], "trainer.val_check_interval=3",
            "logger=none", "callbacks.text_sampler=null", "optim.warmup_steps=1", "optim.decay_steps=100"]
# `bases`' Llama block: grouped-query attention, a tied head (its vocabulary set to the corpus's there)
LORA_LLAMA = TransformerConfig(vocab_size=0, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64,
                               position="rope", bias=False, norm="rmsnorm", mlp="swiglu", mlp_hidden=48,
                               tie_weights=True)
# A fine-tune of the session's trained model (its shape and tokenizer come with init_from), every step logged.
SHORT_FINETUNE = [*(o for o in TINY if not o.startswith("model.")), "trainer.max_steps=4",
                  "trainer.log_every_n_steps=1", "trainer.val_check_interval=4", "optim.warmup_steps=1",
                  "optim.decay_steps=100", "callbacks.text_sampler=null"]


def finetune(*overrides: str, run_dir: Path, cache_dir: Path) -> dict:
    """A `SHORT_FINETUNE` run of train.py in a process of its own (multi-process strategies launch from there)."""
    result = run_train_py(*SHORT_FINETUNE, *overrides, run_dir=run_dir, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def finetune_here(*overrides: str, run_dir: Path, cache_dir: Path) -> dict:
    """`finetune`'s one-process run, in this process."""
    return run_in_process(*SHORT_FINETUNE, *overrides, run_dir=run_dir, cache_dir=cache_dir)


def logged_by_step(run_dir: Path, key: str = "train_loss") -> dict[int, float]:
    """`key` by step, as the run's CSV logger wrote it to `run_dir/metrics.csv`."""
    with open(run_dir / "metrics.csv") as fh:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(fh) if r.get(key)}


def logged(run_dir: Path, key: str = "train_loss") -> list[float]:
    """`key` at each step, in order (a resumed run logging into `run_dir` continues the same file's steps)."""
    rows = logged_by_step(run_dir, key)
    return [rows[s] for s in sorted(rows)]


class CrashOnRank(L.Callback):
    """Make one rank fail mid-training, as a bad node or an out-of-memory error would."""

    def __init__(self, rank: int = 1, step: int = 3) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank}")


def touch_marker(marker: str, **_) -> None:
    """A `_target_` that leaves a trace when something instantiates it."""
    open(marker, "w").close()


class SigtermInValidation(L.Callback):
    """Send this process a real SIGTERM, as SLURM does before pre-emption, during the validation at `step`."""

    def __init__(self, step: int) -> None:
        self.step, self.sent = step, False

    def on_validation_batch_start(self, trainer: L.Trainer, *args) -> None:
        if not self.sent and not trainer.sanity_checking and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


# --- tiny models and decoding references ------------------------------------------------------------------------------

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TEXT = ("ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name; 42 times.\n")


def tiny_lm(kind: str = "transformer", **options) -> InferenceModel:
    """A 2-layer, 16-wide model of `kind` over CHARS, at its default init."""
    torch.manual_seed(0)
    defaults = dict(n_layer=2, n_embd=16, **({"n_head": 2, "max_seq_len": 32} if kind == "transformer" else {}))
    record = ModelRecord(backbone=backbone_config(kind, len(CHARS), **{**defaults, **options}), tokenizer="char")
    return InferenceModel(build_backbone(record.backbone).eval(), CharTokenizer(CHARS), record)


def lively(model: InferenceModel, std: float = 0.3) -> InferenceModel:
    """Every weight drawn from N(0, std), biases and norms included: at the default init a tiny model's next token
    barely depends on the context, so a decoding loop that looks at the wrong context, a row reading another
    row's state or a dropped tensor would still give the right text."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


def lively_bpe_transformer(tokenizer: BPETokenizer, **options) -> InferenceModel:
    """A `lively` 2-layer, 32-wide Transformer (tanh GELU, as GPT-2 and llama.cpp compute it) over `tokenizer`."""
    torch.manual_seed(0)
    settings = {**dict(n_layer=2, n_head=2, n_embd=32, max_seq_len=32, gelu="tanh"), **options}
    record = ModelRecord(backbone=backbone_config("transformer", tokenizer.vocab_size, **settings),
                         tokenizer=tokenizer.kind)
    return lively(InferenceModel(build_backbone(record.backbone).eval(), tokenizer, record))


def decode_by_hand(model, prompt: str, max_new_tokens: int, *, seed: int | None = None,
                   temperature: float = 1.0) -> str:
    """The decoding loop written out, as a reference for `InferenceModel.generate`: a full forward pass over the
    context for each new token (no cache), then its last position's argmax (`seed=None`: greedy) or a draw at
    `temperature` from a generator seeded with `seed`. A model with a context limit is re-primed with the latest
    three quarters of the text when the context is full, as lmkit.generate documents."""
    limit = model.backbone.max_seq_len
    ids, start = model.tokenizer.encode(prompt), 0
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if limit and len(ids) - start > limit:
                start = len(ids) - (limit - limit // 4)
            logits = model(torch.tensor([ids[start:]], device=model.device))[:, -1].float()
            if generator is None:
                token = logits.argmax(-1)
            else:
                token = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)
            ids.append(int(token))
    return model.tokenizer.decode(ids)


def greedy_tokens(model, llm, prompt: list[int], steps: int = 12) -> tuple[list[int], list[int]]:
    """`steps` greedy tokens after `prompt` from lmkit's model and from llama.cpp's, each decoded by hand (neither
    stops at an end token). `llm` must keep every position's logits (logits_all=True): llama-cpp-python 0.3.16's
    eval fills `scores` only then."""
    import numpy as np

    ours, ids = [], list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ours.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            ids.append(ours[-1])
    theirs = []
    llm.eval(prompt)
    for _ in range(steps):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    return ours, theirs


# --- Hugging Face folders (transformers is the reference they are checked against) --------------------------------

V = 300  # a byte-level BPE needs 256 tokens at least
SHAPE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
             initializer_range=0.2)  # weights large enough that a wrong rope or norm shows above 1e-4
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
IDS = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))


def hf_model(path, family: str = "llama", **options) -> Any:
    """A random-weight transformers model saved at `path` (its biases and norms randomised too, so a dropped one
    shows)."""
    import transformers

    torch.manual_seed(0)
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    model = model_cls(config_cls(**{**SHAPE, **options})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.2)
    model.save_pretrained(path)
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits of an lmkit or a transformers model."""
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


# ChatML with a start token, as SmolLM2 and Qwen2 write it (their templates also add a default system message)
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the moon and the rose"}]
PROMPT = "the moon and"


def chat_model_folder(path, eos_id: int | None = None):
    """A random Llama saved with a byte-level BPE that has ChatML's special tokens, tokenizer_config.json naming
    <|im_end|> as end of sequence with TEMPLATE, and (given `eos_id`) generation_config.json ending at `eos_id`."""
    tok = BPETokenizer.train(["the moon and the sword and the rose " * 20], vocab_size=V - 8)
    tok.tokenizer.add_special_tokens(["<s>", "<|im_start|>", "<|im_end|>"])
    hf = hf_model(path, bos_token_id=tok.tokenizer.token_to_id("<s>"), eos_token_id=None)
    (path / "tokenizer.json").write_text(tok.tokenizer.to_str())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
        "chat_template": TEMPLATE}))
    if eos_id is not None:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}))
    return hf, tok


# --- lmkit serve, in a process of its own ----------------------------------------------------------------------------

KEY = "test-key"
NAME = "tiny"
LMKIT = Path(sys.executable).parent / "lmkit"


class Server:
    """`lmkit serve` on 127.0.0.1:`port`, API key KEY, model name NAME; its output collected in `lines`."""

    def __init__(self, model_dir: Path, port: int, *options: str) -> None:
        self.port, self.lines = port, []
        env = {**os.environ, "LMKIT_API_KEY": KEY}
        self.proc = subprocess.Popen([str(LMKIT), "serve", f"model={model_dir}", f"port={port}", f"name={NAME}",
                                      *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)  # its own process group: teardown can end all of it
        threading.Thread(target=self._drain, daemon=True).start()  # a full pipe would block the server
    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not any(f"lmkit serve: {NAME} at http://127.0.0.1:{self.port}/v1" in x for x in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("lmkit serve did not start:\n" + "".join(self.lines))
            time.sleep(0.1)

    def inference_workers(self) -> list[int]:
        """The pids of the server's model processes: those LitServe spawned (its HTTP servers are forked, so only
        the workers and multiprocessing's resource tracker start as `spawn_main`)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                session = int(stat.read_text().rsplit(")", 1)[1].split()[3])
                command = (stat.parent / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):  # (a process that ended while we looked)
                continue
            if session == self.proc.pid and b"spawn_main" in command and b"resource_tracker" not in command:
                found.append(int(stat.parent.name))
        return found

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode
