"""Continuous batching over any loaded model: the rows of many requests decode together, one token per step.

Plain torch and lmkit's one sampling implementation (`lmkit.generate.sample_next`); no LitServe, no HTTP,
so it can be driven (and tested) without a server. What it needs from a model is the loaded-model
interface: `model.backbone(ids, state) -> (logits, state)`, `backbone.init_state(n)`,
`backbone.max_seq_len`, `model.tokenizer`, and, to decode rows of different requests together,
`backbone.stack_states(states)` and `backbone.select_states(state, rows)`. A backbone without them is
served one request at a time.

Each prompt of a request is a *group* of `n` rows that goes through `stream_tokens`' own sequence, as
`lmkit generate num_samples=n seed=S` does: the prompt is prefilled on its own (n identical rows,
cropped to the context), each step draws the group's tokens with `sample_next`, and a Transformer group
whose context fills up is re-primed with its latest three quarters. A request with a seed has its own
`torch.Generator` (`seeded_generator`, as `InferenceModel.generate`'s), so it decodes the same tokens whatever
else is in the batch (up to the last bits of float rounding, which a batched matmul may order
differently); requests without one share a generator (one sampling call per setting, not per request).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from lmkit.generate import reprime_length, sample_next, seeded_generator


@dataclass
class Job:
    """One request as the worker receives it: prompts already tokenized and every option checked."""

    prompts: list[list[int]]
    n: int
    max_tokens: int
    temperature: float
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


@dataclass(eq=False)  # rows are told apart by identity (`group.rows.index(row)`): two greedy rows are equal in value
class Row:
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the decoded text of tokens[:decoded]
    decoded: int = 0  # tokens whose text is final (they decode to whole characters)
    sent: int = 0  # characters of the text already handed out
    finish: str | None = None  # "stop" | "length" | "cancelled" once done

    def decode(self, tokenizer: Any) -> str:
        """The row's text, decoding only the tokens after the last whole character (O(new tokens), not O(text))."""
        tail = tokenizer.decode(self.tokens[self.decoded:])
        if tail.endswith("\ufffd"):  # a byte-level piece that a later token completes
            return self.text + tail
        self.text, self.decoded = self.text + tail, len(self.tokens)
        return self.text


@dataclass
class Group:
    """One prompt of a request: `n` rows that share a generator and a length, like `lmkit generate
    num_samples=n`. A group enters and leaves the batch whole; a row that stops early rides along, its
    tokens unused, so the others draw exactly what they would have drawn without it."""

    uid: str
    first_index: int  # choice index of its first row (OpenAI: prompt_index * n + j)
    prompt: list[int]
    job: Job
    rows: list[Row]
    length: int = 0  # tokens each row holds in the state (what `state.pos` is for the group alone)
    generator: torch.Generator | None = None  # its own, when the request has a seed
    next: list[int] = field(default_factory=list)  # the tokens drawn for its rows, to feed

    @property
    def open(self) -> bool:
        return any(row.finish is None for row in self.rows)


@dataclass
class Request:
    job: Job
    open_groups: int
    completion_tokens: int = 0


