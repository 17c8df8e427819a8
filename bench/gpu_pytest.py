"""A pytest plugin for bench/gpu.py (`python -m pytest -p bench.gpu_pytest ...`): one JSON line per test as it
starts and as it ends, appended to the file $LMKIT_GPU_TEST_LOG at once, so a step stopped at its time limit still
says which tests passed, which failed and which one it was stuck in (pytest's own reports come only at the end)."""

from __future__ import annotations

import json
import os
import time


def _write(record: dict) -> None:
    path = os.environ.get("LMKIT_GPU_TEST_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def _message(report) -> str | None:
    longrepr = report.longrepr
    if longrepr is None:
        return None
    if isinstance(longrepr, tuple):  # a skip: (file, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    text = getattr(report, "longreprtext", None) or str(longrepr)
    lines = [line for line in text.splitlines() if line.startswith("E ")]  # the error, as pytest shows it
    return (" ".join(line[1:].strip() for line in lines[:3]) or text.strip().splitlines()[-1])[:500]


def pytest_runtest_logstart(nodeid: str, location) -> None:
    _write({"test": nodeid.split("::", 1)[-1], "event": "start", "time": time.time()})


def pytest_runtest_logreport(report) -> None:
    failed_around = report.when in ("setup", "teardown") and report.outcome != "passed"
    if report.when == "call" or failed_around:
        _write({"test": report.nodeid.split("::", 1)[-1], "event": "end", "when": report.when,
                "outcome": report.outcome, "seconds": round(report.duration, 2), "message": _message(report)})
