"""The inference engine: continuous batching over a preallocated KV cache, in two parts.

`infer.scheduler.Scheduler` holds the requests: the inbox, fair admission into free cache rows, abort,
appending tokens (stop tokens and strings, detokenizing), freeing rows, streaming deltas.
`infer.runner.ModelRunner` holds the model on its device: the KV cache, prefill, decode and sampling.
A compiled decode (`infer.compiled`) or one replayed from CUDA graphs (`infer.graphs`) wraps the runner.

`Engine.step()` is one iteration of the serving loop: decode one token for every running sequence,
prefill newly admitted ones into free cache rows, sample all of them in one on-device call, and copy
the sampled tokens (and any logprobs) to the host in one transfer. `generate()` (the trainer's GRPO
rollouts) and `stream()` (the chat CLI) drive `step()` themselves; the server runs it in one background
thread (`infer.async_engine`). One driver at a time: `add_request`/`abort` are safe from any thread,
`step()` is not. A step that raises fails the requests it was admitting (else the running ones) with
finish_reason "error", never the engine: one bad request must not stop a server; `generate()` and
`stream()` re-raise such an error.
"""

import logging
from collections.abc import Iterator

import torch
from tqdm import tqdm

from infer.compiled import CompiledDecode
from infer.graphs import GraphedDecode
from infer.runner import ModelRunner
from infer.sampling import SamplingParams
from infer.scheduler import Completion, ContextLengthError, Delta, Request, Scheduler
from infer.transfer import to_host

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN = 2048  # cache length when neither the caller nor a smaller model context says

