"""ChatDataModule (`data=chat`): conversations and instruction records -> rendered token ids and the tokens learned ->
packed (or padded) batches whose targets are IGNORE (-100) wherever the model does not learn.

Records come from JSON lines, Parquet or Arrow files (`data.path`, as for `data=text`), each a conversation
(`messages`, OpenAI's shape) or an instruction record (prompt and response fields); lmkit.data.chat renders them
with the model's chat template. Rendering and tokenizing happen once, into a cache folder (`<cache_dir>/chat/<key>`:
`ids.bin`, `learn.bin`, one mark per token, `docs.npz`, per conversation, `meta.json`), built in a temporary folder
and renamed into place by a node's first rank while the others wait, as the token cache is (lmkit.data.cache).

What depends on `data.seq_len` is decided at setup, from the cache: a conversation longer than seq_len + 1 tokens is
cut there (a response longer than seq_len is refused), and the training split is packed, `data.packing=true`, into
rows of seq_len + 1 tokens (best fit, longest first; a token attends only to its own conversation, its positions
counting from the conversation's start, where the backbone can: the Transformer) or, `data.packing=false`, each
conversation is a row of its own, a batch padded to its longest. Batch `i` is a pure function of `(seed, i)`, and
data-parallel rank `r` of `W` takes its slice of the global batch, as TrainBatches does (lmkit.data.windows).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch

from lmkit.data.cache import _locked, _validate_split, build_tokenizer, wait_for
from lmkit.data.chat import IGNORE, end_of_turn_ids, record_messages, render_chat, resolve_template
from lmkit.data.columnar import COLUMNAR_FORMATS, _arrow_errors, pyarrow
from lmkit.data.corpus import resolve_files
from lmkit.data.tokenizer import Tokenizer
from lmkit.distributed import data_parallel, local_rank
from lmkit.errors import LmkitError, first_line
from lmkit.files import atomic_directory

log = logging.getLogger(__name__)
CACHE_VERSION = 1
FORMATS = ("auto", "jsonl", "parquet", "arrow")
SPLITS = ("train", "val", "test")


class ChatBatch(NamedTuple):
    """A batch of rows: `inputs` and `targets` (B, T), targets IGNORE where nothing is learned (prompts, padding,
    the first token of each packed conversation); `documents` (B, T), for packed rows, which conversation of its
    row each position belongs to (-1: padding), None when each row holds one; `tokens`, how many inputs are not
    padding (what tokens/s counts)."""
    inputs: torch.Tensor
    targets: torch.Tensor
    documents: torch.Tensor | None
    tokens: int


@dataclass
class ChatCache:
    """Rendered conversations, one after another, in split order: `ids` and `learn` per token; per conversation its
    first token (`starts`, one more at the end), longest learned run, learned-token count and source record."""
    path: Path
    tokenizer: Tokenizer
    meta: dict[str, Any]
    starts: np.ndarray
    longest: np.ndarray
    learned: np.ndarray
    source: np.ndarray  # (n, 2): the file's index in meta["files"], the record's number in it (1-based)

    @classmethod
    def open(cls, path: Path, tokenizer: Tokenizer) -> ChatCache:
        meta = json.loads((path / "meta.json").read_text())
        with np.load(path / "docs.npz") as docs:
            return cls(path, tokenizer, meta, docs["starts"], docs["longest"], docs["learned"], docs["source"])

    @property
    def bounds(self) -> list[int]:
        """Conversation indices: train = [b0, b1), val = [b1, b2), test = [b2, b3)."""
        return self.meta["bounds"]

    def ids(self) -> np.memmap:
        return np.memmap(self.path / "ids.bin", dtype=self.meta["dtype"], mode="r", shape=(self.meta["n_tokens"],))

    def learn(self) -> np.memmap:
        return np.memmap(self.path / "learn.bin", dtype=np.uint8, mode="r", shape=(self.meta["n_tokens"],))

    def docs(self, name: str) -> np.ndarray:
        i = SPLITS.index(name)
        return np.arange(self.bounds[i], self.bounds[i + 1])

    def split(self, name: str) -> np.ndarray:
        """The split's tokens, its conversations one after another (what `lmkit eval` and compression's
        calibration read, as a token cache's split)."""
        i = SPLITS.index(name)
        return self.ids()[self.starts[self.bounds[i]]:self.starts[self.bounds[i + 1]]]

    def where(self, doc: int) -> str:
        file, record = self.source[doc]
        return f"{self.meta['files'][file]}, record {record}"


