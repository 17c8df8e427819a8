import json

import numpy as np
import pytest

from lmkit.data.cache import build_or_open
from lmkit.data.corpus import BLOCK_BYTES, Corpus, resolve_files
from lmkit.data.shakespeare import play_to_text, shakespeare_text
from lmkit.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer, tokenizer_from_json
from lmkit.data.windows import EvalBatches, TrainBatches
from lmkit.errors import LmkitError


def test_shakespeare_is_plain_text_in_tiny_shakespeare_shape():
    text = shakespeare_text()
    assert len(text) > 4_000_000 and text == shakespeare_text()  # the complete plays, deterministic
    assert text.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    assert not set("#*_[]\\") & set(text)  # headings, emphasis, escapes, stage directions gone
    assert "  \n" not in text  # markdown line-break spaces gone
    speaker_lines = [line for line in text.splitlines() if line.endswith(":") and line[:-1].isupper()]
    assert len(speaker_lines) > 20_000


def test_play_to_text_drops_directions_and_joins_continued_speeches():
    md = ("# A Play\n\n## ACT I\n\n_Enter ANNE, with\nothers_\n\n**ANNE**  \n_\\[Aside]_  \nGood *morrow*,  \n"
          "sir.\n\n_Exit BEN_\n\nAnd farewell.\n\n**BEN**  \nAdieu.\n")
    assert play_to_text(md) == "ANNE:\nGood morrow,\nsir.\nAnd farewell.\n\nBEN:\nAdieu.\n"


@pytest.mark.parametrize("text", ["hello, world\n", "ünïcødé — ok", ""])
def test_char_tokenizer_round_trip(text):
    tok = CharTokenizer.from_texts(["hello, world\nünïcødé — ok"])
    assert tok.decode(tok.encode(text)) == text
    again = tokenizer_from_json(tok.to_json())
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size


def test_char_tokenizer_names_unknown_characters():
    tok = CharTokenizer("abc")
    with pytest.raises(LmkitError, match="'xz'"):
        tok.encode("abxcz")


def test_bpe_tokenizer_round_trips_any_text(tmp_path):
    tok = BPETokenizer.train(["the cat sat on the mat. " * 50, "the dog sat on the log. " * 50], vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    text = "the cat sat — 猫 🐈 on\nthe log"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the cat sat on the mat.")) < len("the cat sat on the mat.")  # merges learned
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(text) == tok.encode(text)


def test_blocks_cut_exactly_at_line_ends_and_cover_the_corpus(tmp_path):
    lines = [f"line {i} " + "x" * (i % 97) for i in range(40_000)]  # ~2.7 MB: several blocks
    path = tmp_path / "big.txt"
    path.write_text("\n".join(lines) + "\n")
    corpus = Corpus([path])
    assert corpus.total_bytes > 2 * BLOCK_BYTES
    cuts = [int(corpus.total_bytes * 0.9), int(corpus.total_bytes * 0.95)]
    pieces = list(corpus.blocks(cuts))
    assert all(len(b.documents) == 1 for b in pieces) and [b.continues for b in pieces[:2]] == [False, True]
    assert "".join(b.documents[0] for b in pieces) == path.read_text()
    by_segment = ["".join(b.documents[0] for b in pieces if b.segment == k) for k in range(3)]
    assert all(seg.endswith("\n") for seg in by_segment)
    assert len(by_segment[0].encode()) >= cuts[0] > len(by_segment[0].encode()) - 200


def test_jsonl_documents_are_read_from_their_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"doc {i}", "id": i}) for i in range(3)) + "\n")
    docs = [d for b in Corpus([path], text_field="body").blocks() for d in b.documents]
    assert docs == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(LmkitError, match="'text'"):
        list(Corpus([path]).blocks())


def test_undecodable_bytes_name_the_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\n" * 10 + b"bad \xff byte\n")
    with pytest.raises(LmkitError, match=r"bad.txt.*offset 104.*data.errors=replace"):
        list(Corpus([path]).blocks())
    assert "\ufffd" in "".join(b.documents[0] for b in Corpus([path], errors="replace").blocks())


