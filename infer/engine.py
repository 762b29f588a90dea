"""The inference engine: a preallocated KV cache, batched prefill and decode, continuous batching.

`Engine.step()` is one iteration of the serving loop: decode one token for every running sequence,
prefill newly admitted ones into free cache rows, sample all of them in one on-device call, and copy
the sampled tokens (and any logprobs) to the host in one transfer. Running sequences occupy cache rows
0..n-1; a finished one frees its row at once (the last row moves into the hole), and a waiting one
joins at the next step. `generate()` (the trainer's GRPO rollouts) and `stream()` (the chat CLI) drive
`step()` themselves; the server runs it in one background thread (`infer.async_engine`). One driver
at a time: `add_request`/`abort` are safe from any thread, `step()` is not. A step that raises fails
the requests it was admitting (else the running ones) with finish_reason "error", never the engine:
one bad request must not stop a server; `generate()` and `stream()` re-raise such an error.
"""

import collections
import itertools
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from infer.detok import IncrementalDetokenizer, find_stop, holdback
from infer.graphs import GraphedDecode
from infer.sampling import BatchParams, SamplingParams, logprobs_of, sample
from minimind.model import KVCache

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN = 2048  # cache length when neither the caller nor a smaller model context says
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
    finish_reason: str | None = None
    error: Exception | None = None  # why a step failed this request (finish_reason "error")
    group: object = None  # the sequences of one client request share it: fair admission (`Engine._admit`)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def completion(self) -> Completion:
        return Completion(
            token_ids=list(self.output), text=self.text, finish_reason=self.finish_reason,
            prompt_token_ids=list(self.prompt), logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
        )


class _CacheView:
    """Rows [start, start+B) of a KVCache, attending over the first `max_len` slots only: what the
    model's forward sees. Slicing keeps attention at the batch's current length, not the cache's.

    Writes index the whole (L, N, Hk, S, Dh) cache tensors with tensor indices (layer, row, :, slot),
    never a slice of them: under torch.compile a write into a view of a graph input is functionalized
    into a copy of that whole view every step, a write into the input itself is done in place."""

    def __init__(self, k, v, start: int, rows: int, max_len):
        self.k, self.v, self.start, self.rows, self.max_len = k, v, start, rows, max_len

    def update(self, layer: int, k, v, position_ids):
        rows = torch.arange(self.start, self.start + k.shape[0], device=k.device).unsqueeze(1).expand_as(position_ids)
        layers = torch.full_like(position_ids, layer)
        # the aten op, not `self.k[layers, rows, :, position_ids] = k`: Python indexing of a CUDA tensor
        # needs a real device, which fake CUDA tensors on a CPU-only torch lack (test_fake_cuda_engine.py)
        index = [layers, rows, None, position_ids]
        torch.ops.aten.index_put_(self.k, index, k.to(self.k.dtype))  # k: (B, T, Hk, Dh)
        torch.ops.aten.index_put_(self.v, index, v.to(self.v.dtype))
        return self._window(self.k, layer), self._window(self.v, layer)  # (B, Hk, S, Dh)

    def _window(self, cache, layer: int):
        # methods, not `cache[layer, a:b, :, :s]`: Python indexing of a CUDA tensor needs a real device
        return cache.select(0, layer).narrow(0, self.start, self.rows).narrow(2, 0, self.max_len)