class ChatDataModule(L.LightningDataModule):
    """Built from conf/data/chat.yaml, which documents and holds every default. `model_tokens` are the token
    conventions of the model being trained (lmkit.record.TOKENS: its chat template, end-of-sequence ids), which
    lmkit.train.run passes in; `tokens` are those the trained model records: the template it learned, and the
    template's end-of-turn token among those generation stops at."""

    def __init__(self, *, source: str, path: str | list[str], seq_len: int, batch_size: int,
                 eval_batch_size: int | None, val_windows: int | None, test_windows: int | None,
                 split: tuple[float, float, float], tokenizer: dict[str, Any], cache_dir: str, seed: int,
                 format: str = "auto", messages_field: str | None = "messages", prompt_field: str = "prompt",
                 response_field: str = "response", input_field: str | None = None, system_field: str | None = None,
                 chat_template: str | None = None, packing: bool = True, errors: str = "strict",
                 model_tokens: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if source != "chat":
            raise LmkitError(f"data.source={source!r}: ChatDataModule reads data=chat")
        if seq_len < 1 or batch_size < 1:
            raise LmkitError(f"data.seq_len={seq_len} and data.batch_size={batch_size} must be positive")
        if format not in FORMATS:
            raise LmkitError(f"data.format={format!r} is not one of {', '.join(FORMATS)} (data=chat reads records)")
        if errors not in ("strict", "replace"):
            raise LmkitError(f"data.errors={errors!r} is not one of strict, replace")
        if not path:
            raise LmkitError("data=chat needs data.path=FILE, DIR or GLOB (.jsonl, .parquet or a datasets folder)")
        self.path, self.format, self.errors = path, format, errors
        self.fields = {"messages": messages_field, "prompt": prompt_field, "response": response_field,
                       "input": input_field, "system": system_field}
        self.chat_template, self.packing = chat_template, bool(packing)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_windows, self.test_windows = val_windows, test_windows
        self.split = _validate_split(list(split))
        self.tokenizer_spec = dict(tokenizer)
        self.cache_dir = Path(cache_dir).expanduser()
        self.seed = seed
        self.model_tokens = dict(model_tokens or {})
        self.cache: ChatCache | None = None
        self.stats: dict[str, float | int] = {}
        self._units: dict[str, list[np.ndarray]] = {}  # per split: the rows, each an array of conversations

    @property
    def tokenizer(self) -> Tokenizer:
        self.prepare_data()
        return self.cache.tokenizer

    @property
    def tokens(self) -> dict[str, Any]:
        """The token conventions the trained model records: the model's own, with the chat template it learned and
        the template's end-of-turn tokens among those generation stops at."""
        self.prepare_data()
        tokens = dict(self.model_tokens, chat_template=self.cache.meta["template"])
        eos = list(tokens.get("eos_token_ids") or [])
        tokens["eos_token_ids"] = eos + [i for i in self.cache.meta["end_of_turn"] if i not in eos]
        return tokens

    def prepare_data(self) -> None:
        # Idempotent, and safe on every rank: a node's first rank renders, the others wait for its cache.
        if self.cache is not None:
            return
        kind = self.tokenizer_spec.get("kind")
        if kind not in ("json", "file"):
            raise LmkitError(f"data=chat fine-tunes a model with its own tokenizer and chat conventions: give "
                             f"init_from=MODEL (or tokenizer=file tokenizer.path=tokenizer.json), not tokenizer={kind}")
        tokenizer = build_tokenizer(self.tokenizer_spec, None)
        template = resolve_template(self.model_tokens, tokenizer, self.chat_template)
        files = resolve_files(self.path)
        for f in files:
            self._kind(f)  # a file of another kind fails now
        key = _cache_key(files, {"v": CACHE_VERSION, "format": self.format, "fields": self.fields,
                                 "errors": self.errors, "split": self.split,
                                 "template": [template.template, template.bos_token, template.eos_token],
                                 "tokenizer": hashlib.blake2b(tokenizer.to_json().encode()).hexdigest()})
        path = self.cache_dir / "chat" / key
        if not (path / "meta.json").exists():
            if local_rank() != 0:
                wait_for(path / "meta.json")
            else:
                with _locked(path.with_suffix(".lock")):
                    if not (path / "meta.json").exists():
                        with atomic_directory(path, overwrite=True) as tmp:
                            self._build(files, tokenizer, template, tmp)
        self.cache = ChatCache.open(path, tokenizer)
        self._plan()

    def _kind(self, path: Path) -> str:
        kind = self.format if self.format != "auto" else \
            "jsonl" if path.suffix in (".jsonl", ".json") else COLUMNAR_FORMATS.get(path.suffix)
        if kind is None:
            raise LmkitError(f"{path}: data=chat reads JSON lines (.jsonl), Parquet or Arrow files, not "
                             f"{path.suffix or 'a file without an extension'}")
        return kind

    def _records(self, path: Path) -> Iterator[tuple[int, Any]]:
        """`(number, record)` for each record of `path`: a JSON line's line number, a row's number (from 1)."""
        kind = self._kind(path)
        if kind == "jsonl":
            with open(path, "rb") as fh:
                for number, raw in enumerate(fh, start=1):
                    try:
                        line = raw.decode("utf-8", errors=self.errors)
                    except UnicodeDecodeError as e:
                        raise LmkitError(f"{path}, record {number}: bytes that are not UTF-8 at column {e.start} "
                                         "(set data.errors=replace to substitute them)") from None
                    if not line.strip():
                        continue
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise LmkitError(f"{path}, record {number}: not JSON ({e.msg} at column {e.colno})") from None
            return
        pa, number = pyarrow(), 0
        try:
            if kind == "parquet":
                batches = pa.parquet.ParquetFile(path).iter_batches(batch_size=1024)
            else:
                batches = pa.ipc.open_stream(pa.OSFile(str(path)))
            for batch in batches:
                for record in batch.to_pylist():
                    number += 1
                    yield number, record
        except _arrow_errors() as e:
            raise LmkitError(f"{path}: cannot read it as {kind} ({first_line(e)})") from None

    def _build(self, files: list[Path], tokenizer: Tokenizer, template: Any, out: Path) -> None:
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        starts, longest, learned, source, end_of_turn = [0], [], [], [], []
        records = dropped = 0
        with open(out / "ids.bin", "wb") as ids_file, open(out / "learn.bin", "wb") as learn_file:
            for index, path in enumerate(files):
                for number, record in self._records(path):
                    records += 1
                    try:
                        rendered = render_chat(*record_messages(record, self.fields), tokenizer=tokenizer,
                                               template=template)
                    except LmkitError as e:
                        raise LmkitError(f"{path}, record {number}: {e}") from None
                    learn = rendered.labels != IGNORE
                    if not learn[1:].any():  # nothing to learn (no assistant turn): left out, and counted
                        dropped += 1
                        continue
                    if len(end_of_turn) < 1:
                        end_of_turn = end_of_turn_ids(rendered, tokenizer)
                    ids_file.write(rendered.ids.astype(dtype).data)
                    learn_file.write(learn.astype(np.uint8).data)
                    starts.append(starts[-1] + len(rendered.ids))
                    longest.append(_longest_run(learn))
                    learned.append(int(learn[1:].sum()))
                    source.append((index, number))
        n = len(learned)
        if n == 0:
            raise LmkitError(f"every token of data.path={self.path} is masked: none of its {records} records has an "
                             "assistant turn to learn (data=chat learns the assistant's replies)")
        bounds = [0, round(n * self.split[0]), round(n * (self.split[0] + self.split[1])), n]
        np.savez(out / "docs.npz", starts=np.asarray(starts, dtype=np.int64), longest=np.asarray(longest, np.int64),
                 learned=np.asarray(learned, dtype=np.int64), source=np.asarray(source, dtype=np.int64))
        meta = {"version": CACHE_VERSION, "n_tokens": starts[-1], "dtype": np.dtype(dtype).name, "bounds": bounds,
                "records": records, "without_assistant": dropped, "files": [str(f) for f in files],
                "template": template.template, "end_of_turn": end_of_turn, "fields": self.fields}
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
        log.info("Rendered %s conversations (%s tokens, %s without an assistant turn left out) into %s",
                 f"{n:,}", f"{starts[-1]:,}", f"{dropped:,}", out.name)
        if not end_of_turn:
            log.warning("the chat template ends assistant turns with no special token: generation will not stop at "
                        "the end of a reply by itself")

    def _plan(self) -> None:
        """Cut each conversation to seq_len + 1 tokens, refuse a response that cannot fit, lay out the rows of each
        split, and measure what the model learns and how full the rows are."""
        cache, width = self.cache, self.seq_len + 1
        too_long = np.flatnonzero(cache.longest > self.seq_len)
        if len(too_long):
            doc = int(too_long[0])
            raise LmkitError(f"{cache.where(doc)}: an assistant response of {cache.longest[doc]} tokens is longer "
                             f"than data.seq_len={self.seq_len} ({len(too_long)} such record(s)): raise data.seq_len "
                             "or leave those records out")
        lengths = np.diff(cache.starts)
        kept = np.minimum(lengths, width)
        learned = cache.learned.copy()
        learn = cache.learn()
        for doc in np.flatnonzero(lengths > width):  # what a cut conversation still learns
            learned[doc] = int(learn[cache.starts[doc] + 1:cache.starts[doc] + width].sum())
        self._lengths = kept
        for name in SPLITS:
            docs = cache.docs(name)
            docs = docs[learned[docs] > 0]
            if len(docs) == 0:
                raise LmkitError(f"the {name} split holds no conversation with an assistant turn to learn within "
                                 f"data.seq_len+1={width} tokens ({len(cache.docs(name))} in all): use more records, a "
                                 "larger data.split share or a larger data.seq_len")
            if self.packing:
                self._units[name] = pack(kept[docs], width, docs)
            elif name == "train":
                self._units[name] = [np.array([d]) for d in docs]
            else:  # evaluation: longest first, so each batch pads little
                self._units[name] = [np.array([d]) for d in docs[np.argsort(-kept[docs], kind="stable")]]
        train = cache.docs("train")
        used = train[learned[train] > 0]
        tokens, targets = int(kept[used].sum()), int(learned[used].sum())
        self.stats = {
            "chat_conversations": int(len(used)),
            "chat_truncated": int((lengths[train] > width).sum()),
            "chat_masked_fraction": round(1 - targets / tokens, 4),
            "chat_packing_efficiency": round(self._efficiency(), 4),
        }
        log.info("data=chat: %d training conversations (of %d: %d cut at data.seq_len+1=%d tokens, %d of them left "
                 "with no reply to learn and left out), %.1f%% of their tokens masked (prompts, system turns, "
                 "template), %s at %.1f%% of their tokens", self.stats["chat_conversations"], len(train),
                 self.stats["chat_truncated"], width, len(train) - len(used), 100 * self.stats["chat_masked_fraction"],
                 "packed into rows" if self.packing else "padded batches", 100 * self.stats["chat_packing_efficiency"])

    def _efficiency(self) -> float:
        """Tokens that are not padding, over all the tokens of the training rows (padded: over one pass of the
        training batches, each padded to its longest)."""
        rows = self._units["train"]
        lengths = np.array([self._lengths[row].sum() for row in rows])
        if self.packing:
            return float(lengths.sum() / (len(rows) * (self.seq_len + 1)))
        order = np.random.default_rng((self.seed, 0)).permutation(len(rows))
        padded = sum(len(b) * lengths[b].max() for b in np.array_split(order, max(1, len(order) // self.batch_size)))
        return float(lengths.sum() / padded)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        if stage == "fit" and self.trainer is not None:
            for logger in self.trainer.loggers:  # (rank zero only: Lightning's loggers write there)
                logger.log_metrics(self.stats, step=0)

    def _rank(self) -> tuple[int, int]:
        return data_parallel(self.trainer)

    def _pin(self) -> bool:
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> ChatTrainBatches:
        rank, world = self._rank()
        start = self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer is not None else 0
        return ChatTrainBatches(self._rows(), self._units["train"], self.batch_size, self.seed, rank, world, start,
                                pin_memory=self._pin())

    def val_dataloader(self) -> ChatEvalBatches:
        return ChatEvalBatches(self._rows(), self._units["val"], self.eval_batch_size, self.val_windows, *self._rank())

    def test_dataloader(self) -> ChatEvalBatches:
        return ChatEvalBatches(self._rows(), self._units["test"], self.eval_batch_size, self.test_windows,
                               *self._rank())

    def _rows(self) -> Rows:
        cache = self.cache
        return Rows(cache.ids(), cache.learn(), cache.starts, self._lengths,
                    self.seq_len + 1 if self.packing else None)


def _cache_key(files: list[Path], settings: dict[str, Any]) -> str:
    h = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=12)
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 23):
                h.update(chunk)
    return h.hexdigest()


def _longest_run(learn: np.ndarray) -> int:
    """The longest stretch of consecutive learned tokens (one assistant turn, as the template writes it)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], learn.astype(np.int8), [0]))))
    return int((edges[1::2] - edges[::2]).max()) if len(edges) else 0


def pack(lengths: np.ndarray, width: int, docs: np.ndarray | None = None) -> list[np.ndarray]:
    """Rows of at most `width` tokens for conversations of `lengths` (each <= width): best fit, longest first (each
    into the fullest row it fits, or a new one). The conversations' numbers are `docs` (default: 0..n-1)."""
    docs = np.arange(len(lengths)) if docs is None else docs
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for k in np.argsort(-lengths, kind="stable"):
        n = int(lengths[k])
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([int(docs[k])])
            room, row = width - n, len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(int(docs[k]))
            room -= n
        if room > 1:  # (a conversation of one token learns nothing: none is that short)
            bisect.insort(free, (room, row))
    return [np.asarray(sorted(r)) for r in rows]


@dataclass
class Rows:
    """Turns rows (arrays of conversation numbers) into ChatBatches: each conversation's first `lengths` tokens;
    `width`: packed rows' fixed size, None: one conversation a row, a batch as wide as its longest."""
    ids: np.ndarray
    learn: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    width: int | None

    def batch(self, rows: list[np.ndarray], pin: bool = False) -> ChatBatch:
        width = self.width or int(max(self.lengths[row].sum() for row in rows))
        ids = np.zeros((len(rows), width), dtype=np.int64)
        learn = np.zeros((len(rows), width), dtype=bool)
        doc = np.full((len(rows), width), -1, dtype=np.int64)
        for r, row in enumerate(rows):
            at = 0
            for k, d in enumerate(row):
                n, s = int(self.lengths[d]), int(self.starts[d])
                ids[r, at:at + n] = self.ids[s:s + n]
                learn[r, at:at + n] = self.learn[s:s + n]
                doc[r, at:at + n] = k
                at += n
        # the target of position j is token j + 1, when it is learned and of the same conversation as token j
        learned = learn[:, 1:] & (doc[:, 1:] == doc[:, :-1])
        targets = np.where(learned, ids[:, 1:], IGNORE)
        tokens = int((doc[:, :-1] >= 0).sum())
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (ids[:, :-1], targets)]
        documents = torch.from_numpy(np.ascontiguousarray(doc[:, :-1])) if self.width else None
        if pin:
            tensors = [t.pin_memory() for t in tensors]
            documents = documents.pin_memory() if documents is not None else None
        return ChatBatch(tensors[0], tensors[1], documents, tokens)


class ChatTrainBatches:
    """An endless stream of training batches: the rows in a fresh random order each pass, batch `i` a pure function
    of `(seed, i)`, rank `rank` of `world_size` taking its slice of each global batch."""

    def __init__(self, rows: Rows, units: list[np.ndarray], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, start: int = 0, pin_memory: bool = False) -> None:
        self.rows, self.units, self.batch_size = rows, units, batch_size
        self.seed, self.rank, self.world_size, self.start, self.pin_memory = seed, rank, world_size, start, pin_memory

    def __iter__(self) -> Iterator[ChatBatch]:
        n, size, i = len(self.units), self.world_size * self.batch_size, self.start
        orders: dict[int, np.ndarray] = {}  # pass -> its order of the rows (the current pass and the one before)
        while True:
            positions = i * size + self.rank * self.batch_size + np.arange(self.batch_size)
            chosen = []
            for p in positions.tolist():
                epoch = p // n
                if epoch not in orders:
                    orders = {e: o for e, o in orders.items() if e >= epoch - 1}
                    orders[epoch] = np.random.default_rng((self.seed, epoch)).permutation(n)
                chosen.append(self.units[orders[epoch][p % n]])
            yield self.rows.batch(chosen, self.pin_memory)
            i += 1


class ChatEvalBatches:
    """Fixed rows, at most `max_rows` spread evenly over the split, each rank its own, in batches of `batch_size`."""

    def __init__(self, rows: Rows, units: list[np.ndarray], batch_size: int, max_rows: int | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        chosen = np.arange(len(units))
        if max_rows and len(units) > max_rows:
            chosen = np.unique(np.linspace(0, len(units) - 1, max_rows).round().astype(np.int64))
        self.units = [units[k] for k in chosen[rank::world_size]]
        self.rows, self.batch_size = rows, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.units) / self.batch_size)

    def __iter__(self) -> Iterator[ChatBatch]:
        for i in range(0, len(self.units), self.batch_size):
            yield self.rows.batch(self.units[i:i + self.batch_size])
