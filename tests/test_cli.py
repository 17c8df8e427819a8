"""`python train.py` as a user runs it: a subprocess, its exit code, what it prints and writes. (The command lines it
refuses before training run one after the other in one subprocess, each as train.py's __main__: run_train_py_each.)"""

import json
import math
import subprocess
from pathlib import Path

import pytest

from lmkit.train import run
from tests.helpers import TINY, assert_clean_error, run_train_py, run_train_py_each, train_py_args

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
    # (a sample of a few tokens: 200, the default, from GPT-2 small's 124M parameters take half a minute on 2 cores)
    result = run_train_py("-m", "experiment=glob(*)", "trainer.fast_dev_run=true", "data.batch_size=2",
                          "data.eval_batch_size=2", "data.seq_len=32", "logger=none",
                          "callbacks.text_sampler.max_new_tokens=8", f"hydra.sweep.dir={sweep}",
                          run_dir=tmp_path / "unused", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    experiments = sorted(p.stem for p in (Path(__file__).parent.parent / "conf" / "experiment").glob("*.yaml"))
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == len(experiments)
    assert all((job / "metrics.json").exists() for job in jobs)


@pytest.fixture(scope="module")
def lstm_checkpoint(tmp_path_factory, cache_dir) -> tuple[Path, Path]:
    """A small LSTM trained on the tiny corpus: its last checkpoint, and the corpus."""
    from hydra import compose, initialize_config_dir

    from tests.helpers import CONF, write_tiny_corpus

    tmp = tmp_path_factory.mktemp("lstm")
    corpus = write_tiny_corpus(tmp / "tiny.txt")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp / 'trained'}", f"paths.cache_dir={cache_dir}",
                                          "data=text", f"data.path={corpus}", "data.split=[0.8,0.1,0.1]", *TINY_RUN,
                                          "logger=none"])
    metrics, _ = run(cfg)
    return Path(metrics["last_ckpt"]), corpus


BAD_CORPORA = {  # data.path (in a folder holding empty.txt and bad.txt), and what the error line names
    "missing": ("nope.txt", ["no such file", "nope.txt"]),
    "glob": ("*.md", ["matches no files", "*.md"]),
    "empty": ("empty.txt", ["corpus is empty", "empty.txt"]),
    "undecodable": ("bad.txt", ["bad.txt", "offset 15", "data.errors=replace"]),
}
BAD_SETTINGS = [
    (["data=text"], "data.path is required"),
    (["tokenizer=file", "tokenizer.path=nope.json"], "tokenizer.path: no such file: nope.json"),
    (["data.seq_len=0"], "data.seq_len=0"),
    (["optim.name=sgd"], "optim.name='sgd'"),
]
UNKNOWN = [("model.nonsense=1", "Key 'nonsense' is not in struct"), ("model=mamba", "Could not find 'model/mamba'")]


@pytest.fixture(scope="module")
def refused(tmp_path_factory, cache_dir, lstm_checkpoint) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """`python train.py` with each command line the tests below check it refuses, before any training: name ->
    (what it printed and its exit code, the case's folder, which holds its run folder `run`). All run in one
    interpreter (run_train_py_each), each as train.py's __main__ with its own arguments and output."""
    base = tmp_path_factory.mktemp("refused")
    ckpt, corpus = lstm_checkpoint
    corpora = base / "corpus"
    corpora.mkdir()
    (corpora / "empty.txt").write_text("")
    (corpora / "bad.txt").write_bytes(b"fine\n" * 3 + b"\xc3\x28 oops\n")
    other = base / "other.txt"
    other.write_text(corpus.read_text() + "Quixotic zeal!\n")  # more characters: a bigger vocabulary
    truncated = base / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    resume = ["data.split=[0.8,0.1,0.1]", *TINY_RUN, f"resume={ckpt}"]
    cases = {  # name -> (overrides, token cache)
        "config_dir": ([f"--config-dir={base / 'config_dir' / 'my_conf'}"], cache_dir),
        **{f"corpus_{name}": (["data=text", f"data.path={corpora / path}", *TINY_RUN], base / f"corpus_{name}" / "cache")
           for name, (path, _) in BAD_CORPORA.items()},
        **{f"unknown_{i}": ([override], cache_dir) for i, (override, _) in enumerate(UNKNOWN)},
        "seq_len": (["model=transformer", "model.max_seq_len=16", *TINY, "model.n_head=2"], cache_dir),
        "other_tokenizer": (["data=text", f"data.path={other}", *resume], cache_dir),
        "other_model": (["data=text", f"data.path={corpus}", *resume, "model.n_embd=48"], cache_dir),
        "corrupt": (["data=text", f"data.path={corpus}", "data.split=[0.8,0.1,0.1]", *TINY_RUN,
                     f"resume={truncated}"], cache_dir),
        **{f"settings_{i}": ([*TINY_RUN, *overrides], cache_dir) for i, (overrides, _) in enumerate(BAD_SETTINGS)},
    }
    results = run_train_py_each({name: train_py_args(*overrides, run_dir=base / name / "run", cache_dir=cache)
                                 for name, (overrides, cache) in cases.items()}, cwd=base)
    return {name: (results[name], base / name) for name in cases}


