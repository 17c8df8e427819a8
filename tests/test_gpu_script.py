"""bench/gpu.py, the one-shot GPU run, rehearsed on the CPU: its flow, its JSON, its time limits and its budget, so the
15 minutes a GPU is lent for are not spent finding the script's own bugs. (The GPU tests it runs are tests/test_gpu.py,
skipped here without CUDA; `python bench/gpu.py --rehearse` runs them all on the CPU, in minutes.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT))
from bench import gpu  # noqa: E402
from bench.gpu_probe import flops_per_token  # noqa: E402

SCRIPT = [sys.executable, str(ROOT / "bench" / "gpu.py")]


def rehearse(tmp_path: Path, *args: str, timeout: int = 240) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    tmp_path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([*SCRIPT, "--out", str(out), "--work", str(tmp_path / "work"), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=timeout)
    return result, json.loads((out / "gpu.json").read_text())


def test_a_rehearsal_runs_its_steps_records_them_and_stops_one_at_its_time_limit(tmp_path):
    """versions, then Lightning's side of the LSTM row (a real `python train.py` run, timed over a window), then the
    raw loop's side stopped at a 1-second limit: the run goes on past it, and says so in gpu.json and its output."""
    result, record = rehearse(tmp_path, "--rehearse", "--only", "versions,speed-lstm-lightning,speed-lstm-raw",
                              "--limit", "speed-lstm-raw=1")
    assert result.returncode == 1, result.stdout + result.stderr  # one step did not finish
    assert record["kind"] == "cpu-rehearsal" and "no speed claims" in record["what"]
    steps = record["steps"]
    assert list(steps) == ["versions", "speed-lstm-lightning", "speed-lstm-raw"]
    assert steps["versions"]["status"] == "ok" and steps["versions"]["figures"]["line"].startswith("fits: ")
    assert record["versions"]["torch"] == torch.__version__
    lightning = steps["speed-lstm-lightning"]
    assert lightning["status"] == "ok", lightning
    figures = lightning["figures"]
    assert (figures["side"], figures["from_step"], figures["steps"]) == ("lightning", 10, 20)
    assert figures["tokens"] == 20 * 4 * 32 and figures["tokens_per_s"] > 0 and figures["mfu"] is None
    raw = steps["speed-lstm-raw"]
    assert raw["status"] == "timeout" and raw["rc"] is None and raw["limit_s"] == 1, raw
    assert 1 <= raw["seconds"] < 1 + gpu.GRACE + 5 and "--raw --steps 30 --warm 10" in " ".join(raw["tail"])
    assert record["speed"][0]["row"] == "lstm" and record["speed"][0]["raw_tok_s"] is None
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.log", "logs.tar.gz"]  # (8 at most come back)
    log = (out / "gpu.log").read_text()
    assert "===== speed-lstm-raw: timeout" in log and "===== speed-lstm-lightning: ok" in log
    lines = result.stdout.splitlines()
    assert any("speed-lstm-raw" in line and "timeout" in line for line in lines), result.stdout
    assert lines[-1] == f"written: {out / 'gpu.json'}"