def _bucket(n: int, multiple: int, cap: int) -> int:
    return min(cap, -(-n // multiple) * multiple)


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 32, max_len: int | None = None,
                 compile: bool | str = False, cuda_graphs: bool | str | None = None, max_group_rows: int | None = None):
        """`max_group_rows`: the most cache rows the sequences of one group (one client request: its
        prompts x n) hold at once (None: no cap); the rest wait while other groups' requests join.
        `compile`: True compiles the decode step and keeps it if a timed warm-up finds it faster
        than eager here (`warmup_report` says); "always" keeps it regardless (tests, benchmarks).
        `cuda_graphs` (infer/graphs.py): replay each batch bucket's decode step from a CUDA graph
        captured here; None: on CUDA unless compiling; "static": the same static-shape steps without
        capture (the CPU tests). The model's weights must stay where they are (updated in place is
        fine: a graph reads them by address), so a trainer's rollout engine passes False."""
        if compile not in (False, True, "always"):
            raise ValueError(f"compile must be False, True or 'always', got {compile!r}")
        on_cuda = next(model.parameters()).is_cuda
        if cuda_graphs is None:
            cuda_graphs = on_cuda and not compile
        if cuda_graphs and compile:
            raise ValueError("compile and cuda_graphs are two ways to speed up decode: choose one")
        if cuda_graphs is True and not on_cuda:
            raise ValueError("cuda_graphs needs a model on a CUDA device (\"static\" runs their shapes anywhere)")
        if max_group_rows is not None and max_group_rows < 1:
            raise ValueError(f"max_group_rows must be at least 1, got {max_group_rows}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.max_group_rows = max_group_rows
        config = model.config
        self.max_len = max_len or min(config.max_position_embeddings, DEFAULT_MAX_LEN)
        if self.max_len > config.max_position_embeddings:
            raise ValueError(f"max_len {self.max_len} exceeds the model's context {config.max_position_embeddings}")
        # ids past the tokenizer's vocabulary (an embedding padded to 6400) can't be decoded: never sampled
        self.vocab_size = min(config.vocab_size, len(tokenizer))
        self.end_ids = frozenset(self._end_token_ids(tokenizer))
        # the decode step compiled once, its sizes dynamic (rows and attended length): no recompilation
        # after warm-up. No CUDA graphs ("reduce-overhead"): they would record one graph per length.
        self.compile = bool(compile)
        self._decode_fn = torch.compile(self._decode_graph) if compile else None
        self._ids = itertools.count()
        self._inbox: collections.deque = collections.deque()  # thread-safe appends/pops
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # index = cache row
        self._batch_params: BatchParams | None = None
        self._solo = 0  # admit this many waiting requests one per step: a failed step is finding its culprit
        self.cache = None
        self.tokens_generated = 0  # sampled so far, all requests: the server's throughput line
        self.dtype_report = f"dtype: {str(next(model.parameters()).dtype).removeprefix('torch.')}"
        self.warmup_report: str | None = None  # compile=True: the warm-up's time and verdict
        if compile:
            self.warmup_report = self._warm_up(keep=compile == "always")
            log.info(self.warmup_report)
        self.graphs: GraphedDecode | None = None
        self.graphs_report: str | None = None  # cuda_graphs: what was captured, in how long
        if cuda_graphs:
            with torch.no_grad():
                self._ensure_cache()
                graphs = GraphedDecode(self, capture=cuda_graphs is True)
                self.graphs_report = graphs.capture()
            self.graphs = graphs if graphs.graphs else None
            log.info(self.graphs_report)

    @classmethod
    def from_checkpoint(cls, ckpt, lora=None, device="cpu", dtype=None, kernels=None, allow_nonfinite=False,
                        **kwargs) -> "Engine":
        """`dtype`: a torch dtype, a name, "auto" (the fastest measured here: `infer.tuning`) or None
        (as saved). The line saying which and why is `engine.dtype_report`. Non-finite weights are a
        CheckpointError unless `allow_nonfinite`; a broken tokenizer is a TokenizerError naming its file."""
        from infer.tuning import TIMED_LENGTH, resolve_dtype
        from minimind.checkpoint import load_checkpoint, tokenizer_dir
        from minimind.data.tokenizer import load_tokenizer

        model, ckpt_dir = load_checkpoint(ckpt, device=device, kernels=kernels, lora=lora,
                                          allow_nonfinite=allow_nonfinite)
        tokenizer = load_tokenizer(tokenizer_dir(ckpt_dir) or ckpt_dir, require_chat_template=False)
        report = None
        if isinstance(dtype, str):
            # timing eager steps at TIMED_LENGTH, so the cache needs no more (nor more than the model's context)
            timing_len = min(2 * TIMED_LENGTH, model.config.max_position_embeddings)

            def make_engine(m, rows):
                return cls(m, tokenizer, max_batch=rows, max_len=timing_len, cuda_graphs=False)

            dtype, report = resolve_dtype(model, make_engine, dtype, rows=min(kwargs.get("max_batch", 32), 16))
        if dtype is not None:
            model.to(dtype)
        engine = cls(model, tokenizer, **kwargs)
        engine.dtype_report = report or engine.dtype_report
        return engine

    @staticmethod
    def _end_token_ids(tokenizer) -> list[int]:
        vocab = tokenizer.get_vocab()
        ids = {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        return sorted(ids)

    # ---- requests ----

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

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
        """Queue a request (safe to call from another thread); it joins the batch at a next step.
        `group`: a hashable naming the client request it belongs to (None: a group of its own)."""
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

    def _drain_inbox(self) -> list[Request]:
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

    # ---- the loop ----

    def step(self) -> list[Request]:
        """One iteration; returns the requests that have something new (see `take_delta`)."""
        with torch.no_grad():
            self._ensure_cache()
            aborted = self._drain_inbox()
            n = len(self.running)
            admitted = self._admit(n)
            try:
                return aborted + self._forward_and_sample(n, admitted)
            except Exception as e:  # any error: fail the suspects, keep the engine
                return aborted + self._fail_step(n, admitted, e)

    def _forward_and_sample(self, n: int, admitted: list[Request]) -> list[Request]:
        parts = []
        if n:
            parts.append(self._decode(self.running))
        if admitted:
            self.running.extend(admitted)
            self._batch_params = None
            parts.append(self._prefill(admitted, start=n))
        if not parts:
            return []
        return self._sample_and_append(torch.cat(parts) if len(parts) > 1 else parts[0])

    def _fail_step(self, n: int, admitted: list[Request], error: Exception) -> list[Request]:
        """Undo a step that raised before any token was appended. The requests it was admitting are
        the usual cause (their parameters or prompt are what is new): several go back to the queue to
        be admitted one per step, so only the culprit fails; a single one fails; the running ones
        retry next step. A step that admitted nothing fails every running request."""
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

    def _ensure_cache(self) -> None:
        p = next(self.model.parameters())
        if self.cache is None or self.cache.k.device != p.device or self.cache.k.dtype != p.dtype:
            # one spare slot, never attended: a compiled decode's cache window [:length] is then never
            # the whole tensor, which would be a shape of its own (a recompilation at length max_len)
            self.cache = KVCache(self.model.config, self.max_batch, self.max_len + 1, device=p.device, dtype=p.dtype)
            self._counts = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.int32, device=p.device)
            self._seen = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.bool, device=p.device)
            self._slots = torch.arange(self.max_len, device=p.device)
            if getattr(self, "graphs", None) is not None:  # they read the old cache: decode without them
                self.graphs, self.graphs_report = None, "CUDA graphs: dropped (the model moved or changed dtype)"
                log.info(self.graphs_report)

    def _admit(self, n: int) -> list[Request]:
        """Waiting requests to prefill into the free rows after the `n` running ones. Fair between
        groups: each pick goes to the group holding the fewest rows (the earliest-waiting first on a
        tie), and no group goes past `max_group_rows`; so a request of many sequences neither takes
        every row nor delays a later small request's first token by more than a step while rows are
        free. In arrival order when every request is a group of its own."""
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

    def _warm_up(self, keep: bool, rounds: int = 10) -> str:
        """Compile the decode step (one graph for one row, one for 2..max_batch rows), then time it
        against eager decode at one row, alternating. If compiled is not faster on this device,
        decode runs eager from now on. -> a line saying what was measured and chosen."""
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self._ensure_cache()
                for rows in sorted({1, min(8, self.max_batch)}):
                    _sync(self._decode_rows(rows, length=2, compiled=True))
                compiled_s = time.perf_counter() - t0
                times = {True: [], False: []}
                for i in range(2 * rounds):
                    compiled = i % 2 == 0
                    t = time.perf_counter()
                    _sync(self._decode_rows(1, length=min(64 + i, self.max_len), compiled=compiled))
                    times[compiled].append(time.perf_counter() - t)
        finally:
            self.model.train(was_training)
        # the fastest of each: on a shared machine a step can only be slowed by others, never sped up
        fast, slow = min(times[True]), min(times[False])
        self.compile = keep or fast < slow
        verdict = "decode runs compiled" if self.compile else "compiled is not faster here: decode runs eager"
        if keep and fast >= slow:
            verdict = "decode runs compiled (as asked), though it is not faster here"
        return (f"compile: warm-up {compiled_s:.1f} s; a one-row decode step {fast * 1e3:.1f} ms compiled, "
                f"{slow * 1e3:.1f} ms eager (best of {rounds}); {verdict}")

    def _decode_rows(self, rows: int, length: int, compiled: bool) -> torch.Tensor:
        """A decode step of `rows` dummy rows attending `length` slots (warm-up only: the slots it
        writes are overwritten by the next prefill before anything reads them)."""
        device = self.cache.k.device
        ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        pos = torch.full((rows, 1), length - 1, dtype=torch.long, device=device)
        if not compiled:
            return self._forward_last(ids, pos, self.cache.k, self.cache.v, 0, length)
        return self._compiled_decode(ids, pos, length)

    def _forward_last(self, input_ids, position_ids, k, v, start: int, max_len: int):
        view = _CacheView(k, v, start, input_ids.shape[0], max_len)
        logits = self.model(input_ids, position_ids=position_ids, kv_cache=view).logits  # (B, T, V)
        return logits.select(1, -1).narrow(1, 0, self.vocab_size)

    def _decode_graph(self, input_ids, position_ids, k, v, slots):
        """The compiled decode: rows 0..B-1, attending over len(slots) cache slots (a dynamic size)."""
        return self._forward_last(input_ids, position_ids, k, v, 0, slots.shape[0])

    def _decode(self, reqs: list[Request]) -> torch.Tensor:
        """One token for each running row -> next-token logits (n, V)."""
        device = self.cache.k.device
        ids = torch.tensor([[r.output[-1]] for r in reqs], device=device)  # (B, 1)
        pos = torch.tensor([[r.length - 1] for r in reqs], device=device)
        return self.decode_logits(ids, pos, length=max(r.length for r in reqs))

    # The device core: `prefill_logits`, `decode_logits`, `sample_tokens` take and return tensors on
    # the model's device and never read one back. They index with methods (narrow, select, gather),
    # not Python's `t[...]`, so that they also run on fake CUDA tensors (tests/test_fake_cuda_engine.py).

    def decode_logits(self, ids, pos, length: int) -> torch.Tensor:
        """The decode step on the device: each running row's last token `ids` (n, 1) at `pos` (n, 1),
        attending its first `length` cache slots -> next-token logits (n, V)."""
        if self.graphs is not None and self.graphs.bucket(ids.shape[0]) is not None:
            return self.graphs(ids, pos)
        if not self.compile:
            return self._forward_last(ids, pos, self.cache.k, self.cache.v, 0, length)
        b = _bucket(ids.shape[0], 8 if ids.shape[0] > 4 else 1, self.max_batch)
        return self._compiled_decode(_pad_rows(ids, b), _pad_rows(pos, b), length).narrow(0, 0, ids.shape[0])

    def _compiled_decode(self, ids, pos, length: int) -> torch.Tensor:
        # dynamic sizes, never 0 or 1 (those are specialized): the attended length is >= 2 (a prompt
        # token and a generated one); one row has a graph of its own, 2..max_batch rows share one
        slots = self._slots[:length]
        torch._dynamo.mark_dynamic(slots, 0, min=2, max=self.max_len)
        if ids.shape[0] > 1:
            torch._dynamo.mark_dynamic(ids, 0, min=2, max=self.max_batch)
            torch._dynamo.mark_dynamic(pos, 0, min=2, max=self.max_batch)
        return self._decode_fn(ids, pos, self.cache.k, self.cache.v, slots)

    def _prefill(self, reqs: list[Request], start: int) -> torch.Tensor:
        """Prompts into rows start..start+m-1 (right-padded; padding writes slots later decode
        overwrites before reading) -> last-prompt-token logits (m, V)."""
        device = self.cache.k.device
        t = max(len(r.prompt) for r in reqs)
        ids = torch.tensor([r.prompt + [0] * (t - len(r.prompt)) for r in reqs], device=device)  # (B, T)
        last = torch.tensor([len(r.prompt) - 1 for r in reqs], device=device)
        has_zero = torch.tensor([0 in r.prompt for r in reqs], device=device)
        logits, hidden = self.prefill_logits(ids, last, has_zero, start=start)
        for i, r in enumerate(reqs):
            if r.params.prompt_logprobs is not None:
                r.prompt_logprobs = self._prompt_logprobs(hidden[i, : len(r.prompt)], r)
        return logits

    def prefill_logits(self, ids, last, has_zero, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill on the device: right-padded prompts `ids` (B, T) into cache rows start..start+B-1,
        `last` (B,) each prompt's last index, `has_zero` (B,) whether it holds token id 0 (the padding id)
        -> (last-token logits (B, V), hidden states (B, T, D)); resets the rows' penalty counts."""
        b, t = ids.shape
        pos = torch.arange(t, device=ids.device).unsqueeze(0).expand(b, t)
        view = _CacheView(self.cache.k, self.cache.v, start, b, t)
        hidden = self.model(ids, position_ids=pos, kv_cache=view, return_hidden=True).hidden  # (B, T, D)
        at_last = hidden.gather(1, last.view(b, 1, 1).expand(b, 1, hidden.shape[-1])).squeeze(1)  # (B, D)
        logits = self.model.lm_head(at_last).narrow(1, 0, self.vocab_size)
        self._counts.narrow(0, start, b).zero_()
        seen = self._seen.narrow(0, start, b)
        seen.zero_()
        seen.scatter_(1, ids, True)
        seen.scatter_(1, torch.zeros_like(last).unsqueeze(1), has_zero.unsqueeze(1))  # undo the padding id
        return logits, hidden

    def _prompt_logprobs(self, hidden, req: Request) -> list:
        """Scoring (echo + logprobs): the logprob of each prompt token given the ones before it."""
        ids = torch.tensor(req.prompt[1:], device=hidden.device)
        logits = self.model.lm_head(hidden[:-1])[:, : self.vocab_size]  # (T-1, V)
        k = req.params.prompt_logprobs
        chosen, top = logprobs_of(logits, ids, k)
        top_vals, top_ids = (top.values.tolist(), top.indices.tolist()) if top is not None else (None, None)
        out = [None]
        for j, lp in enumerate(chosen.tolist()):
            out.append((lp, dict(zip(top_ids[j], top_vals[j])) if top is not None else {}))
        return out

    def sample_tokens(self, logits, steps) -> torch.Tensor:
        """Sampling on the device: logits (n, V) of rows 0..n-1 and each row's output index `steps`
        (n,) -> token ids (n,), counted into the rows' penalty state."""
        n = logits.shape[0]
        counts, seen = self._counts.narrow(0, 0, n), self._seen.narrow(0, 0, n)
        tokens = sample(logits, self._batch_params, steps, counts, seen)
        counts.scatter_add_(1, tokens.unsqueeze(1), torch.ones_like(tokens, dtype=torch.int32).unsqueeze(1))
        seen.scatter_(1, tokens.unsqueeze(1), True)
        return tokens

    def _sample_and_append(self, logits) -> list[Request]:
        reqs = list(self.running)
        device = logits.device
        if self._batch_params is None:
            self._batch_params = BatchParams.build([r.params for r in reqs], [r.seed for r in reqs], device)
        steps = torch.tensor([len(r.output) for r in reqs], device=device)
        n = len(reqs)
        tokens = self.sample_tokens(logits, steps)
        self.tokens_generated += n
        k = max((r.params.logprobs for r in reqs if r.params.logprobs is not None), default=None)
        packed = [tokens.to(torch.float64)]
        if k is not None:
            chosen, top = logprobs_of(logits, tokens, k)
            packed.append(chosen.to(torch.float64))
            if top is not None:
                packed += [top.values.to(torch.float64).T.reshape(-1), top.indices.to(torch.float64).T.reshape(-1)]
        host = torch.cat(packed).tolist()  # the step's one device->host transfer
        finished = []
        for i, req in enumerate(reqs):
            lp = None
            if k is not None:
                tops = {}
                kk = req.params.logprobs or 0
                if kk:
                    base = 2 * n
                    tops = {int(host[base + n * k + j * n + i]): host[base + j * n + i] for j in range(kk)}
                lp = (host[n + i], tops)
            try:
                self._append(req, int(host[i]), lp)
            except Exception as e:  # e.g. its detokenizer or stop strings: fail this one
                req.finish_reason, req.error = "error", e
            if req.finish_reason is not None:
                finished.append(i)
        self._free(finished)
        return reqs

    def _append(self, req: Request, token: int, lp) -> None:
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

    def _free(self, rows: list[int]) -> None:
        """Release finished rows now: the last running row moves into each hole."""
        for i in sorted(rows, reverse=True):
            last = len(self.running) - 1
            if i != last:
                length = self.running[last].length
                self.cache.k[:, i, :, :length] = self.cache.k[:, last, :, :length]
                self.cache.v[:, i, :, :length] = self.cache.v[:, last, :, :length]
                self._counts[i], self._seen[i] = self._counts[last], self._seen[last]
                self.running[i] = self.running[last]
            self.running.pop()
        if rows:
            self._batch_params = None

    # ---- consumers ----

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

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Run all prompts to completion, batched; reads the model's current weights, restores its mode."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        was_training = self.model.training
        self.model.eval()
        try:
            reqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
            while any(r.finish_reason is None for r in reqs):
                self.step()
        finally:
            self.model.train(was_training)
        for r in reqs:
            if r.error is not None:
                raise r.error
        return [r.completion() for r in reqs]

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[Delta]:
        """Synchronous streaming for one request (the chat CLI); drives step() itself."""
        was_training = self.model.training
        self.model.eval()
        req = self.add_request(prompt, params)
        try:
            while True:
                if req.finish_reason is None:
                    self.step()
                if req.error is not None:
                    raise req.error
                delta = self.take_delta(req)
                if delta is not None:
                    yield delta
                    if delta.finish_reason is not None:
                        return
        finally:
            if req.finish_reason is None:
                self.abort(req)
                self._drain_inbox()
            self.model.train(was_training)


def _sync(x: torch.Tensor) -> None:
    """Wait for the device (warm-up timing only): reading one value waits for everything before it."""
    x.reshape(-1)[:1].cpu()


def _pad_rows(x, rows: int):
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])]) if rows > x.shape[0] else x
