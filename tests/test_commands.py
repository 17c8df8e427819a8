"""`lmkit export | generate | eval | import-hf` as a user runs them, and fine-tuning with init_from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmkit
from lmkit.train import run
from tests.helpers import CHARS, TINY, hf_model, lmkit_main, one_error_line, tiny_lm

transformers = pytest.importorskip("transformers")
LMKIT = str(Path(sys.executable).parent / "lmkit")


def lmkit_cmd(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([LMKIT, *args], capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})})


def test_export_generate_eval_from_a_checkpoint(trained, tmp_path):
    env = {"LMKIT_CACHE": str(trained["cache"])}
    result = lmkit_cmd("export", f"model={trained['ckpt']}", f"out={tmp_path / 'art'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    art = tmp_path / "art"
    config = json.loads((art / "config.json").read_text())
    assert config["model"]["kind"] == "transformer" and config["tokenizer"] == "char" and config["dtype"] == "float32"
    assert "lmkit.load" in (art / "README.md").read_text()
    torch.testing.assert_close(lmkit.load(art)(torch.tensor([[5, 6, 7]])), lmkit.load(trained["ckpt"])(torch.tensor([[5, 6, 7]])))

    again = lmkit_cmd("export", f"model={trained['ckpt']}", f"out={art}", cwd=tmp_path)
    one_error_line(again, "not empty", "overwrite=true")

    gen = lmkit_cmd("generate", f"model={art}", "prompt=ROMEO:", "max_new_tokens=30", "num_samples=2", "seed=1",
                    "temperature=0.8", "top_k=10", "top_p=0.9", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-2000:]
    # the text InferenceModel.generate gives with the same settings: every option reached the sampler
    model = lmkit.load(art)
    samples = model.generate("ROMEO:", max_new_tokens=30, num_samples=2, seed=1, temperature=0.8, top_k=10, top_p=0.9)
    assert gen.stdout == f"--- sample 1\n{samples[0]}\n--- sample 2\n{samples[1]}\n"
    assert samples != model.generate("ROMEO:", max_new_tokens=30, num_samples=2, seed=2, temperature=0.8, top_k=10,
                                     top_p=0.9)  # (the seed matters, so the match above is not luck)

    (tmp_path / "prompt.txt").write_text("JULIET:\n")
    streamed = lmkit_cmd("generate", f"model={art}", f"prompt=@{tmp_path / 'prompt.txt'}", "max_new_tokens=20",
                         "stream=true", "seed=3", "temperature=0.8", cwd=tmp_path)
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    # streamed piece by piece, the same text as generated in one go
    assert streamed.stdout == model.generate("JULIET:\n", max_new_tokens=20, seed=3, temperature=0.8) + "\n"

    ev = lmkit_cmd("eval", f"model={art}", cwd=tmp_path, env=env)
    assert ev.returncode == 0, ev.stderr[-2000:]
    report = json.loads(ev.stdout)
    assert report["loss"] == pytest.approx(trained["metrics"]["test_loss"], rel=1e-3)
    assert report["bits_per_char"] == pytest.approx(report["loss"] / 0.6931471805599453)
    assert report["parameters"] > 0 and report["tokens_per_s"] > 0

    text = tmp_path / "other.txt"
    text.write_text("ROMEO: a line of text for evaluation.\n" * 200)
    other = lmkit_cmd("eval", f"model={art}", "data=text", f"data.path={text}", "data.seq_len=16", cwd=tmp_path, env=env)
    assert other.returncode == 0 and json.loads(other.stdout)["tokens"] > 0, other.stderr[-2000:]


def test_import_hf_then_export_hf_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32,
                                                              vocab_size=300)).eval()
    hf.save_pretrained(tmp_path / "hf")
    result = lmkit_cmd("import-hf", f"src={tmp_path / 'hf'}", f"out={tmp_path / 'art'}", cwd=tmp_path)
    assert result.returncode == 0 and "no tokenizer" in result.stdout, result.stderr[-2000:]
    result = lmkit_cmd("export", f"model={tmp_path / 'art'}", "format=hf", f"out={tmp_path / 'back'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fine_tune_from_an_imported_model(family, tmp_path, make_cfg, tiny_corpus):
    from lmkit.data.tokenizer import BPETokenizer
    from lmkit.evaluate import evaluate
    from lmkit.export import save
    from lmkit.hf import import_hf

    tok = BPETokenizer.train([tiny_corpus.read_text()], vocab_size=300)
    torch.manual_seed(0)
    if family == "gpt2":
        transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64,
                                                             vocab_size=tok.vocab_size)).save_pretrained(tmp_path / "hf")
    else:  # with an end token and a chat template, which the fine-tune keeps
        hf_model(tmp_path / "hf", vocab_size=tok.vocab_size, hidden_size=16, eos_token_id=5)
        (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (tmp_path / "hf" / "tokenizer.json").write_text(tok.to_json())
    save(import_hf(tmp_path / "hf"), tmp_path / "imported")
    # lr 0: the run must evaluate exactly the imported weights, through the imported tokenizer
    metrics, objects = run(make_cfg(f"init_from={tmp_path / 'imported'}", "data=text", f"data.path={tiny_corpus}",
                                    "data.split=[0.8,0.1,0.1]", *TINY, "optim.lr=0", "trainer.max_steps=2",
                                    "trainer.val_check_interval=2", "logger=none", "callbacks=none"))
    assert objects["module"].backbone.config.n_embd == 16 and objects["module"].tokenizer.to_json() == tok.to_json()
    datamodule = objects["datamodule"]
    reference = evaluate(lmkit.load(tmp_path / "imported"), datamodule.cache.split("test"), seq_len=datamodule.seq_len,
                         batch_size=datamodule.eval_batch_size)
    assert metrics["test_loss"] == pytest.approx(reference["loss"], rel=1e-5)
    objects["trainer"].save_checkpoint(tmp_path / "tuned.ckpt")
    assert lmkit.load(tmp_path / "tuned.ckpt").record.tokens == lmkit.load(tmp_path / "imported").record.tokens
    if family == "llama":
        assert lmkit.load(tmp_path / "imported").record.tokens == {"bos_token_id": 1, "eos_token_ids": [5],
                                                               "chat_template": "{{ messages }}"}


@pytest.mark.parametrize("case", ["neither", "version", "missing_keys", "truncated", "not_covered"])
def test_bad_model_inputs_give_one_line(case, tmp_path):
    """Through `lmkit`'s main in this process (lmkit_main): the one-line refusals of `lmkit generate` and `lmkit
    import-hf` in a process of their own are test_prompt_characters_the_tokenizer_lacks's and test_hf_llama.py's."""
    art = tmp_path / "art"
    if case != "neither":
        from lmkit.export import save

        save(tiny_lm(), art)
    config = json.loads((art / "config.json").read_text()) if art.exists() else {}
    if case == "version":
        (art / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    elif case == "missing_keys":
        del config["model"]["kind"]
        (art / "config.json").write_text(json.dumps(config))
    elif case == "truncated":
        data = (art / "model.safetensors").read_bytes()
        (art / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "not_covered":
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
        result = lmkit_main("import-hf", f"src={tmp_path / 'hf'}", f"out={tmp_path / 'x'}")
        one_error_line(result, "model_type='mamba'", "gpt2, llama, qwen2")
        assert not (tmp_path / "x").exists()
        return
    target = tmp_path / "nothing-here" if case == "neither" else art
    result = lmkit_main("generate", f"model={target}", "max_new_tokens=3")
    fragment = {"neither": "neither an lmkit model directory", "version": "format 99",
                "missing_keys": "lacks model.kind", "truncated": "corrupt, truncated"}[case]
    one_error_line(result, fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without a GPU")
def test_a_device_this_machine_lacks_is_one_line(tmp_path):
    from lmkit.export import save

    save(tiny_lm(), tmp_path / "art")
    for command in ("generate", "eval"):
        one_error_line(lmkit_main(command, f"model={tmp_path / 'art'}", "device=cuda"), "device=cuda: this machine has "
                       "no CUDA GPU")
    one_error_line(lmkit_main("generate", f"model={tmp_path / 'art'}", "device=gpu7"), "device=gpu7 is not a device")


def test_prompt_characters_the_tokenizer_lacks(tmp_path):
    from lmkit.export import save
    from tests.helpers import decode_by_hand

    save(tiny_lm(), tmp_path / "art")
    result = lmkit_cmd("generate", f"model={tmp_path / 'art'}", "prompt=naïve€", cwd=tmp_path)
    one_error_line(result, "'ï€'")
    result = lmkit_cmd("generate", f"model={tmp_path / 'art'}", "prompt=naïve€", "unknown=skip", "max_new_tokens=3",
                       "temperature=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == decode_by_hand(tiny_lm(), "nave", 3) + "\n"  # the model continued the cleaned prompt
    one_error_line(lmkit_cmd("generate", f"model={tmp_path / 'art'}", "temprature=1", cwd=tmp_path), "temprature")


def test_eval_never_instantiates_a_class_path_from_the_model_file(tmp_path, tiny_corpus):
    """A stranger's config.json may name any `_target_`: lmkit eval must not call it."""
    from lmkit.export import save
    from tests.helpers import ROOT

    marker = tmp_path / "pwned"
    model = tiny_lm()
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(c for c in tiny_corpus.read_text() if c in CHARS))
    model.record.data = {"_target_": "tests.helpers.touch_marker", "marker": str(marker), "source": "text",
                         "path": str(corpus), "seq_len": 16, "split": [0.8, 0.1, 0.1]}
    save(model, tmp_path / "art")
    result = lmkit_cmd("eval", f"model={tmp_path / 'art'}", cwd=tmp_path,
                       env={"PYTHONPATH": str(ROOT), "LMKIT_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists() and json.loads(result.stdout)["loss"] > 0