def test_a_config_dir_that_does_not_exist_is_one_line(refused, tmp_path):
    from lmkit.conf import check_config_dirs
    from lmkit.errors import LmkitError

    result, folder = refused["config_dir"]
    missing = folder / "my_conf"
    assert result.returncode == 2
    assert_clean_error(result, "no such folder", str(missing), run_dir=folder / "run")
    for args in (["-cd", str(missing)], [f"-cd={missing}"], ["--config-dir", str(missing), "model=lstm"]):
        with pytest.raises(LmkitError, match="no such folder"):
            check_config_dirs(args)
    check_config_dirs(["--config-dir", str(tmp_path)])  # one that exists is fine


@pytest.mark.parametrize("case", BAD_CORPORA)
def test_bad_corpus_gives_one_line(case, refused):
    result, folder = refused[f"corpus_{case}"]
    assert_clean_error(result, *BAD_CORPORA[case][1], run_dir=folder / "run")
    assert not list((folder / "cache").rglob("*.tmp-*"))  # nothing half-written in the cache


@pytest.mark.parametrize("index", range(len(UNKNOWN)), ids=[override for override, _ in UNKNOWN])
def test_unknown_config_key_or_option_is_hydras_one_message(index, refused):
    result, message = refused[f"unknown_{index}"][0], UNKNOWN[index][1]
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_seq_len_beyond_the_model_context(refused):
    result, folder = refused["seq_len"]
    assert_clean_error(result, "data.seq_len=32", "model.max_seq_len=16", run_dir=folder / "run")


def test_resume_with_a_checkpoint_that_does_not_fit(refused, lstm_checkpoint):
    ckpt, _ = lstm_checkpoint
    result, folder = refused["other_tokenizer"]
    assert_clean_error(result, "different tokenizer", str(ckpt), run_dir=folder / "run")
    result, folder = refused["other_model"]
    assert_clean_error(result, "different model", "model.n_embd: checkpoint 32 vs run 48", run_dir=folder / "run")


def test_corrupt_checkpoint(refused):
    result, folder = refused["corrupt"]
    assert_clean_error(result, "corrupt or truncated", "truncated.ckpt", run_dir=folder / "run")


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


@pytest.mark.parametrize("index", range(len(BAD_SETTINGS)), ids=[fragment for _, fragment in BAD_SETTINGS])
def test_bad_settings_give_one_line(index, refused):
    result, folder = refused[f"settings_{index}"]
    assert_clean_error(result, BAD_SETTINGS[index][1], run_dir=folder / "run")


def test_log_every_n_steps_zero_and_no_validation_still_finish(make_cfg):
    metrics, _ = run(make_cfg(*TINY_RUN, "trainer.log_every_n_steps=0", "trainer.limit_val_batches=0",
                              "logger=none", "callbacks=none"))
    assert metrics["steps"] == 20 and metrics["val_loss"] is None and metrics["test_loss"] is not None


def test_null_unsets_an_optional_text_option_and_stays_text_elsewhere(monkeypatch):
    """`api_key=null` turns auth off (even over LMKIT_API_KEY) and `device=null` means the CPU, as conf/serve.yaml
    and conf/generate.yaml document; a text option that cannot be unset (prompt) keeps `null` as its text."""
    from lmkit.cli import GenerateArgs, parse
    from lmkit.serve.settings import ServeSettings

    monkeypatch.setenv("LMKIT_API_KEY", "secret")
    serve, _ = parse(ServeSettings, "serve", ["model=m", "api_key=null", "device=NULL", "name=null"])
    assert (serve.api_key, serve.device, serve.name) == (None, None, None)
    serve, _ = parse(ServeSettings, "serve", ["model=m", "device=cuda:1", "name=nullish"])
    assert (serve.api_key, serve.device, serve.name) == ("secret", "cuda:1", "nullish")
    generate, _ = parse(GenerateArgs, "generate", ["model=m", "prompt=null", "device=null", "dtype=Null"])
    assert (generate.prompt, generate.device, generate.dtype) == ("null", None, None)
