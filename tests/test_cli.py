"""`python train.py` as a user runs it: a subprocess, its exit code, what it prints and writes."""

import json
import math
from pathlib import Path

import pytest

from lmkit.train import run
from tests.conftest import TINY, run_train_py

TINY_RUN = ["model=lstm", *TINY, "trainer.max_steps=20", "trainer.val_check_interval=10"]


# a seed that is not the default: an entry that dropped the overrides would not train the same model
END_TO_END = [*TINY_RUN, "logger=[csv,tensorboard]", "callbacks.text_sampler.max_new_tokens=40", "seed=7"]


@pytest.fixture(scope="module")
def train_py_run(tmp_path_factory, cache_dir):
    """One `python train.py` run, shared by the tests that look at what it wrote."""
    run_dir = tmp_path_factory.mktemp("train_py") / "run"
    return run_dir, run_train_py(*END_TO_END, run_dir=run_dir, cache_dir=cache_dir)


@pytest.mark.slow
def test_train_py_end_to_end(train_py_run):
    run_dir, result = train_py_run
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 20 and math.isfinite(metrics["val_loss"])
    assert (run_dir / "metrics.csv").exists() and list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best-step20.ckpt", "last.ckpt"]
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert "Sample from the final model" in result.stdout + result.stderr


@pytest.mark.slow
def test_experiments_fast_dev_run_as_a_sweep(tmp_path, cache_dir):
    """`-m experiment=glob(*)`: every preset builds, trains a step, evaluates; one sweep folder."""
    sweep = tmp_path / "sweep"
    result = run_train_py("-m", "experiment=glob(*)", "trainer.fast_dev_run=true", "data.batch_size=2",
                          "data.eval_batch_size=2", "data.seq_len=32", "logger=none", f"hydra.sweep.dir={sweep}",
                          run_dir=tmp_path / "unused", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    experiments = sorted(p.stem for p in (Path(__file__).parent.parent / "conf" / "experiment").glob("*.yaml"))
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == len(experiments)
    assert all((job / "metrics.json").exists() for job in jobs)


def assert_clean_error(result, *fragments: str, run_dir: Path) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoints").exists()


def test_a_config_dir_that_does_not_exist_is_one_line(tmp_path, cache_dir):
    from lmkit.conf import check_config_dirs
    from lmkit.errors import LmkitError

    missing = tmp_path / "my_conf"
    result = run_train_py(f"--config-dir={missing}", run_dir=tmp_path / "run", cache_dir=cache_dir, timeout=120)
    assert result.returncode == 2
    assert_clean_error(result, "no such folder", str(missing), run_dir=tmp_path / "run")
    for args in (["-cd", str(missing)], [f"-cd={missing}"], ["--config-dir", str(missing), "model=lstm"]):
        with pytest.raises(LmkitError, match="no such folder"):
            check_config_dirs(args)
    check_config_dirs(["--config-dir", str(tmp_path)])  # one that exists is fine


@pytest.mark.parametrize("case", ["missing", "glob", "empty", "undecodable"])
def test_bad_corpus_gives_one_line(case, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_text("")
    (corpus / "bad.txt").write_bytes(b"fine\n" * 3 + b"\xc3\x28 oops\n")
    path, fragments = {
        "missing": (corpus / "nope.txt", ["no such file", "nope.txt"]),
        "glob": (f"{corpus}/*.md", ["matches no files", "*.md"]),
        "empty": (corpus / "empty.txt", ["corpus is empty", "empty.txt"]),
        "undecodable": (corpus / "bad.txt", ["bad.txt", "offset 15", "data.errors=replace"]),
    }[case]
    run_dir = tmp_path / "run"
    result = run_train_py("data=text", f"data.path={path}", *TINY_RUN, run_dir=run_dir, cache_dir=tmp_path / "cache")
    assert_clean_error(result, *fragments, run_dir=run_dir)
    assert not list((tmp_path / "cache").rglob("*.tmp-*"))  # nothing half-written in the cache


@pytest.mark.parametrize("override,message", [("model.nonsense=1", "Key 'nonsense' is not in struct"),
                                              ("model=mamba", "Could not find 'model/mamba'")])
def test_unknown_config_key_or_option_is_hydras_one_message(override, message, tmp_path, cache_dir):
    result = run_train_py(override, run_dir=tmp_path / "run", cache_dir=cache_dir)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_seq_len_beyond_the_model_context(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = run_train_py("model=transformer", "model.max_seq_len=16", *TINY, "model.n_head=2", run_dir=run_dir, cache_dir=cache_dir)
    assert_clean_error(result, "data.seq_len=32", "model.max_seq_len=16", run_dir=run_dir)


@pytest.fixture
def lstm_checkpoint(tmp_path, make_cfg, tiny_corpus) -> Path:
    metrics, _ = run(make_cfg("data=text", f"data.path={tiny_corpus}", "data.split=[0.8,0.1,0.1]", *TINY_RUN,
                              "logger=none", output_dir=tmp_path / "trained"))
    return Path(metrics["last_ckpt"])


def test_resume_with_a_checkpoint_that_does_not_fit(lstm_checkpoint, tiny_corpus, tmp_path, cache_dir):
    other = tmp_path / "other.txt"
    other.write_text(tiny_corpus.read_text() + "Quixotic zeal!\n")  # more characters: a bigger vocabulary
    base = ["data.split=[0.8,0.1,0.1]", *TINY_RUN, f"resume={lstm_checkpoint}"]
    run_dir = tmp_path / "run1"
    result = run_train_py("data=text", f"data.path={other}", *base, run_dir=run_dir, cache_dir=cache_dir)
    assert_clean_error(result, "different tokenizer", str(lstm_checkpoint), run_dir=run_dir)
    run_dir = tmp_path / "run2"
    result = run_train_py("data=text", f"data.path={tiny_corpus}", *base, "model.n_embd=48", run_dir=run_dir,
                          cache_dir=cache_dir)
    assert_clean_error(result, "different model", "model.n_embd: checkpoint 32 vs run 48", run_dir=run_dir)


def test_corrupt_checkpoint(lstm_checkpoint, tiny_corpus, tmp_path, cache_dir):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(lstm_checkpoint.read_bytes()[:5000])
    run_dir = tmp_path / "run"
    result = run_train_py("data=text", f"data.path={tiny_corpus}", "data.split=[0.8,0.1,0.1]", *TINY_RUN,
                          f"resume={truncated}", run_dir=run_dir, cache_dir=cache_dir)
    assert_clean_error(result, "corrupt or truncated", "truncated.ckpt", run_dir=run_dir)


@pytest.mark.parametrize("command", ["generate", "eval", "export", "import-hf", "serve", "plugins", "report"])
def test_each_command_says_its_keys_defaults_and_comments_on_help(command):
    import subprocess
    import sys

    from lmkit.conf import CONF_DIR

    script = Path(sys.executable).parent / "lmkit"
    result = subprocess.run([str(script), command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith(f"lmkit {command} "), result.stderr[-2000:]
    conf = CONF_DIR / f"{command.replace('-', '_')}.yaml"
    if conf.is_file():  # every key with its default and comment, as written once in the YAML
        assert conf.read_text() in result.stdout
    assert subprocess.run([str(script), command, "-h"], capture_output=True, text=True).stdout == result.stdout


def test_version():
    import subprocess
    import sys

    import lmkit

    script = Path(sys.executable).parent / "lmkit"
    assert subprocess.run([str(script), "--version"], capture_output=True, text=True).stdout == \
        f"lmkit {lmkit.__version__}\n"


def test_lmkit_train_command_takes_the_same_overrides(tmp_path, cache_dir):
    import subprocess
    import sys

    script = Path(sys.executable).parent / "lmkit"
    run_dir = tmp_path / "run"
    result = subprocess.run([str(script), "train", f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}",
                             "data=text", f"data.path={tmp_path}/none.txt"], capture_output=True, text=True)
    assert_clean_error(result, "no such file", "none.txt", run_dir=run_dir)
    assert "train" in subprocess.run([str(script), "--help"], capture_output=True, text=True).stdout


def test_lmkit_train_trains_the_same_model_as_train_py(train_py_run, tmp_path, cache_dir):
    import subprocess
    import sys

    import torch

    py_dir, result = train_py_run
    assert result.returncode == 0, result.stderr[-3000:]
    script, cli_dir = Path(sys.executable).parent / "lmkit", tmp_path / "cli"
    result = subprocess.run([str(script), "train", *END_TO_END, f"hydra.run.dir={cli_dir}", f"paths.cache_dir={cache_dir}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    by_cli, by_py = (json.loads((d / "metrics.json").read_text()) for d in (cli_dir, py_dir))
    assert by_cli["steps"] == by_py["steps"] == 20
    assert sorted(p.name for p in (cli_dir / "checkpoints").iterdir()) == ["best-step20.ckpt", "last.ckpt"]
    assert Path(by_cli["last_ckpt"]) == cli_dir / "checkpoints" / "last.ckpt"
    assert (cli_dir / "metrics.csv").exists() and (cli_dir / ".hydra" / "config.yaml").exists()
    # same config, same seed, deterministic on CPU: the same losses and the same weights, so the same entry
    for key in ("train_loss", "val_loss", "test_loss"):
        assert by_cli[key] == pytest.approx(by_py[key], abs=1e-6), key
    cli_weights = torch.load(by_cli["last_ckpt"], weights_only=True)["state_dict"]
    for name, tensor in torch.load(by_py["last_ckpt"], weights_only=True)["state_dict"].items():
        torch.testing.assert_close(cli_weights[name], tensor, atol=1e-6, rtol=0, msg=name)
    assert (cli_dir / "samples.txt").read_text() == (py_dir / "samples.txt").read_text()


@pytest.mark.parametrize("overrides,fragment", [
    (["data=text"], "data.path is required"),
    (["tokenizer=file", "tokenizer.path=nope.json"], "tokenizer.path: no such file: nope.json"),
    (["data.seq_len=0"], "data.seq_len=0"),
    (["optim.name=sgd"], "optim.name='sgd'"),
])
def test_bad_settings_give_one_line(overrides, fragment, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = run_train_py(*TINY_RUN, *overrides, run_dir=run_dir, cache_dir=cache_dir)
    assert_clean_error(result, fragment, run_dir=run_dir)


def test_log_every_n_steps_zero_and_no_validation_still_finish(make_cfg):
    metrics, _ = run(make_cfg(*TINY_RUN, "trainer.log_every_n_steps=0", "trainer.limit_val_batches=0",
                              "logger=none", "callbacks=none"))
    assert metrics["steps"] == 20 and metrics["val_loss"] is None and metrics["test_loss"] is not None


def test_null_unsets_an_optional_text_option_and_stays_text_elsewhere(monkeypatch):
    """`api_key=null` turns auth off (even over LMKIT_API_KEY) and `device=null` means the CPU, as conf/serve.yaml
    and conf/generate.yaml document; a text option that cannot be unset (prompt) keeps `null` as its text."""
    from lmkit.cli import GenerateArgs, ServeArgs, parse

    monkeypatch.setenv("LMKIT_API_KEY", "secret")
    serve, _ = parse(ServeArgs, "serve", ["model=m", "api_key=null", "device=NULL", "name=null"])
    assert (serve.api_key, serve.device, serve.name) == (None, None, None)
    serve, _ = parse(ServeArgs, "serve", ["model=m", "device=cuda:1", "name=nullish"])
    assert (serve.api_key, serve.device, serve.name) == ("secret", "cuda:1", "nullish")
    generate, _ = parse(GenerateArgs, "generate", ["model=m", "prompt=null", "device=null", "dtype=Null"])
    assert (generate.prompt, generate.device, generate.dtype) == ("null", None, None)