# callers import these from here (Engine and its requests' types, SamplingParams for `generate`)
__all__ = ["Engine", "Completion", "ContextLengthError", "Delta", "Request", "SamplingParams"]


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
        cuda_graphs = _check_options(model, compile, cuda_graphs, max_group_rows)
        config = model.config
        max_len = max_len or min(config.max_position_embeddings, DEFAULT_MAX_LEN)
        if max_len > config.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's context {config.max_position_embeddings}")
        self.model, self.tokenizer, self.max_batch, self.max_len = model, tokenizer, max_batch, max_len
        # ids past the tokenizer's vocabulary (an embedding padded to 6400) can't be decoded: never sampled
        self.vocab_size = min(config.vocab_size, len(tokenizer))
        self.runner = ModelRunner(model, max_batch, max_len, self.vocab_size)
        self.scheduler = Scheduler(self.runner, tokenizer, max_group_rows)
        self.end_ids = self.scheduler.end_ids
        self.tokens_generated = 0  # sampled so far, all requests: the server's throughput line
        self.dtype_report = f"dtype: {str(next(model.parameters()).dtype).removeprefix('torch.')}"
        self.decoder = self.runner  # what decodes: the runner, or a compiled or graphed wrapper of it
        self.compiled: CompiledDecode | None = None
        self.graphs: GraphedDecode | None = None
        self.compile = False  # whether decode runs compiled
        self.warmup_report: str | None = None  # compile=True: the warm-up's time and verdict
        self.graphs_report: str | None = None  # cuda_graphs: what was captured, in how long
        if compile:
            self._compile(keep=compile == "always")
        if cuda_graphs:
            self._capture_graphs(capture=cuda_graphs is True)

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

    def _compile(self, keep: bool) -> None:
        """Decode through a compiled wrapper of the runner if its warm-up finds it faster (or `keep`)."""
        self._ensure_cache()
        self.compiled = CompiledDecode(self.runner, keep=keep)
        self.compile, self.warmup_report = self.compiled.enabled, self.compiled.report
        if self.compile:
            self.decoder = self.compiled
        log.info(self.warmup_report)

    def _capture_graphs(self, capture: bool) -> None:
        """Decode through CUDA graphs of the runner's step, if any bucket captures and agrees with it."""
        with torch.no_grad():
            self._ensure_cache()
            graphs = GraphedDecode(self.runner, capture=capture)
            self.graphs_report = graphs.capture()
        if graphs.graphs:
            self.graphs = self.decoder = graphs
        log.info(self.graphs_report)

    def _ensure_cache(self) -> None:
        """The runner's cache, made again when the model moved or changed dtype: the wrappers follow."""
        if not self.runner.ensure_cache():
            return
        if self.compiled is not None:
            self.compiled.follow_cache()
        if self.graphs is not None:  # they read the old cache: decode without them
            self.graphs, self.decoder = None, self.runner
            self.graphs_report = "CUDA graphs: dropped (the model moved or changed dtype)"
            log.info(self.graphs_report)

    # ---- requests (the scheduler's) ----

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def waiting(self):
        return self.scheduler.waiting

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raises ValueError/ContextLengthError for a request that cannot run."""
        self.scheduler.check(prompt, params)

    def add_request(self, prompt: list[int], params: SamplingParams, group=None) -> Request:
        """Queue a request (safe to call from another thread); it joins the batch at a next step.
        `group`: a hashable naming the client request it belongs to (None: a group of its own)."""
        return self.scheduler.add_request(prompt, params, group)

    def abort(self, req: Request, reason: str = "abort") -> None:
        """End a request at the next step, running or waiting, with finish_reason `reason`."""
        self.scheduler.abort(req, reason)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def take_delta(self, req: Request) -> Delta | None:
        """The text/tokens produced since the last call, holding back a possible stop-string prefix."""
        return self.scheduler.take_delta(req)

    # ---- the loop ----

    def step(self) -> list[Request]:
        """One iteration; returns the requests that have something new (see `take_delta`)."""
        with torch.no_grad():
            self._ensure_cache()
            aborted = self.scheduler.take_inbox()  # 1. take in new requests and aborts
            n = len(self.scheduler.running)
            admitted = self.scheduler.admit()  # 2. admit waiting requests into the free rows after the n running
            try:
                return aborted + self._forward_and_sample(n, admitted)
            except Exception as e:  # any error: fail the suspects, keep the engine
                return aborted + self.scheduler.fail_step(n, admitted, e)

    def _forward_and_sample(self, n: int, admitted: list[Request]) -> list[Request]:
        parts = []
        if n:  # 3. decode: one token for each running row
            parts.append(self._decode(self.scheduler.running))
        if admitted:  # 4. prefill the admitted into the rows after them
            self.scheduler.join(admitted)
            parts.append(self._prefill(admitted, start=n))
        if not parts:
            return []
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        reqs = list(self.scheduler.running)
        # 5. sample every row on the device
        steps = torch.tensor([len(r.output) for r in reqs], device=logits.device)
        tokens = self.runner.sample(logits, self.scheduler.batch_params(logits.device), steps)
        self.tokens_generated += len(reqs)
        # 6. the step's one copy to the host, 7. append the tokens (finished rows are freed)
        self.scheduler.append_tokens(*to_host(tokens, logits, [r.params.logprobs for r in reqs]))
        return reqs

    def _decode(self, reqs: list[Request]) -> torch.Tensor:
        """One token for each running row -> next-token logits (n, V)."""
        device = self.runner.cache.k.device
        ids = torch.tensor([[r.output[-1]] for r in reqs], device=device)  # (B, 1)
        pos = torch.tensor([[r.length - 1] for r in reqs], device=device)
        return self.decoder.decode(ids, pos, length=max(r.length for r in reqs))

    def _prefill(self, reqs: list[Request], start: int) -> torch.Tensor:
        """Prompts into rows start..start+m-1, right-padded -> last-prompt-token logits (m, V); the prompt
        logprobs of those that asked (scoring) and the embeddings of those that asked (`params.embed`)."""
        device = self.runner.cache.k.device
        t = max(len(r.prompt) for r in reqs)
        ids = torch.tensor([r.prompt + [0] * (t - len(r.prompt)) for r in reqs], device=device)  # (B, T)
        last = torch.tensor([len(r.prompt) - 1 for r in reqs], device=device)
        has_zero = torch.tensor([0 in r.prompt for r in reqs], device=device)
        logits, hidden = self.runner.prefill(ids, last, has_zero, start)
        embed = [i for i, r in enumerate(reqs) if r.params.embed]
        if embed:  # embeddings: the pooled prompt, one copy to the host for all of them
            vectors = self.runner.embed(hidden[embed], [len(reqs[i].prompt) for i in embed]).cpu()
            for i, v in zip(embed, vectors):
                reqs[i].embedding = v.tolist()
        for i, r in enumerate(reqs):
            if r.params.prompt_logprobs is not None:
                r.prompt_logprobs = self.runner.prompt_logprobs(hidden[i, : len(r.prompt)], r.prompt,
                                                                r.params.prompt_logprobs)
        return logits

    # ---- drivers ----

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 progress: str | None = None) -> list[Completion]:
        """Run all prompts to completion, batched; reads the model's current weights, restores its mode.
        `progress`: a progress bar of finished prompts on stderr, with that label."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(prompts), desc=progress, unit="prompt", leave=False) if progress else None
        try:
            reqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
            while any(r.finish_reason is None for r in reqs):
                self.step()
                if bar is not None:
                    bar.update(sum(r.finish_reason is not None for r in reqs) - bar.n)
        finally:
            self.model.train(was_training)
            if bar is not None:
                bar.close()
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
                self.scheduler.take_inbox()
            self.model.train(was_training)


def _check_options(model, compile, cuda_graphs, max_group_rows):
    """Raises ValueError for options that do not go together -> `cuda_graphs` with None resolved."""
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
    return cuda_graphs
