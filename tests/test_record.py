"""ModelRecord: one typed description of a model, read from config.json files old and new and from checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import lmkit
from lmkit.backbones import LSTMConfig, TransformerConfig
from lmkit.errors import LmkitError
from lmkit.export import save
from lmkit.record import FORMAT_VERSION, ModelRecord
from tests.helpers import ROOT

DATA = ROOT / "tests" / "data"  # artifacts written by lmkit before ModelRecord existed (commit 608061f)


@pytest.mark.parametrize("name,kind", [("format1-transformer", "transformer"), ("format1-lstm-prune-int8", "lstm")])
def test_artifacts_written_by_the_previous_format_load_their_weights_bit_exact(name, kind):
    # Weights are bytes and must load unchanged; logits come from whichever kernels this CPU has (AVX2, AVX-512,
    # AMX reduce in different orders), so they are held to a float32 tolerance, not to the bits of the machine
    # that stored them.
    expected = load_file(DATA / name / "model.safetensors")
    model = lmkit.load(DATA / name)
    assert model.record.kind == kind and model.record.tokenizer == "char"
    loaded = model.backbone.state_dict()
    stored_plainly = [key for key in expected if "__" not in key]  # a sparse tensor is stored as values + mask
    assert stored_plainly and all(torch.equal(loaded[key], expected[key]) for key in stored_plainly)
    logits = load_file(DATA / "format1-logits.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(logits["ids"]), logits[kind], rtol=1e-5, atol=1e-5)


def test_record_round_trips_through_config_json(tmp_path):
    model = lmkit.load(DATA / "format1-lstm-prune-int8")
    record = model.record
    assert isinstance(record.backbone, LSTMConfig) and [s["plugin"] for s in record.compression] == ["prune", "int8"]
    save(model, tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert written["format_version"] == FORMAT_VERSION and written["lmkit_version"] == lmkit.__version__
    again = ModelRecord.from_file(tmp_path / "again")
    assert again == record.replace(tokenizer="char")
    with torch.no_grad():
        ids = torch.arange(12).reshape(2, 6)
        assert torch.equal(lmkit.load(tmp_path / "again")(ids), model(ids))


def test_model_settings_are_the_model_group_keys():
    record = ModelRecord.from_settings({"kind": "transformer", "n_layer": 2, "n_head": 2, "n_embd": 16,
                                        "compile": True}, vocab_size=50)
    assert isinstance(record.backbone, TransformerConfig) and record.backbone.vocab_size == 50
    settings = record.model_settings
    assert settings["kind"] == "transformer" and "vocab_size" not in settings and "compile" not in settings
    assert ModelRecord.from_settings(settings, vocab_size=50) == record


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(format_version=FORMAT_VERSION + 1), "upgrade lmkit"),
    (lambda c: c.pop("format"), "not an lmkit config"),
    (lambda c: c["model"].pop("kind"), "lacks model.kind"),
    (lambda c: c.update(dtype="float8"), "dtype='float8'"),
    (lambda c: c.update(tokenizer="sentencepiece"), "tokenizer='sentencepiece'"),
    (lambda c: c.update(compression=[{"settings": {}}]), "list of {plugin, settings}"),
    (lambda c: c["model"].update(n_heads=3), "has no option n_heads"),
    (lambda c: c["model"].update(n_head=5), "not divisible"),
])
def test_a_bad_config_json_is_one_error_naming_the_problem(change, message, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(DATA / "format1-transformer", art)
    config = json.loads((art / "config.json").read_text())
    change(config)
    (art / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmkitError, match=message.replace("{", r"\{").replace("(", r"\(")):
        lmkit.load(art)