def test_without_cuda_a_gpu_run_says_what_it_needs_in_one_line_and_skips_the_rest(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result, record = rehearse(tmp_path, "--only", "versions,tests-load", timeout=120)
    assert result.returncode == 1
    versions = record["steps"]["versions"]
    line = versions["figures"]["line"]
    assert versions["status"] == "failed" and line.startswith("needs (cannot run): ") and "\n" not in line
    assert "torch.cuda.is_available() is False" in line
    limit = next(s.limit for s in gpu.steps() if s.name == "tests-load")
    assert record["steps"]["tests-load"] == {"limit_s": limit, "status": "skipped",
                                             "reason": f"versions: {versions['figures']['fatal']}"}
    assert line in result.stdout


def test_the_budget_caps_each_step_and_skips_what_it_cannot_fit(tmp_path):
    """A step gets at most what is left of the budget, less the grace a stopped step may take; under MIN_STEP left,
    it is skipped."""
    assert gpu.capped(120, None) == 120 and gpu.capped(120, 300) == 120 and gpu.capped(120, 26) == 26 - gpu.GRACE
    result, record = rehearse(tmp_path, "--rehearse", "--only", "versions,profile-generate", "--budget",
                              str(gpu.MIN_STEP - 1), timeout=120)
    assert result.returncode == 0 and record["budget_s"] == gpu.MIN_STEP - 1
    for step in record["steps"].values():
        assert step["status"] == "skipped" and "the budget of 19" in step["reason"], step


def test_a_step_s_processes_are_ended_at_its_limit_even_outside_its_process_group(tmp_path):
    """A step that starts a process in a session of its own (as the serve test starts `lmkit serve`): at the limit,
    that process goes too, found by the variable the step carries."""
    pid_file = tmp_path / "pid"
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
            f"start_new_session=True); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    status, rc, seconds = gpu.run_command([sys.executable, "-c", code], {}, tmp_path / "step.log", limit=3)
    assert (status, rc) == ("timeout", None) and 3 <= seconds < 3 + gpu.GRACE + 2
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, f"process {pid} of the step outlived it"
        time.sleep(0.1)


def test_steps_are_chosen_by_name_or_prefix():
    plan = gpu.steps()
    assert [s.name for s in gpu.select(plan, "tests", None)] == list(gpu.TEST_GROUPS)
    assert [s.name for s in gpu.select(plan, "speed-lstm-", None)] == ["speed-lstm-lightning", "speed-lstm-raw"]
    assert "versions" not in [s.name for s in gpu.select(plan, None, "versions")]
    with pytest.raises(SystemExit, match="no step named 'nope'"):
        gpu.select(plan, "nope", None)
    assert len({s.name for s in plan}) == len(plan) and plan[0].name == "versions"
    # the test groups run side by side, every other step alone (the speed steps time the GPU)
    assert [[s.name for s in phase] for phase in gpu.phases(plan)][:3] == [
        ["versions"], list(gpu.TEST_GROUPS), ["speed-gpt2_small-lightning"]]
    assert all(len(phase) == 1 for phase in gpu.phases(plan)[2:])


def test_mfu_is_nanogpts_estimate_against_the_dense_bf16_peak():
    from lmkit.backbones import build_backbone
    from lmkit.record import ModelRecord
    from omegaconf import OmegaConf

    conf = OmegaConf.load(ROOT / "conf" / "model" / "gpt2_small.yaml").model
    settings = {**OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "transformer.yaml").model), **conf}
    settings["max_seq_len"] = 1024
    with torch.device("meta"):
        backbone = build_backbone(ModelRecord.from_settings(settings, 50257).backbone)
    per_token = flops_per_token(backbone, 1024)
    # DESIGN.md: gpt2-124M at seq 1024, 100% MFU on an H100/H200 is about 1.16M tokens/s
    assert 1.15e6 < 989e12 / per_token < 1.17e6
    assert gpu.peak_bf16_flops("NVIDIA H100 80GB HBM3") == gpu.peak_bf16_flops("NVIDIA H200") == 989e12
    assert gpu.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12 and gpu.peak_bf16_flops("cpu") is None
    assert gpu.mfu(0.5 * 989e12 / per_token, per_token, "NVIDIA H200") == pytest.approx(0.5)


def test_the_device_script_installs_the_carried_wheels_without_dependencies_then_runs_gpu_py():
    """The device machine has no registry and no ../shared: the script installs what travels in .whl/ (no
    dependencies, no index) and runs bench/gpu.py; only its `fetch` branch, run here, reads ../shared."""
    script = ROOT / "bench" / "gpu_device.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    code = [line.strip() for line in script.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]
    assert [line for line in code if "../shared" in line] == ['exec bash ../shared/device/wheels.sh "${WHEELS[@]}"']
    assert any("pip install" in line and "--no-index --no-deps" in line and ".whl/*.whl" in line for line in code)
    assert code[-1] == 'exec python3 bench/gpu.py --out "${OUT:-outputs/gpu}" "$@"'


def test_int8_layers_bring_their_rows_and_scales_along_when_the_model_moves():
    """bitsandbytes keeps a Linear8bitLt's int8 rows and scales (CB, SCB) as plain attributes, which Module.to leaves
    behind on a move to the GPU (it swaps the weight's data, not the attributes); the int8 plugin's pre-hook points
    them at the moved weight before the next call. Without a GPU: on the CPU the hook changes nothing, and on a
    stand-in for a moved layer (weight on the meta device, its rows and scales left on the CPU) it moves them."""
    from types import SimpleNamespace

    import bitsandbytes as bnb

    from lmkit.backbones import backbone_config, build_backbone
    from lmkit.builtin_plugins.int8 import quantize, rows_follow_weight

    torch.manual_seed(0)
    backbone = quantize(build_backbone(backbone_config("transformer", 40, n_layer=1, n_head=2, n_embd=32,
                                                       max_seq_len=16)).eval(), 6.0)
    ids = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        before = backbone(ids)[0]  # (the first call moves CB and SCB into each layer's state)
    layers = [m for m in backbone.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert layers and all(rows_follow_weight in m._forward_pre_hooks.values() for m in layers)
    for layer in layers:
        rows_follow_weight(layer, ())  # where the weight already is: nothing moves
        assert layer.state.SCB is not None and layer.state.SCB.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(backbone(ids)[0], before)

    rows, scales = layers[0].state.CB, layers[0].state.SCB
    moved = torch.empty_like(rows, device="meta")
    layer = SimpleNamespace(weight=SimpleNamespace(data=moved, device=moved.device, CB=None, SCB=None),
                            state=SimpleNamespace(CB=rows, SCB=scales))
    rows_follow_weight(layer, ())
    assert layer.weight.CB is moved and layer.weight.SCB.device.type == "meta"
    assert layer.weight.SCB.shape == scales.shape
    assert layer.state.CB is None and layer.state.SCB is None