def test_resolve_files_errors_name_the_path(tmp_path):
    with pytest.raises(LmkitError, match="no such file: .*missing.txt"):
        resolve_files(str(tmp_path / "missing.txt"))
    with pytest.raises(LmkitError, match=r"glob .*\*.md.* matches no files"):
        resolve_files(str(tmp_path / "*.md"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LmkitError, match="corpus is empty"):
        Corpus(resolve_files(str(tmp_path / "*.txt")))


def test_token_cache_is_split_contiguously_and_reused(tmp_path, tiny_corpus):
    corpus = Corpus([tiny_corpus])
    first = build_or_open(corpus, {"kind": "char"}, [0.8, 0.1, 0.1], tmp_path / "cache")
    text = tiny_corpus.read_text()
    tokens = np.asarray(first.tokens())
    assert tokens.dtype == np.uint16 and first.bounds[0] == 0 and first.bounds[-1] == len(tokens)
    assert first.tokenizer.decode(tokens.tolist()) == text
    val_text = first.tokenizer.decode(first.split("val").tolist())
    assert val_text.endswith("\n") and val_text in text and len(val_text) == pytest.approx(0.1 * len(text), rel=0.1)

    stamp = (first.path / "tokens.bin").stat().st_mtime_ns
    second = build_or_open(corpus, {"kind": "char"}, [0.8, 0.1, 0.1], tmp_path / "cache")
    assert second.path == first.path and (second.path / "tokens.bin").stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "cache" / "tokens").iterdir() if ".tmp-" in p.name]

    tiny_corpus.write_text(text + "A new line.\n")  # new contents, new cache entry
    assert build_or_open(Corpus([tiny_corpus]), {"kind": "char"}, [0.8, 0.1, 0.1], tmp_path / "cache").path != first.path


def test_bpe_cache_learns_from_the_training_split_only(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("aaaa bbbb\n" * 900 + "zzzzqqqq\n" * 100)  # the last 10% is only z and q
    cache = build_or_open(Corpus([path]), {"kind": "bpe", "vocab_size": 300}, [0.9, 0.05, 0.05], tmp_path / "cache")
    vocab = cache.tokenizer.tokenizer.get_vocab()
    assert any("aaaa" in t for t in vocab) and not any("zz" in t for t in vocab)


def test_train_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    stream = iter(TrainBatches(tokens, seq_len=16, batch_size=4, seed=3))
    batches = [next(stream) for _ in range(6)]
    x, y = batches[0]
    assert x.shape == (4, 16) and (y == x + 1).all()  # targets are the inputs shifted by one
    resumed = next(iter(TrainBatches(tokens, seq_len=16, batch_size=4, seed=3, start=5)))
    assert all((a == b).all() for a, b in zip(resumed, batches[5]))
    # Two ranks of batch 2 draw exactly the windows one process of batch 4 draws.
    ranks = [next(iter(TrainBatches(tokens, 16, 2, seed=3, rank=r, world_size=2))) for r in range(2)]
    assert (np.concatenate([r[0] for r in ranks]) == x.numpy()).all()


def test_eval_batches_cover_each_window_once_across_ranks():
    tokens = np.arange(1_000, dtype=np.uint16)
    full = np.concatenate([x.numpy() for x, _ in EvalBatches(tokens, seq_len=10, batch_size=8)])
    assert len(full) == 99 and len(np.unique(full[:, 0])) == 99
    shards = [np.concatenate([x.numpy() for x, _ in EvalBatches(tokens, 10, 8, rank=r, world_size=3)]) for r in range(3)]
    starts = np.concatenate([s[:, 0] for s in shards])
    assert sorted(starts) == sorted(full[:, 0])
    capped = EvalBatches(tokens, seq_len=10, batch_size=8, max_windows=10)
    assert sum(len(x) for x, _ in capped) == 10
