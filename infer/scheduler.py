"""The scheduler: requests, from the inbox to their last delta. It takes requests and aborts in (from any
thread), admits waiting ones into free cache rows fairly between groups, appends each step's sampled
tokens (end tokens, stop strings, length limits, incremental detokenizing), frees the rows of finished
ones and hands out what is new as deltas. It runs no model: the row a request holds is an index into
the runner's cache, and the scheduler asks the runner (`move_row`) to keep those rows compact.

Running requests hold cache rows 0..n-1 (`running[i]` is row i); a finished one frees its row at once
(the last row moves into the hole), and a waiting one joins at the next step.
"""

import collections
import itertools
import random
from dataclasses import dataclass, field

from infer.detok import IncrementalDetokenizer, find_stop, holdback
from infer.sampling import BatchParams, SamplingParams

PREFILL_TOKEN_BUDGET = 8192  # padded prompt tokens per prefill forward: bounds its activation memory


class ContextLengthError(ValueError):
    """A prompt (plus the tokens asked for) that does not fit the engine's context."""


@dataclass
class Delta:
    """What one step added to a sequence: text never ends inside a character or a possible stop string."""

    text: str
    token_ids: list[int]
    logprobs: list[tuple[float, dict[int, float]]] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running


@dataclass
class Completion:
    token_ids: list[int]  # generated only; a stop token that ended the sequence is included
    text: str  # without stop tokens or the stop string
    finish_reason: str
    prompt_token_ids: list[int]
    logprobs: list[tuple[float, dict[int, float]]] | None = None  # per generated token
    prompt_logprobs: list[tuple[float, dict[int, float]] | None] | None = None  # first is None
    embedding: list[float] | None = None  # params.embed: the prompt's unit vector


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset
    detok: IncrementalDetokenizer
    output: list[int] = field(default_factory=list)
    text: str = ""
    sent_text: int = 0  # characters handed out in deltas
    sent_tokens: int = 0
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    embedding: list[float] | None = None  # params.embed: the unit vector `ModelRunner.embed` pools
    finish_reason: str | None = None
    error: Exception | None = None  # why a step failed this request (finish_reason "error")
    group: object = None  # the sequences of one client request share it: fair admission (`Scheduler.admit`)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def completion(self) -> Completion:
        return Completion(
            token_ids=list(self.output), text=self.text, finish_reason=self.finish_reason,
            prompt_token_ids=list(self.prompt), logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
            embedding=self.embedding,
        )


def end_token_ids(tokenizer) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


