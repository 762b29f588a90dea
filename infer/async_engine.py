"""The engine loop for a server: one background thread runs `Engine.step()` while there is work and
hands each request's deltas to the asyncio side through a per-job queue.

HTTP handlers `submit()` a job (every sequence of one client request: its prompts x `n`) and read
`(index, Delta)` pairs from it; the engine admits a job's sequences fairly with other jobs' (they
share one group, `Scheduler.admit`), and `cancel(job)` ends all of them, running or waiting. Model
compute releases the GIL, so the event loop keeps serving while a step runs. A
non-streaming job gets one delta per sequence, when it finishes: waking the event loop for every
token costs a batch-1 request a core's worth of thread hand-offs on a small CPU (issue 19). A job
whose reader goes away is aborted, which frees its cache rows at the next step. A sequence the
engine failed (finish_reason "error") ends its job with `RequestFailed`; the loop goes on serving.

Logs, as vLLM does: one line per finished job (tokens in and out, time, tokens/s) and, while there
is work, a throughput line every `log_interval` seconds.
"""

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from infer.engine import Engine, Request
from infer.sampling import SamplingParams


class QueueFull(Exception):
    """More requests are waiting than the server's --max-queue allows (HTTP 429)."""


class EngineStopped(Exception):
    """The loop is shutting down or died (HTTP 503)."""


class ShutDown(EngineStopped):
    """The server shut down before this job finished: its sequences were cut (HTTP 503 when not streaming)."""


class RequestFailed(Exception):
    """The engine failed this job's sequence (HTTP 500); other jobs go on."""


log = logging.getLogger(__name__)


