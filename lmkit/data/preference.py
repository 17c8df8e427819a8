"""PreferenceDataModule (`data=preference`): preference pairs -> each rendered twice with the model's chat template,
prompt + chosen and prompt + rejected -> batches that keep the two of each pair together, padded.

A record holds a prompt (a string, one user message, or a list of messages) and two responses to it, the one
preferred and the one rejected (each a string, one assistant message, or a list of messages that follow the prompt;
a list that repeats the prompt's messages first, as UltraFeedback's do, has them left off). The field names are
settings, as `data=chat`'s are. Each response is rendered by `lmkit.data.chat.render_chat(prompt, response)`: its
labels are the tokens the response's turns write, whose log-probabilities the preference objective sums
(lmkit.preference).

The rendering, the cache folder, the record reader and the batch order are `data=chat`'s (this module subclasses
ChatDataModule): the cache holds conversation 2k (prompt + chosen) and 2k + 1 (prompt + rejected) for pair k, in
file order; the splits are of pairs. A pair longer than seq_len + 1 tokens loses the start of its prompt, the same
tokens from both, so that the two responses are read in the same context (TRL's `keep_end`); a response longer than
seq_len is refused. Pairs are never packed: a batch of B pairs is 2B rows, the B chosen then the B rejected, each
padded to the longest; batch `i` is a pure function of `(seed, i)`, and data-parallel rank `r` of `W` takes its slice
of the global batch of pairs (ChatTrainBatches). Validation and test read fixed pairs, longest first.

`lmkit eval` and compression's measurements of a model trained on preference pairs read the split's prompt + chosen
conversations as text (`PreferenceCache.split`): the texts the model was taught to prefer.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from lmkit.data.chat import IGNORE, _short, end_of_turn_ids, render_chat
from lmkit.data.chat_datamodule import CACHE_VERSION, SPLITS, ChatCache, ChatDataModule, ChatEvalBatches
from lmkit.data.tokenizer import Tokenizer
from lmkit.errors import LmkitError

log = logging.getLogger(__name__)


class PairBatch(NamedTuple):
    """B preference pairs as 2B rows: `inputs` and `targets` (2B, T), rows 0..B-1 the prompt + chosen conversations
    and B..2B-1 the prompt + rejected ones in the same order, targets IGNORE except on the responses' tokens;
    `documents` None (one conversation a row: ChatBatch's layout, so that a language-model loss also reads it);
    `tokens`, how many inputs are not padding; `pairs` (B,), each pair's number in the cache (which the reference
    model's precomputed log-probabilities are kept by)."""
    inputs: torch.Tensor
    targets: torch.Tensor
    documents: None
    tokens: int
    pairs: torch.Tensor


@dataclass
class PreferenceCache(ChatCache):
    """A ChatCache of pairs (conversations 2k and 2k + 1), with each conversation's first learned token (`first`)."""
    first: np.ndarray | None = None

    @classmethod
    def open(cls, path: Path, tokenizer: Tokenizer) -> PreferenceCache:
        chat = ChatCache.open(path, tokenizer)
        return cls(**vars(chat), first=np.load(path / "first.npy", allow_pickle=False))

    @property
    def pairs(self) -> int:
        return self.meta["pairs"]

    def pair_range(self, name: str) -> np.ndarray:
        """The numbers of the split's pairs."""
        i = SPLITS.index(name)
        return np.arange(self.bounds[i] // 2, self.bounds[i + 1] // 2)

    def split(self, name: str) -> np.ndarray:
        """The split's prompt + chosen conversations, one after another (what `lmkit eval` reads as text)."""
        ids = self.ids()
        return np.concatenate([ids[self.starts[2 * k]:self.starts[2 * k + 1]] for k in self.pair_range(name)])


class PreferenceDataModule(ChatDataModule):
    """Built from conf/data/preference.yaml, which documents and holds every default. `model_tokens`, as for
    ChatDataModule: the token conventions of the model being trained (its chat template, end-of-sequence ids)."""

    def __init__(self, *, source: str, path: str | list[str], seq_len: int, batch_size: int,
                 eval_batch_size: int | None, val_windows: int | None, test_windows: int | None,
                 split: tuple[float, float, float], tokenizer: dict[str, Any], cache_dir: str, seed: int,
                 format: str = "auto", prompt_field: str = "prompt", chosen_field: str = "chosen",
                 rejected_field: str = "rejected", system_field: str | None = None, chat_template: str | None = None,
                 errors: str = "strict", model_tokens: Mapping[str, Any] | None = None) -> None:
        if source != "preference":
            raise LmkitError(f"data.source={source!r}: PreferenceDataModule reads data=preference")
        if not path:
            raise LmkitError("data=preference needs data.path=FILE, DIR or GLOB (.jsonl, .parquet or a datasets "
                             "folder) of records with prompt, chosen and rejected fields")
        super().__init__(source="chat", path=path, seq_len=seq_len, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, val_windows=val_windows, test_windows=test_windows,
                         split=split, tokenizer=tokenizer, cache_dir=cache_dir, seed=seed, format=format,
                         chat_template=chat_template, packing=False, errors=errors, model_tokens=model_tokens)
        # (the fields are part of the cache's key: a preference cache is never a chat cache)
        self.fields = {"prompt": prompt_field, "chosen": chosen_field, "rejected": rejected_field,
                       "system": system_field, "pairs": True}
        self._cut: np.ndarray | None = None

    def _build(self, files: list[Path], tokenizer: Tokenizer, template: Any, out: Path) -> None:
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        starts, first, learned, source, end_of_turn = [0], [], [], [], []
        with open(out / "ids.bin", "wb") as ids_file, open(out / "learn.bin", "wb") as learn_file:
            for index, path in enumerate(files):
                for number, record in self._records(path):
                    try:
                        prompt, responses = record_pair(record, self.fields)
                        rendered = [render_chat(prompt, r, tokenizer=tokenizer, template=template) for r in responses]
                    except LmkitError as e:
                        raise LmkitError(f"{path}, record {number}: {e}") from None
                    for which, r in zip(("chosen", "rejected"), rendered):
                        learn = r.labels != IGNORE
                        if not learn[1:].any():
                            raise LmkitError(f"{path}, record {number}: the {which} response has no assistant turn to "
                                             f"learn (data.{which}_field={self.fields[which]!r})")
                        if not end_of_turn:
                            end_of_turn = end_of_turn_ids(r, tokenizer)
                        ids_file.write(r.ids.astype(dtype).data)
                        learn_file.write(learn.astype(np.uint8).data)
                        starts.append(starts[-1] + len(r.ids))
                        first.append(int(np.argmax(learn)))
                        learned.append(int(learn[1:].sum()))
                        source.append((index, number))
        n = len(learned) // 2
        if n == 0:
            raise LmkitError(f"data.path={self.path} holds no records: data=preference needs preference pairs")
        bounds = [2 * b for b in (0, round(n * self.split[0]), round(n * (self.split[0] + self.split[1])), n)]
        lengths = np.diff(starts)
        np.savez(out / "docs.npz", starts=np.asarray(starts, dtype=np.int64),
                 longest=lengths - np.asarray(first, dtype=np.int64),  # (a response and what follows it)
                 learned=np.asarray(learned, dtype=np.int64), source=np.asarray(source, dtype=np.int64))
        np.save(out / "first.npy", np.asarray(first, dtype=np.int64))
        meta = {"version": CACHE_VERSION, "n_tokens": starts[-1], "dtype": np.dtype(dtype).name, "bounds": bounds,
                "records": n, "pairs": n, "files": [str(f) for f in files], "template": template.template,
                "end_of_turn": end_of_turn, "fields": self.fields}
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
        log.info("Rendered %s preference pairs (%s tokens) into %s", f"{n:,}", f"{starts[-1]:,}", out.name)

    def _plan(self) -> None:
        """Refuse a response that cannot fit, cut the prompts of pairs longer than seq_len + 1 tokens, and lay out
        the pairs of each split (evaluation: longest first, so each batch pads little)."""
        cache = self.cache = PreferenceCache.open(self.cache.path, self.cache.tokenizer)
        width = self.seq_len + 1
        lengths = np.diff(cache.starts)
        tail = lengths - cache.first  # a response's tokens, and the template's after it
        too_long = np.flatnonzero(tail > self.seq_len)
        if len(too_long):
            doc = int(too_long[0])
            which = "chosen" if doc % 2 == 0 else "rejected"
            raise LmkitError(f"{cache.where(doc)}: the {which} response of {tail[doc]} tokens is longer than "
                             f"data.seq_len={self.seq_len} ({len(np.unique(too_long // 2))} such pair(s)): raise "
                             "data.seq_len or leave those records out")
        longer = np.maximum(lengths[0::2], lengths[1::2])
        self._cut = np.maximum(0, longer - width)  # per pair: the prompt tokens both rows lose
        self._lengths = lengths - np.repeat(self._cut, 2)
        kept = longer - self._cut
        for name in SPLITS:
            pairs = cache.pair_range(name)
            if len(pairs) == 0:
                raise LmkitError(f"the {name} split holds no preference pair ({cache.pairs} in all): use more "
                                 "records or a larger data.split share")
            order = pairs if name == "train" else pairs[np.argsort(-kept[pairs], kind="stable")]
            self._units[name] = [np.array([k]) for k in order]
        train = cache.pair_range("train")
        rows = self._lengths.reshape(-1, 2)[train]
        self.stats = {
            "preference_pairs": int(len(train)),
            "preference_prompt_cut": int((self._cut[train] > 0).sum()),
            "preference_masked_fraction": round(1 - float(cache.learned.reshape(-1, 2)[train].sum() / rows.sum()), 4),
        }
        log.info("data=preference: %d training pairs (%d with the start of their prompt cut at data.seq_len+1=%d "
                 "tokens), %.1f%% of their tokens masked (prompts, template)", self.stats["preference_pairs"],
                 self.stats["preference_prompt_cut"], width, 100 * self.stats["preference_masked_fraction"])

    def _rows(self) -> PairRows:
        cache = self.cache
        return PairRows(cache.ids(), cache.learn(), cache.starts, self._lengths, self._cut)

    def evaluated_pairs(self, name: str) -> np.ndarray:
        """The pairs of split `name` that evaluation reads (data.val_windows / test_windows of them, longest first;
        the training split: every pair)."""
        units = self._units[name]
        if name != "train":
            limit = self.val_windows if name == "val" else self.test_windows
            units = ChatEvalBatches(self._rows(), units, self.eval_batch_size, limit).units
        return np.concatenate(units) if units else np.zeros(0, dtype=np.int64)

    def reference_batches(self, rank: int = 0, world_size: int = 1) -> Iterator[PairBatch]:
        """Batches of every pair a split reads (every training pair, the evaluated ones), longest first, rank `rank`
        of `world_size` taking every world_size-th; each rank gets as many batches as the others (its share evened
        up with pairs of another's: a sharded model's forward runs on every rank together)."""
        pairs = np.unique(np.concatenate([self.evaluated_pairs(name) for name in SPLITS]))
        longer = self._lengths.reshape(-1, 2).max(axis=1)
        pairs = pairs[np.argsort(-longer[pairs], kind="stable")]
        share = math.ceil(len(pairs) / world_size)
        mine = pairs[rank::world_size]
        mine = np.concatenate([mine, pairs[:share - len(mine)]])
        for i in range(0, share, self.eval_batch_size):
            yield self.pair_batch(mine[i:i + self.eval_batch_size])

    def pair_batch(self, pairs: Sequence[int]) -> PairBatch:
        """The batch of the given pairs (in that order)."""
        return self._rows().batch([np.array([k]) for k in pairs])


@dataclass
class PairRows:
    """Turns units (arrays of one pair number each) into PairBatches: conversation d's tokens from `cut[d // 2]` on,
    `lengths[d]` of them; a batch as wide as its longest row (minus one: inputs and targets are shifted)."""
    ids: np.ndarray
    learn: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    cut: np.ndarray

    def batch(self, units: list[np.ndarray], pin: bool = False) -> PairBatch:
        pairs = np.concatenate(units)
        docs = np.concatenate([2 * pairs, 2 * pairs + 1])  # the chosen rows, then the rejected ones
        width = int(self.lengths[docs].max())
        ids = np.zeros((len(docs), width), dtype=np.int64)
        learn = np.zeros((len(docs), width), dtype=bool)
        for r, d in enumerate(docs.tolist()):
            n, s = int(self.lengths[d]), int(self.starts[d] + self.cut[d // 2])
            ids[r, :n] = self.ids[s:s + n]
            learn[r, :n] = self.learn[s:s + n]
        targets = np.where(learn[:, 1:], ids[:, 1:], IGNORE)
        tokens = int(np.minimum(self.lengths[docs] - 1, width - 1).sum())
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (ids[:, :-1], targets)]
        if pin:
            tensors = [t.pin_memory() for t in tensors]
        return PairBatch(tensors[0], tensors[1], None, tokens, torch.from_numpy(pairs.astype(np.int64)))


def record_pair(record: Any, fields: Mapping[str, Any]) -> tuple[list[dict[str, Any]], tuple[Any, Any]]:
    """`(prompt, (chosen, rejected))` of one preference record for render_chat: the prompt as a list of messages
    (`fields["system"]`'s text first, when named and present and the prompt has no system message), each response
    as given, less the prompt's messages when a response's list repeats them first. One LmkitError line (without
    location) for a record without the named fields or with an empty response."""
    if not isinstance(record, Mapping):
        raise LmkitError(f"the record is not an object: {_short(record)}")
    names = {"prompt": "data.prompt_field", "chosen": "data.chosen_field", "rejected": "data.rejected_field"}
    missing = [k for k in names if not isinstance(record.get(fields[k]), (str, list))]
    if missing:
        wanted = ", ".join(f"{fields[k]!r} ({names[k]})" for k in missing)
        raise LmkitError(f"the record has no {wanted} (a string or a list of messages); its fields: "
                         f"{', '.join(map(str, record)) or 'none'}")
    prompt = record[fields["prompt"]]
    given = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages = list(given)
    system = record.get(fields["system"]) if fields.get("system") else None
    if isinstance(system, str) and system and not any(_role(m) == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    responses = []
    for which in ("chosen", "rejected"):
        response = record[fields[which]]
        for prefix in (messages, given):  # a whole conversation: the response is what follows the prompt
            if isinstance(response, list) and len(response) > len(prefix) and \
                    all(_same(a, b) for a, b in zip(response, prefix)):
                response = response[len(prefix):]
                break
        if not _text(response).strip():
            raise LmkitError(f"the {which} response is empty ({fields[which]!r}, {names[which]})")
        responses.append(response)
    return messages, (responses[0], responses[1])


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, Mapping) else None


def _same(a: Any, b: Any) -> bool:
    return isinstance(a, Mapping) and isinstance(b, Mapping) and a.get("role") == b.get("role") and \
        a.get("content") == b.get("content")


def _text(response: Any) -> str:
    """A response's text: a string's, or its messages' contents (text parts joined), for the emptiness check."""
    if isinstance(response, str):
        return response
    out = []
    for message in response:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            content = "".join(p["text"] for p in content if isinstance(p, Mapping) and p.get("type") == "text"
                              and isinstance(p.get("text"), str))  # (as lmkit.data.chat reads them)
        out.append(content if isinstance(content, str) else "")
    return "".join(out)