class Scheduler:
    def __init__(self, runner, tokenizer, max_group_rows: int | None = None):
        """`runner`: the ModelRunner whose cache rows the running requests hold (its sizes are ours).
        `max_group_rows`: the most rows one group holds at once (None: no cap)."""
        self.runner, self.tokenizer, self.max_group_rows = runner, tokenizer, max_group_rows
        self.max_batch, self.max_len, self.vocab_size = runner.max_batch, runner.max_len, runner.vocab_size
        self.end_ids = frozenset(end_token_ids(tokenizer))
        self._ids = itertools.count()
        self._inbox: collections.deque = collections.deque()  # thread-safe appends/pops
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # index = cache row
        self._batch_params: BatchParams | None = None  # of the running rows; None: rebuild
        self._solo = 0  # admit this many waiting requests one per step: a failed step is finding its culprit

    # ---- requests in (any thread) ----

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raises ValueError/ContextLengthError for a request that cannot run."""
        params.validate()
        if not prompt:
            raise ValueError("the prompt is empty")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(prompt) + params.max_new_tokens > self.max_len:
            raise ContextLengthError(
                f"this model's context is {self.max_len} tokens; the prompt has {len(prompt)} and "
                f"{params.max_new_tokens} more were asked for"
            )

    def add_request(self, prompt: list[int], params: SamplingParams, group=None) -> Request:
        """Queue a request; it joins the batch at a next step. `group`: a hashable naming the client
        request it belongs to (None: a group of its own)."""
        self.check(prompt, params)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.end_ids)
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        rid = next(self._ids)
        req = Request(rid, list(prompt), params, seed, stop_ids, IncrementalDetokenizer(self.tokenizer),
                      group=("request", rid) if group is None else group)
        req.logprobs = [] if params.logprobs is not None else None
        self._inbox.append(("add", req, None))
        return req

    def abort(self, req: Request, reason: str = "abort") -> None:
        """End a request at the next step, running or waiting, with finish_reason `reason`."""
        self._inbox.append(("abort", req, reason))

    def has_work(self) -> bool:
        return bool(self._inbox or self.waiting or self.running)

    # ---- a step (the driver's thread) ----

    def take_inbox(self) -> list[Request]:
        """New requests to the waiting queue; aborted ones end, freeing their rows -> the aborted."""
        aborted = []
        while self._inbox:
            op, req, reason = self._inbox.popleft()
            if op == "add":
                self.waiting.append(req)
            elif req.finish_reason is None:
                req.finish_reason = reason
                aborted.append(req)
        if aborted:
            self.waiting = collections.deque(r for r in self.waiting if r.finish_reason is None)
            self._free([i for i, r in enumerate(self.running) if r.finish_reason is not None])
        return aborted

    def admit(self) -> list[Request]:
        """Waiting requests to prefill into the free rows after the running ones (`join` them then). Fair
        between groups: each pick goes to the group holding the fewest rows (the earliest-waiting first on
        a tie), and no group goes past `max_group_rows`; so a request of many sequences neither takes
        every row nor delays a later small request's first token by more than a step while rows are
        free. In arrival order when every request is a group of its own."""
        n = len(self.running)
        if not self.waiting or n >= self.max_batch:
            return []
        held = collections.Counter(r.group for r in self.running)
        queues: dict[object, collections.deque[Request]] = {}  # by group, groups in order of arrival
        for r in self.waiting:
            queues.setdefault(r.group, collections.deque()).append(r)
        cap = self.max_group_rows or self.max_batch
        admitted, longest = [], 0
        while n + len(admitted) < self.max_batch:
            group = min((g for g in queues if held[g] < cap), key=lambda g: held[g], default=None)
            if group is None:
                break
            nxt = len(queues[group][0].prompt)
            if admitted and (self._solo or (len(admitted) + 1) * max(longest, nxt) > PREFILL_TOKEN_BUDGET):
                break
            longest = max(longest, nxt)
            admitted.append(queues[group].popleft())
            held[group] += 1
            if not queues[group]:
                del queues[group]
        if admitted:
            chosen = {id(r) for r in admitted}
            self.waiting = collections.deque(r for r in self.waiting if id(r) not in chosen)
        self._solo = max(0, self._solo - len(admitted))
        return admitted

    def join(self, admitted: list[Request]) -> None:
        """The admitted requests take the rows after the running ones (their prefill fills them)."""
        self.running.extend(admitted)
        self._batch_params = None

    def batch_params(self, device) -> BatchParams:
        """The running rows' sampling parameters as device tensors, built again only when the rows change."""
        if self._batch_params is None:
            reqs = self.running
            self._batch_params = BatchParams.build([r.params for r in reqs], [r.seed for r in reqs], device)
        return self._batch_params

    def append_tokens(self, tokens: list[int], logprobs: list | None) -> None:
        """Each running row's sampled token (and its logprobs, when any row asked); a request that
        fails here (e.g. its detokenizer or stop strings) fails alone. Finished rows are freed."""
        finished = []
        append = self.append
        for i, req in enumerate(self.running):
            try:
                append(req, tokens[i], logprobs[i] if logprobs is not None else None)
            except Exception as e:
                req.finish_reason, req.error = "error", e
            if req.finish_reason is not None:
                finished.append(i)
        self._free(finished)

    def append(self, req: Request, token: int, lp) -> None:
        """One sampled token of a running request: its text so far, and whether it has finished."""
        if req.params.max_new_tokens == 0:  # scoring only: the prefill was all it wanted
            req.finish_reason = "length"
            return
        req.output.append(token)
        if req.logprobs is not None:
            req.logprobs.append(lp)
        if token in req.stop_ids:
            req.finish_reason, new = "stop", req.detok.flush()
        else:
            new = req.detok.push(token)
            if len(req.output) >= req.params.max_new_tokens or req.length >= self.max_len:
                req.finish_reason, new = "length", new + req.detok.flush()
        before = len(req.text)
        req.text += new
        if req.params.stop and (at := find_stop(req.text, req.params.stop, before)) >= 0:
            req.text, req.finish_reason = req.text[:at], "stop"

    def fail_step(self, n: int, admitted: list[Request], error: Exception) -> list[Request]:
        """Undo a step that raised before any token was appended -> the requests it failed. The requests
        it was admitting are the usual cause (their parameters or prompt are what is new): several go
        back to the queue to be admitted one per step, so only the culprit fails; a single one fails;
        the running ones retry next step. A step that admitted nothing fails every running request."""
        del self.running[n:]  # admitted rows sit after the n running ones
        self._batch_params = None
        if len(admitted) > 1:
            self.waiting.extendleft(reversed(admitted))
            self._solo = len(admitted)
            return []
        failed = admitted or list(self.running)
        if not admitted:
            self._free(list(range(n)))
        for req in failed:
            req.finish_reason, req.error = "error", error
        return failed

    def _free(self, rows: list[int]) -> None:
        """Release finished rows now: the last running row moves into each hole."""
        for i in sorted(rows, reverse=True):
            last = len(self.running) - 1
            if i != last:
                self.runner.move_row(i, last, self.running[last].length)
                self.running[i] = self.running[last]
            self.running.pop()
        if rows:
            self._batch_params = None

    # ---- requests out ----

    def take_delta(self, req: Request) -> Delta | None:
        """The text/tokens produced since the last call, holding back a possible stop-string prefix."""
        done = req.finish_reason is not None
        end = len(req.text) if done else len(req.text) - holdback(req.text, req.params.stop)
        if not done and end <= req.sent_text and len(req.output) == req.sent_tokens:
            return None
        text, tokens = req.text[req.sent_text : max(end, req.sent_text)], req.output[req.sent_tokens :]
        lps = req.logprobs[req.sent_tokens :] if req.logprobs is not None else None
        req.sent_text, req.sent_tokens = max(end, req.sent_text), len(req.output)
        return Delta(text=text, token_ids=tokens, logprobs=lps, finish_reason=req.finish_reason)
