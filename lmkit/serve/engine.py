"""Continuous batching over any loaded model: the rows of many requests decode together, one token per step.

Plain torch and lmkit's one sampling implementation (`lmkit.generate.sample_next`); no LitServe, no HTTP,
so it can be driven (and tested) without a server. What it needs from a model is the loaded-model
interface: `model.backbone(ids, state) -> (logits, state)`, `backbone.init_state(n)`,
`backbone.max_seq_len`, `model.tokenizer`, and, to decode rows of different requests together,
`backbone.stack_states(states)` and `backbone.select_states(state, rows)`. A backbone without them is
served one request at a time.

Each prompt of a request is a *group* of `n` rows sampled with one `torch.Generator`, exactly as
`lmkit generate num_samples=n seed=S` samples its rows: the prompt is prefilled on its own (n identical
rows, cropped to the context like `stream_tokens`), a Transformer row whose context fills up is
re-primed with its latest three quarters, and each step draws the group's tokens with
`sample_next(..., generator)`. So a request decodes the same tokens whatever else is in the batch
(up to the last bits of float rounding, which a batched matmul may order differently).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from lmkit.generate import sample_next


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


@dataclass
class Row:
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already handed out
    finish: str | None = None  # "stop" | "length" once done


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
    generator: torch.Generator | None = None

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
        self.device = getattr(model, "device", torch.device("cpu"))
        self.max_rows = max_rows
        self.limit: int | None = getattr(self.backbone, "max_seq_len", None)
        self.keep = self.limit - self.limit // 4 if self.limit else None
        self.batched = hasattr(self.backbone, "stack_states") and hasattr(self.backbone, "select_states")
        self.arrivals: deque[Group] = deque()  # appended by the server's thread, drained by step()
        self.requests: dict[str, Request] = {}
        self.groups: list[Group] = []  # in the batch, in state order: group i's rows follow group i-1's
        self.state: Any = None
        self.logits: torch.Tensor | None = None  # (rows, vocab): what each row samples its next token from

    # --- called from the server's scheduling thread: append and count only -----------------------------

    def arrive(self, uid: str, job: Job) -> None:
        self.arrivals.extend(Group(uid, p * job.n, prompt, job, [Row() for _ in range(job.n)])
                             for p, prompt in enumerate(job.prompts))

    def rows(self) -> int:
        return sum(len(g.rows) for g in self.groups)

    def has_capacity(self) -> bool:
        if not self.batched:
            return not self.groups and not self.arrivals
        return self.rows() + sum(len(g.rows) for g in list(self.arrivals)) < self.max_rows

    def busy(self) -> bool:
        return bool(self.groups or self.arrivals)

    def reset(self) -> list[str]:
        """Forget every request (after a failed step); returns their ids."""
        uids = list(dict.fromkeys([*self.requests, *(g.uid for g in list(self.arrivals))]))
        self.arrivals.clear()
        self.requests.clear()
        self.groups, self.state, self.logits = [], None, None
        return uids

    # --- called from the decoding thread ---------------------------------------------------------------

    @torch.no_grad()
    def step(self, cancelled: set[str] | frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
        """Admit what fits, draw one token for every row, feed them; returns each request's news:
        `{"choices": [{"index", "text", "finish_reason"}], "done": bool, "completion_tokens": int}`."""
        news: dict[str, dict[str, Any]] = {}
        for uid in cancelled:
            self._cancel(uid, news)
        self._admit()
        if not self.groups:
            return news
        tokens = self._sample()
        offset = 0
        for group in self.groups:
            for row, token in zip(group.rows, tokens[offset:offset + len(group.rows)].tolist()):
                if row.finish is None:
                    self._record(group, row, token, news)
                else:
                    row.tokens.append(token)  # a stopped row rides along until its group is done
            offset += len(group.rows)
        self._advance(tokens)
        return news

    def _cancel(self, uid: str, news: dict[str, dict[str, Any]]) -> None:
        if uid not in self.requests and not any(g.uid == uid for g in self.arrivals):
            return
        for group in [g for g in self.arrivals if g.uid == uid]:
            self.arrivals.remove(group)
        self._keep([g for g in self.groups if g.uid != uid])
        self.requests.pop(uid, None)
        news[uid] = {"choices": [], "done": True, "cancelled": True}

    def _admit(self) -> None:
        states, logits = [], []
        rows = self.rows()
        while self.arrivals:
            group = self.arrivals[0]
            if rows and (not self.batched or rows + len(group.rows) > self.max_rows):
                break
            self.arrivals.popleft()
            job = group.job
            if group.uid not in self.requests:
                self.requests[group.uid] = Request(job, open_groups=len(job.prompts))
            group.generator = self._generator(job.seed)
            ids = torch.tensor([group.prompt] * job.n, device=self.device)
            ids = ids[:, -self.limit:] if self.limit else ids
            out, state = self.backbone(ids, self.backbone.init_state(job.n))
            group.length = ids.size(1)
            self.groups.append(group)
            states.append(state)
            logits.append(out[:, -1])
            rows += job.n
            if not self.batched:
                break
        if states:
            self._join(states, logits)

    def _generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.device)  # seeded as InferenceModel.generate seeds it
        generator.manual_seed(seed) if seed is not None else generator.seed()
        return generator

    def _join(self, states: list[Any], logits: list[torch.Tensor]) -> None:
        """Append the states and logits of groups already appended to self.groups."""
        if self.state is not None:
            states, logits = [self.state, *states], [self.logits, *logits]
        self.state = self.backbone.stack_states(states) if len(states) > 1 else states[0]
        self.logits = torch.cat(logits) if len(logits) > 1 else logits[0]

    def _sample(self) -> torch.Tensor:
        """One token per row: each group draws its rows together with its own generator, as
        `stream_tokens` draws a `num_samples` batch; greedy rows need no generator and go in one call."""
        tokens = torch.empty(self.logits.size(0), dtype=torch.long, device=self.logits.device)
        greedy, offset = [], 0
        for group in self.groups:
            n, job = len(group.rows), group.job
            if job.temperature == 0:
                greedy += range(offset, offset + n)
            else:
                tokens[offset:offset + n] = sample_next(self.logits[offset:offset + n], temperature=job.temperature,
                                                        top_k=job.top_k, top_p=job.top_p,
                                                        generator=group.generator)[:, 0]
            offset += n
        if greedy:
            index = torch.tensor(greedy, device=tokens.device)
            tokens[index] = sample_next(self.logits[index], temperature=0)[:, 0]
        return tokens

    def _record(self, group: Group, row: Row, token: int, news: dict[str, dict[str, Any]]) -> None:
        """Add a row's token; hand out the text no stop sequence can still claim; finish the row if due."""
        row.tokens.append(token)
        job, request = group.job, self.requests[group.uid]
        request.completion_tokens += 1  # a stopped row's later tokens are not counted: nobody sees them
        text = self.tokenizer.decode(row.tokens)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            row.finish, end = "stop", cut
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

    def _advance(self, tokens: torch.Tensor) -> None:
        """Feed every row its token; finished groups leave; a Transformer group whose context is full is
        re-primed with its latest three quarters instead, as `stream_tokens` does."""
        offsets, offset = {}, 0
        for group in self.groups:
            offsets[id(group)], offset = offset, offset + len(group.rows)
        going = [g for g in self.groups if g.open]
        full = [g for g in going if self.limit and g.length >= self.limit]
        fed = [g for g in going if not (self.limit and g.length >= self.limit)]
        index = [offsets[id(g)] + j for g in fed for j in range(len(g.rows))]
        self._keep(fed)
        if self.groups:
            logits, self.state = self.backbone(tokens[index][:, None], self.state)
            self.logits = logits[:, -1]
            for group in self.groups:
                group.length += 1
        if full:
            reprimed = [self._reprime(group) for group in full]
            self.groups += full
            self._join([s for s, _ in reprimed], [lg for _, lg in reprimed])

    def _reprime(self, group: Group) -> tuple[Any, torch.Tensor]:
        """`stream_tokens` at a full context: the latest three quarters of each row's text, prefilled anew."""
        rows = [(group.prompt + row.tokens)[-self.keep:] for row in group.rows]
        logits, state = self.backbone(torch.tensor(rows, device=self.device), self.backbone.init_state(len(rows)))
        group.length = len(rows[0])
        return state, logits[:, -1]

    def _keep(self, groups: list[Group]) -> None:
        """Keep only `groups` (in their order) in the batch, its state and its logits."""
        if len(groups) == len(self.groups) and all(a is b for a, b in zip(groups, self.groups)):
            return
        offsets, offset = {}, 0
        for group in self.groups:
            offsets[id(group)], offset = offset, offset + len(group.rows)
        index = [offsets[id(g)] + j for g in groups for j in range(len(g.rows))]
        self.groups = list(groups)
        if not index:
            self.state, self.logits = None, None
            return
        # stack_states of the kept rows re-aligns them: the cache is only as long as its longest row
        self.state = self.backbone.stack_states([self.backbone.select_states(self.state, index)])
        self.logits = self.logits[torch.tensor(index, device=self.logits.device)]


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop sequence (not sent yet)."""
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0
