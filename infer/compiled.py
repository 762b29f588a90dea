"""The decode step under torch.compile, wrapping a `ModelRunner` from outside: `CompiledDecode(runner)`
offers the runner's `decode(ids, pos, length)`, compiled once with dynamic sizes (rows and attended
length), so nothing recompiles after its warm-up. No CUDA graphs ("reduce-overhead"): they would
record one graph per length (`infer.graphs` replays static-shape steps instead).

The warm-up compiles the step, then times it against the runner's eager one; `enabled` says whether
compiled was faster here (or was kept as asked), `report` says what was measured.
"""

import time

import torch


class CompiledDecode:
    def __init__(self, runner, keep: bool = False, rounds: int = 10):
        """`runner`: a ModelRunner whose cache exists. `keep`: run compiled whatever the warm-up finds."""
        self.runner = runner
        self.fn = torch.compile(self._step)
        self.slots = torch.arange(runner.max_len, device=runner.cache.k.device)  # its length: a dynamic size
        self.enabled = True
        self.report = self._warm_up(keep, rounds)

    def follow_cache(self) -> None:
        """The runner made a new cache (the model moved): the slot tensor moves to its device."""
        self.slots = torch.arange(self.runner.max_len, device=self.runner.cache.k.device)

    def _step(self, ids, pos, k, v, slots):
        """What is compiled: rows 0..B-1, attending over len(slots) cache slots (a dynamic size)."""
        return self.runner.forward_last(ids, pos, k, v, 0, slots.shape[0])

    def decode(self, ids, pos, length: int) -> torch.Tensor:
        """The runner's `decode`, compiled: rows padded to a bucket (1, 2..4, then multiples of 8)."""
        n = ids.shape[0]
        b = _bucket(n, 8 if n > 4 else 1, self.runner.max_batch)
        return self._run(_pad_rows(ids, b), _pad_rows(pos, b), length).narrow(0, 0, n)

    def _run(self, ids, pos, length: int) -> torch.Tensor:
        # dynamic sizes, never 0 or 1 (those are specialized): the attended length is >= 2 (a prompt
        # token and a generated one); one row has a graph of its own, 2..max_batch rows share one
        slots = self.slots[:length]
        torch._dynamo.mark_dynamic(slots, 0, min=2, max=self.runner.max_len)
        if ids.shape[0] > 1:
            torch._dynamo.mark_dynamic(ids, 0, min=2, max=self.runner.max_batch)
            torch._dynamo.mark_dynamic(pos, 0, min=2, max=self.runner.max_batch)
        cache = self.runner.cache
        return self.fn(ids, pos, cache.k, cache.v, slots)

    def _warm_up(self, keep: bool, rounds: int) -> str:
        """Compile the step (one graph for one row, one for 2..max_batch rows), then time it against
        eager decode at one row, alternating; `enabled` keeps the verdict. -> a line saying what was
        measured and chosen."""
        t0 = time.perf_counter()
        runner = self.runner
        was_training = runner.model.training
        runner.model.eval()
        try:
            with torch.no_grad():
                for rows in sorted({1, min(8, runner.max_batch)}):
                    _sync(self._run(*runner.dummy_batch(rows, 2), length=2))
                compiled_s = time.perf_counter() - t0
                times = {True: [], False: []}
                for i in range(2 * rounds):
                    compiled, length = i % 2 == 0, min(64 + i, runner.max_len)
                    t = time.perf_counter()
                    ids, pos = runner.dummy_batch(1, length)
                    _sync(self._run(ids, pos, length) if compiled else runner.decode(ids, pos, length))
                    times[compiled].append(time.perf_counter() - t)
        finally:
            runner.model.train(was_training)
        # the fastest of each: on a shared machine a step can only be slowed by others, never sped up
        fast, slow = min(times[True]), min(times[False])
        self.enabled = keep or fast < slow
        verdict = "decode runs compiled" if self.enabled else "compiled is not faster here: decode runs eager"
        if keep and fast >= slow:
            verdict = "decode runs compiled (as asked), though it is not faster here"
        return (f"compile: warm-up {compiled_s:.1f} s; a one-row decode step {fast * 1e3:.1f} ms compiled, "
                f"{slow * 1e3:.1f} ms eager (best of {rounds}); {verdict}")


def _bucket(n: int, multiple: int, cap: int) -> int:
    return min(cap, -(-n // multiple) * multiple)


def _pad_rows(x, rows: int):
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])]) if rows > x.shape[0] else x


def _sync(x: torch.Tensor) -> None:
    """Wait for the device (warm-up timing only): reading one value waits for everything before it."""
    x.reshape(-1)[:1].cpu()