@dataclass
class Job:
    requests: list[Request]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # (index, Delta | Exception)
    remaining: int = 0
    label: str = ""  # the HTTP response id, for the log
    stream: bool = True  # False: only each sequence's final delta (all its text) is delivered
    submitted: float = field(default_factory=time.perf_counter)
    cut: bool = False  # ended by a shutdown's grace period running out (finish_reason "length")

    async def deltas(self):
        """(index, Delta) pairs until every sequence has finished; raises the loop's error if it dies."""
        while self.remaining:
            index, item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            if item.finish_reason is not None:
                self.remaining -= 1
            yield index, item


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int = 256, log_interval: float = 10.0, threads: int | None = None):
        """`threads`: torch's thread count, set from the engine thread (None: leave it)."""
        self.engine, self.max_queue, self.log_interval, self.threads = engine, max_queue, log_interval, threads
        self._jobs: dict[int, tuple[Job, int, asyncio.AbstractEventLoop]] = {}  # request id -> (job, index, loop)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._draining = False
        self._groups = itertools.count()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="minimind-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not (self._stopping or self._draining)

    @property
    def draining(self) -> bool:
        return self._draining

    def submit(self, prompt: list[int], params: list[SamplingParams], label: str = "", stream: bool = True) -> Job:
        """Queue len(params) sequences of one prompt; raises ValueError (bad request), QueueFull, EngineStopped."""
        return self.submit_many([(prompt, params)], label, stream)

    def submit_many(self, prompts: list[tuple[list[int], list[SamplingParams]]], label: str = "",
                    stream: bool = True) -> Job:
        """One job of every (prompt, [params per sequence]) pair: its sequences are indexed in that
        order (prompt-major, as a completion's choices are) and admitted as one group."""
        if not self.alive:
            raise EngineStopped("the server is shutting down" if self._draining else "the engine is not running")
        for prompt, params in prompts:
            for p in params:
                self.engine.check(prompt, p)
        count = sum(len(params) for _, params in prompts)
        with self._lock:
            waiting = len(self._jobs) - len(self.engine.running)
            if waiting + count > self.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting (max queue {self.max_queue})")
            job = Job(requests=[], remaining=count, label=label, stream=stream)
            loop = asyncio.get_running_loop()
            group = next(self._groups)
            for prompt, params in prompts:
                for p in params:
                    req = self.engine.add_request(prompt, p, group=group)
                    self._jobs[req.id] = (job, len(job.requests), loop)
                    job.requests.append(req)
        self._wake.set()
        return job

    def cancel(self, job: Job, reason: str = "abort") -> None:
        """End every sequence of `job` at the next step, running or waiting."""
        for req in job.requests:
            if req.finish_reason is None:
                self.engine.abort(req, reason)
        self._wake.set()

    def drain(self, grace: float, hurry=lambda: False) -> None:
        """A graceful shutdown's first half: admit no new job (they get EngineStopped), let the open
        ones run for up to `grace` seconds (less once `hurry()` is true: a second Ctrl-C), then cut
        the rest short (finish_reason "length", `job.cut`) and wait until their last deltas are out."""
        self._draining = True
        deadline = time.monotonic() + grace
        while self._working() and time.monotonic() < deadline and not hurry():
            time.sleep(0.05)
        with self._lock:
            jobs = {id(job): job for job, _, _ in self._jobs.values()}.values()
        for job in jobs:
            job.cut = True
            self.cancel(job, reason="length")
        deadline = time.monotonic() + 5.0
        while self._working() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _working(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return alive and (self.engine.has_work() or bool(self._jobs))

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down: open jobs are cut at once (`drain(0)`), then the thread exits."""
        self.drain(0.0)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        counted, since = self.engine.tokens_generated, time.perf_counter()  # for the throughput line
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            while not self._stopping:
                if not self.engine.has_work():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    counted, since = self.engine.tokens_generated, time.perf_counter()
                    continue
                ready: dict[asyncio.AbstractEventLoop, list] = {}
                for req in self.engine.step():
                    self._route(req, ready)
                for loop, items in ready.items():  # one wake-up of each event loop per step, not per delta
                    loop.call_soon_threadsafe(_put_all, items)
                if (elapsed := time.perf_counter() - since) >= self.log_interval:
                    log.info("engine: %d running, %d waiting, generation %.1f tokens/s", len(self.engine.running),
                             len(self.engine.waiting), (self.engine.tokens_generated - counted) / elapsed)
                    counted, since = self.engine.tokens_generated, time.perf_counter()
        except BaseException as e:  # a bug or OOM: fail every open job instead of hanging it
            self.error = e
            self._stopping = True
            with self._lock:
                for job, index, loop in self._jobs.values():
                    loop.call_soon_threadsafe(job.queue.put_nowait, (index, EngineStopped(f"engine failed: {e!r}")))
                self._jobs.clear()
            raise

    def _route(self, req: Request, ready: dict) -> None:
        with self._lock:
            entry = self._jobs.get(req.id)
            if entry is None or (req.finish_reason is None and not entry[0].stream):
                return
            delta = self.engine.take_delta(req)
            if delta is None:
                return
            if delta.finish_reason is not None:
                del self._jobs[req.id]
        job, index, loop = entry
        if delta.finish_reason == "error":
            log.error("request %s failed: %r", job.label, req.error)
            ready.setdefault(loop, []).append((job, index, RequestFailed(f"generation failed: {req.error!r}")))
            return
        ready.setdefault(loop, []).append((job, index, delta))
        if delta.finish_reason is not None and all(r.finish_reason is not None for r in job.requests):
            _log_finished(job)


def _log_finished(job: Job) -> None:
    seconds = time.perf_counter() - job.submitted
    completion = sum(len(r.output) for r in job.requests)
    reasons = "cut short by a shutdown" if job.cut else ",".join(sorted({r.finish_reason for r in job.requests}))
    log.info("request %s done (%s): prompt %d tokens, completion %d tokens, %.2f s, %.1f tokens/s", job.label,
             reasons, len(job.requests[0].prompt), completion, seconds, completion / max(seconds, 1e-9))


def _put_all(items) -> None:
    for job, index, delta in items:
        job.queue.put_nowait((index, delta))