class Engine:
    def __init__(self, model: Any, *, max_rows: int) -> None:
        self.backbone = model.backbone
        self.tokenizer = model.tokenizer
        self.eos = set(model.record.tokens.get("eos_token_ids", []))  # a row ends at any of them (finish "stop")
        self.device = model.device
        self.max_rows = max_rows
        self.limit: int | None = getattr(self.backbone, "max_seq_len", None)
        self.keep = reprime_length(self.limit)
        self.unbatched = self._why_unbatched()  # None: rows of different requests decode together
        self.batched = self.unbatched is None
        self.arrivals: deque[Group] = deque()  # appended by the server's thread, drained by step()
        self.requests: dict[str, Request] = {}
        self.groups: list[Group] = []  # in the batch, in state order: group i's rows follow group i-1's
        self.state: Any = None
        self.logits: torch.Tensor | None = None  # (rows, vocab): what each row samples its next token from
        self.unseeded = seeded_generator(self.device, None)  # requests without a seed draw from one generator, together

    @torch.no_grad()
    def _why_unbatched(self) -> str | None:
        """Why rows of different lengths, prefilled apart, cannot decode together (an old ONNX Transformer
        export has no padding mask, so its stack_states refuses them), or None when they can. If they
        cannot, one request is served at a time."""
        if not (hasattr(self.backbone, "stack_states") and hasattr(self.backbone, "select_states")):
            return "its backbone cannot stack the states of rows decoded apart"
        states = [self.backbone(torch.zeros(1, n, dtype=torch.long, device=self.device),
                                self.backbone.init_state(1))[1] for n in (1, 2)]
        try:
            self.backbone.stack_states(states)
        except ValueError as e:
            return str(e)
        return None

    # --- called from the server's scheduling thread: append and count only -----------------------------

    def arrive(self, uid: str, job: Job) -> None:
        groups = [Group(uid, p * job.n, prompt, job, [Row() for _ in range(job.n)])
                  for p, prompt in enumerate(job.prompts)]
        self.arrivals.extend(groups)  # a list: one atomic extend, so step() sees all of a request's prompts or none

    def rows(self) -> int:
        return sum(len(g.rows) for g in self.groups)

    def has_capacity(self) -> bool:
        if not self.batched:
            return not self.groups and not self.arrivals
        return self.rows() + sum(len(g.rows) for g in list(self.arrivals)) < self.max_rows

    def busy(self) -> bool:
        return bool(self.groups or self.arrivals)

    def knows(self, uid: str) -> bool:
        return uid in self.requests or any(g.uid == uid for g in list(self.arrivals))

    def reset(self) -> None:
        """Forget every request (after a failed step)."""
        self.arrivals.clear()
        self.requests.clear()
        self.groups, self.state, self.logits = [], None, None

    # --- called from the decoding thread ---------------------------------------------------------------

    @torch.no_grad()
    def step(self, cancelled: set[str] | frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
        """Draw one token for every row, admit what fits, feed the batch once; returns each request's news:
        `{"choices": [{"index", "text", "finish_reason"}], "done": bool, "completion_tokens": int}`.

        Each group goes through exactly `stream_tokens`' sequence (prefill, draw, feed or re-prime, draw, ...);
        a group that is prefilled or re-primed during a step also draws its next token in that step, so
        that the batch's state changes (rows leave, rows join) at most once per step, in one `stack_states`."""
        news: dict[str, dict[str, Any]] = {}
        for uid in cancelled:
            self._cancel(uid, news)
        old = self.groups
        if old:
            self._draw(old, self.logits, news)
        stay = [g for g in old if g.open and not self._full(g)]
        ready: list[tuple[list[Group], Any]] = []  # groups with a state of their own and a token to feed
        full = [g for g in old if g.open and self._full(g)]
        if full:  # all re-primed in one pass: their rows hold the same number of tokens
            self._ready(full, *self._reprime(full), news, ready)
        self._admit(stay, ready, news)
        self._restack(old, stay, ready)
        if self.groups:
            tokens = torch.tensor([[t] for g in self.groups for t in g.next], device=self.device)
            logits, self.state = self.backbone(tokens, self.state)
            self.logits = logits[:, -1]
            for group in self.groups:
                group.length += 1
        return news

    def _full(self, group: Group) -> bool:
        return bool(self.limit) and group.length >= self.limit

    def _cancel(self, uid: str, news: dict[str, dict[str, Any]]) -> None:
        """A cancelled group's rows are marked finished: it leaves the batch at this step's restack."""
        known = self.knows(uid)
        for group in [g for g in list(self.arrivals) if g.uid == uid]:
            self.arrivals.remove(group)
        for group in self.groups:
            if group.uid == uid:
                for row in group.rows:
                    row.finish = row.finish or "cancelled"
        self.requests.pop(uid, None)
        if known:
            news[uid] = {"choices": [], "done": True, "cancelled": True}

    def _admit(self, stay: list[Group], ready: list[tuple[list[Group], Any]], news: dict[str, dict[str, Any]]) -> None:
        rows = sum(len(g.rows) for g in stay) + sum(len(g.rows) for groups, _ in ready for g in groups)
        while self.arrivals:
            group = self.arrivals[0]
            if rows and (not self.batched or rows + len(group.rows) > self.max_rows):
                return
            self.arrivals.popleft()
            job = group.job
            if group.uid not in self.requests:
                self.requests[group.uid] = Request(job, open_groups=len(job.prompts))
            group.generator = seeded_generator(self.device, job.seed) if job.seed is not None else None
            ids = torch.tensor([group.prompt] * job.n, device=self.device)
            ids = ids[:, -self.limit:] if self.limit else ids
            logits, state = self.backbone(ids, self.backbone.init_state(job.n))
            group.length = ids.size(1)
            self._ready([group], state, logits[:, -1], news, ready)
            rows += job.n

    def _ready(self, groups: list[Group], state: Any, logits: torch.Tensor, news: dict[str, dict[str, Any]],
               ready: list[tuple[list[Group], Any]]) -> None:
        """Groups with a fresh state (prefilled or re-primed) draw their next token. A group that this token
        finishes leaves here, never fed: its cache may be full already (a prompt cut to the context, or a
        re-primed context at a max_seq_len below 4), and feeding it would cost a step and a restack for
        nothing. A group whose context is full is re-primed and draws again; the rest join the batch."""
        while True:
            self._draw(groups, logits, news)
            still = [g for g in groups if g.open]
            if len(still) < len(groups) and still:  # re-primed together: keep the open groups' rows
                state = self.backbone.select_states(state, rows_of(still, among=groups))
            groups = still
            if not groups:
                return
            if not any(self._full(g) for g in groups):
                ready.append((groups, state))
                return
            state, logits = self._reprime(groups)  # a new group whose prompt filled the context

    def _restack(self, old: list[Group], stay: list[Group], ready: list[tuple[list[Group], Any]]) -> None:
        """The batch becomes `stay` (kept rows of the old batch, in order) then the `ready` groups."""
        self.groups = stay + [g for groups, _ in ready for g in groups]
        joining = [state for _, state in ready]  # each prefilled or re-primed on its own
        kept_all = len(stay) == len(old)
        if kept_all and not joining:  # nothing left or joined: the state is as it was
            return
        if not stay:  # nothing of the old batch stays: the state is what joined
            if not joining:
                self.state = None
            elif len(joining) == 1:
                self.state = joining[0]
            else:
                self.state = self.backbone.stack_states(joining)
            return
        # rows stay, and others left or joined. Also when nothing joined, stack_states re-aligns the kept rows:
        # the cache they share is only as long as the longest of them
        kept = self.state if kept_all else self.backbone.select_states(self.state, rows_of(stay, among=old))
        self.state = self.backbone.stack_states([kept, *joining])

    def _draw(self, groups: list[Group], logits: torch.Tensor, news: dict[str, dict[str, Any]]) -> None:
        """One token per row of `groups` (whose rows `logits` holds, in order); sets each group's `next`.

        A seeded group draws its rows together with its own generator, as `stream_tokens` draws a
        `num_samples` batch, so its tokens do not depend on the rest of the batch. Rows that need no
        particular generator (greedy, or no seed) are drawn in one call per setting: one sampling call
        per request would cost more than the model's step at 32 rows."""
        tokens = torch.empty(logits.size(0), dtype=torch.long, device=logits.device)
        shared: dict[tuple, list[int]] = {}
        offset = 0
        for group in groups:
            n, job = len(group.rows), group.job
            if group.generator is not None and job.temperature > 0:
                tokens[offset:offset + n] = sample_next(logits[offset:offset + n], temperature=job.temperature,
                                                        top_k=job.top_k, top_p=job.top_p,
                                                        generator=group.generator)[:, 0]
            else:
                setting = (job.temperature, job.top_k, job.top_p) if job.temperature > 0 else (0, None, None)
                shared.setdefault(setting, []).extend(range(offset, offset + n))
            offset += n
        for (temperature, top_k, top_p), rows in shared.items():
            every = len(rows) == logits.size(0)  # the common case: one setting for the whole batch, no copy
            index = slice(None) if every else torch.tensor(rows, device=tokens.device)
            tokens[index] = sample_next(logits[index], temperature=temperature, top_k=top_k, top_p=top_p,
                                        generator=self.unseeded)[:, 0]
        offset, values = 0, tokens.tolist()
        for group in groups:
            group.next = values[offset:offset + len(group.rows)]
            for row, token in zip(group.rows, group.next):
                if row.finish is None:
                    self._record(group, row, token, news)
                else:
                    row.tokens.append(token)  # a stopped row rides along until its group is done
            offset += len(group.rows)

    def _record(self, group: Group, row: Row, token: int, news: dict[str, dict[str, Any]]) -> None:
        """Add a row's token; hand out the text no stop sequence can still claim; finish the row if due."""
        job, request = group.job, self.requests[group.uid]
        request.completion_tokens += 1  # a stopped row's later tokens are not counted: nobody sees them
        at_end = token in self.eos  # the model's end-of-sequence token: the reply is the text before it
        if at_end:
            text = row.decode(self.tokenizer)
        row.tokens.append(token)
        if not at_end:
            text = row.decode(self.tokenizer)
        # text before `sent` holds no stop sequence, nor the start of one (held_back keeps those back)
        cut = min((i for i in (text.find(s, row.sent) for s in job.stop) if i >= 0), default=-1)
        if at_end or cut >= 0:
            row.finish, end = "stop", cut if cut >= 0 else len(text)
        elif len(row.tokens) >= job.max_tokens:
            row.finish, end = "length", len(text)
        elif text.endswith("\ufffd"):  # a byte-level piece that a later token completes
            end = row.sent
        else:
            end = len(text) - held_back(text, job.stop)
        update = news.setdefault(group.uid, {"choices": [], "done": False})
        if end > row.sent or row.finish:
            index = group.first_index + group.rows.index(row)
            update["choices"].append({"index": index, "text": text[row.sent:end], "finish_reason": row.finish})
            row.sent = max(row.sent, end)
        if row.finish and not group.open:
            request.open_groups -= 1
            if request.open_groups == 0:
                update.update(done=True, completion_tokens=request.completion_tokens)
                del self.requests[group.uid]

    def _reprime(self, groups: list[Group]) -> tuple[Any, torch.Tensor]:
        """`stream_tokens` at a full context: the latest three quarters of each row's text, prefilled anew."""
        rows = [(g.prompt + row.tokens)[-self.keep:] for g in groups for row in g.rows]
        logits, state = self.backbone(torch.tensor(rows, device=self.device), self.backbone.init_state(len(rows)))
        for group in groups:
            group.length = len(rows[0])
        return state, logits[:, -1]


def rows_of(groups: list[Group], *, among: list[Group]) -> list[int]:
    """The state rows of `groups` in a state that holds the rows of `among` (a superset, in its order)."""
    offsets, offset = {}, 0
    for group in among:
        offsets[id(group)], offset = offset, offset + len(group.rows)
    return [offsets[id(g)] + j for g in groups for j in range(len(g.rows))]


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop sequence (not sent yet)."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0
