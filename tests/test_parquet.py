"""Real corpora: Parquet files and `datasets.save_to_disk` folders (real pyarrow files), and the end-of-text
separator between documents."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from lmkit.data.cache import build_or_open
from lmkit.data.corpus import Corpus, resolve_files
from lmkit.data.tokenizer import END_OF_TEXT, BPETokenizer
from lmkit.errors import LmkitError
from tests.helpers import ROOT, TINY, run_train_py

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

DOCS = [f"{name} {verb} the {thing}.\nAnd then {i} more." for i, (name, verb, thing) in enumerate(
    (n, v, t) for n in ("ANNE", "BEN", "CLEO", "DAN") for v in ("sees", "takes", "loves")
    for t in ("moon", "sword", "rose", "crown", "ring"))] * 5  # 300 short documents


def write_parquet(path, docs=DOCS, row_group_size=64, **columns):
    table = pa.table({"id": list(range(len(docs))), "text": docs, **columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_jsonl(path, docs=DOCS):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def write_saved_dataset(folder, docs=DOCS, shards=2, batch_rows=40):
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow IPC streams, dataset_info.json, state.json."""
    folder.mkdir()
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    per_shard = -(-len(docs) // shards)
    for i, name in enumerate(names):
        table = pa.table({"text": docs[i * per_shard:(i + 1) * per_shard]})
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string", "_type": "Value"}}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "0", "_format_type": None, "_split": None}))
    return folder


def documents_of(corpus, cuts=()):
    return [d for block in corpus.blocks(cuts) for d in block.documents]


def test_parquet_row_groups_read_the_documents_a_jsonl_file_holds(tmp_path):
    parquet = write_parquet(tmp_path / "docs.parquet")
    assert pq.ParquetFile(parquet).num_row_groups == 5
    from_parquet = Corpus(resolve_files(str(parquet)))
    assert documents_of(from_parquet) == documents_of(Corpus([write_jsonl(tmp_path / "docs.jsonl")])) == DOCS
    assert resolve_files(str(tmp_path)) == [tmp_path / "docs.jsonl", parquet]  # a directory's Parquet files too
    # the same text in the token cache, document for document
    parquet_cache = build_or_open(from_parquet, {"kind": "char"}, [0.8, 0.1, 0.1], tmp_path / "cache")
    jsonl_cache = build_or_open(Corpus([tmp_path / "docs.jsonl"]), {"kind": "char"}, [0.8, 0.1, 0.1],
                                tmp_path / "cache")
    assert parquet_cache.path != jsonl_cache.path
    assert np.array_equal(parquet_cache.tokens(), jsonl_cache.tokens())


def test_parquet_splits_fall_between_documents_in_proportion(tmp_path):
    corpus = Corpus([write_parquet(tmp_path / "docs.parquet", row_group_size=100)])
    cuts = [int(corpus.total_bytes * 0.8), int(corpus.total_bytes * 0.9)]
    blocks = list(corpus.blocks(cuts))
    by_segment = [[d for b in blocks if b.segment == k for d in b.documents] for k in range(3)]
    assert sum(by_segment, []) == DOCS  # every document once, in order, none cut in two
    assert [len(s) for s in by_segment] == pytest.approx([240, 30, 30], abs=15)
    assert [b.bytes_read for b in blocks] == sorted(b.bytes_read for b in blocks)
    assert blocks[-1].bytes_read == corpus.total_bytes


def test_a_save_to_disk_folder_reads_its_arrow_files_in_order(tmp_path):
    folder = write_saved_dataset(tmp_path / "saved")
    files = resolve_files(str(folder))
    assert [f.name for f in files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    corpus = Corpus(files)
    assert documents_of(corpus) == DOCS
    blocks = list(corpus.blocks([corpus.total_bytes // 2]))
    assert blocks[-1].bytes_read == corpus.total_bytes and {b.segment for b in blocks} == {0, 1}

    (tmp_path / "dict").mkdir()  # a DatasetDict: one split must be named
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(LmkitError, match=r"several splits \(train, test\).*data.path=.*dict/train"):
        resolve_files(str(tmp_path / "dict"))


def test_bpe_separates_documents_by_one_end_of_text_token(tmp_path):
    docs = ["the moon rose.", "a sword, a crown", f"a quoted {END_OF_TEXT} is text"] * 40
    cache = build_or_open(Corpus([write_parquet(tmp_path / "d.parquet", docs)]), {"kind": "bpe", "vocab_size": 300},
                          [0.8, 0.1, 0.1], tmp_path / "cache")
    tok = cache.tokenizer
    eot = tok.end_of_text_id
    assert eot == 0 and tok.tokenizer.id_to_token(eot) == END_OF_TEXT
    tokens = np.asarray(cache.tokens()).tolist()
    assert tokens.count(eot) == len(docs) - 1  # between documents, never inside one (nor for the quoted one)
    pieces = " ".join(map(str, tokens)).split(f" {eot} ")
    assert [tok.decode(list(map(int, p.split()))) for p in pieces] == docs
    assert tok.decode(tokens[:20]) == "".join(docs)[:len(tok.decode(tokens[:20]))]  # decoding drops it
    assert len(tok.encode(END_OF_TEXT)) == 1  # a prompt that names it gets the one token


def test_char_separates_documents_by_a_blank_line(tmp_path):
    corpus = Corpus([write_jsonl(tmp_path / "a.jsonl", DOCS[:3]), write_parquet(tmp_path / "b.parquet", DOCS[3:6])])
    cache = build_or_open(corpus, {"kind": "char"}, [1.0, 0.0, 0.0], tmp_path / "cache")
    assert cache.tokenizer.end_of_text_id is None
    assert cache.tokenizer.decode(np.asarray(cache.tokens()).tolist()) == "\n\n".join(DOCS[:6])


def test_txt_files_are_documents_each(tmp_path):
    """A .txt file read in several blocks stays one document; a second file is the next one."""
    (tmp_path / "a.txt").write_text("line one\n" * 150_000)  # > 1 MB: two blocks
    (tmp_path / "b.txt").write_text("line two\n")
    corpus = Corpus(resolve_files(str(tmp_path / "*.txt")))
    tok = BPETokenizer.train(["line one\nline two\n"], vocab_size=280)
    (tmp_path / "tok.json").write_text(tok.to_json())
    cache = build_or_open(corpus, {"kind": "bpe", "path": str(tmp_path / "tok.json")}, [1.0, 0.0, 0.0],
                          tmp_path / "cache")
    tokens = np.asarray(cache.tokens())
    assert (tokens == tok.end_of_text_id).sum() == 1
    assert tok.decode(tokens.tolist()) == "line one\n" * 150_000 + "line two\n"


def test_the_join_is_part_of_the_cache_key(tmp_path):
    """A cache built before documents had separators is not reused for the same corpus and tokenizer."""
    from lmkit.data.cache import FORMAT_VERSION

    corpus = Corpus([write_jsonl(tmp_path / "a.jsonl", DOCS[:60])])
    built = build_or_open(corpus, {"kind": "char"}, [0.8, 0.1, 0.1], tmp_path / "cache").path
    spec = {"v": FORMAT_VERSION, "corpus": corpus.fingerprint(), "tokenizer": {"kind": "char"},
            "split": [0.8, 0.1, 0.1]}  # the key as lmkit computed it when JSON lines each ended in a blank line
    assert built.name != hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=12).hexdigest()


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(LmkitError, match=r"no column 'body' \(data.text_field\); its columns: id, text"):
        Corpus([write_parquet(tmp_path / "a.parquet")], text_field="body")
    with pytest.raises(LmkitError, match=r"column 'id' \(data.text_field\) holds int64, not strings"):
        Corpus([tmp_path / "a.parquet"], text_field="id")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all\n" * 20)
    with pytest.raises(LmkitError, match=r"junk.parquet: not a readable Parquet file"):
        Corpus([tmp_path / "junk.parquet"])
    whole = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(LmkitError, match=r"cut.parquet: not a readable Parquet file"):
        Corpus([tmp_path / "cut.parquet"])
    (tmp_path / "junk.arrow").write_bytes(b"\0" * 64)
    with pytest.raises(LmkitError, match=r"junk.arrow: not a readable Arrow IPC stream"):
        Corpus([tmp_path / "junk.arrow"])
    with pytest.raises(LmkitError, match="data.format='csv' is not one of auto, txt, jsonl, parquet, arrow"):
        Corpus([tmp_path / "a.parquet"], format="csv")


def test_a_corrupt_row_group_leaves_no_cache_behind(tmp_path):
    """Footer intact, data pages scrambled: the refusal comes while tokenizing, and nothing is half-written."""
    path = write_parquet(tmp_path / "a.parquet", row_group_size=300)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(1)  # the text column's pages
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(LmkitError, match=r"a.parquet: cannot read it as parquet"):
        build_or_open(Corpus([path]), {"kind": "char"}, [0.8, 0.1, 0.1], tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache" / "tokens").iterdir() if p.suffix != ".lock"]


def test_without_pyarrow_one_line_names_the_extra(tmp_path):
    write_parquet(tmp_path / "a.parquet")
    code = ("import sys; sys.modules['pyarrow'] = None\n"  # as if it were not installed
            "from lmkit.data.corpus import Corpus, resolve_files\n"
            "from lmkit.errors import LmkitError\n"
            f"try: Corpus(resolve_files({str(tmp_path / 'a.parquet')!r}))\n"
            "except LmkitError as e: print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out == "reading Parquet or Arrow files needs pyarrow, which is not installed: pip install 'lmkit[parquet]'\n"


@pytest.mark.slow
def test_train_py_learns_from_parquet_and_records_its_end_token(tmp_path, cache_dir):
    import lmkit

    parquet = write_parquet(tmp_path / "docs.parquet")
    common = ["model=transformer", *TINY, "model.n_head=2", "data=text", "tokenizer=bpe", "tokenizer.vocab_size=300",
              "trainer.max_steps=4", "trainer.val_check_interval=4", "logger=none", "callbacks.text_sampler=null"]
    result = run_train_py(*common, f"data.path={parquet}", run_dir=tmp_path / "run", cache_dir=cache_dir,
                          timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    model = lmkit.load(metrics["last_ckpt"])
    assert model.record.tokens == {"eos_token_ids": [model.tokenizer.end_of_text_id]}

    refused = run_train_py(*common, f"data.path={parquet}", "data.text_field=body", run_dir=tmp_path / "bad",
                           cache_dir=tmp_path / "bad-cache", timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {parquet}: no column 'body' (data.text_field); its columns: id, text")
    assert not (tmp_path / "bad-cache" / "tokens").exists()
