"""Decode steps replayed from CUDA graphs, as gpt-fast does it: at batch 1 a decode step of a 26M model
is some hundred kernel launches of a few microseconds each, so the launches, not the arithmetic, set
the speed. Each batch bucket's step is captured once, at engine start, with static shapes: its rows
padded to the bucket, and attention over the whole cache (`max_len` slots) with a mask for the slots
past each row's position, instead of a window that grows by a slot a token (a new shape each step).
A step then copies its ids and positions into the bucket's input buffers and replays one graph.

Capture needs CUDA. Everything else (buckets, padding, the static-length step and its equality with the
runner's windowed one) runs anywhere: `GraphedDecode(runner, capture=False)` calls the same static step
directly, which is how the CPU tests check it. After capturing, `capture()` replays each bucket on a
probe and compares it with the runner's own step; a bucket that fails to capture or to agree is left
out, and with none left the engine decodes as before: `report` says what happened.

`GraphedDecode` wraps a `ModelRunner` (infer/runner.py) from outside and offers its `decode(ids, pos,
length)`; it reads the runner's cache by address, so the runner must keep that cache.
"""

import time

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


class GraphedDecode:
    def __init__(self, runner, capture: bool = True):
        """`runner`: a ModelRunner whose cache exists. `capture`: False prepares the static steps only."""
        self.runner = runner
        self.use_graphs = capture
        self.buckets = sorted({b for b in BUCKETS if b < runner.max_batch} | {runner.max_batch})
        self.graphs: dict[int, tuple] = {}  # bucket -> (graph or None, ids, pos, logits)
        self.report = "CUDA graphs: not captured"

    def static_step(self, ids, pos):
        """The decode step at a fixed shape: (b, 1) ids and positions, attending all max_len slots
        (the model masks the slots past each row's position)."""
        r = self.runner
        return r.forward_last(ids, pos, r.cache.k, r.cache.v, 0, r.max_len)

    def capture(self) -> str:
        """Captures (or, without CUDA graphs, prepares) every bucket's step; -> the report line."""
        t0 = time.perf_counter()
        device = self.runner.cache.k.device
        pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        failed = []
        for b in sorted(self.buckets, reverse=True):  # the largest first: the smaller reuse its memory
            ids = torch.zeros(b, 1, dtype=torch.long, device=device)
            pos = torch.zeros(b, 1, dtype=torch.long, device=device)
            try:
                graph, logits = self._capture_one(ids, pos, pool) if self.use_graphs else (None, None)
                self.graphs[b] = (graph, ids, pos, logits)
            except Exception as err:  # noqa: BLE001 (any capture failure: decode this bucket another way)
                failed.append(f"{b} ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
        if self.use_graphs:
            torch.cuda.synchronize()
        disagree = self._probe()
        for b in disagree:
            self.graphs.pop(b, None)
        took = time.perf_counter() - t0
        kind = "captured" if self.use_graphs else "prepared (no capture: static shapes only)"
        self.report = (f"CUDA graphs: {kind} {len(self.graphs)} batch buckets "
                       f"({', '.join(map(str, sorted(self.graphs)))}) in {took:.1f} s")
        if failed:
            self.report += f"; failed to capture: {'; '.join(failed)}"
        if disagree:
            self.report += f"; left out for disagreeing with the runner's step: {disagree}"
        if not self.graphs:
            self.report += "; decode runs without them"
        return self.report

    def _capture_one(self, ids, pos, pool):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up launches (lazy inits, autotuning) outside the graph
            for _ in range(2):
                self.static_step(ids, pos)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self.static_step(ids, pos)
        return graph, logits

    def _probe(self) -> list[int]:
        """Each bucket on a probe (every row at slot 0, one token), against the runner's own step with a
        one-slot window; -> the buckets that disagree."""
        r = self.runner
        bad = []
        for b, (_, ids, _, _) in sorted(self.graphs.items()):
            probe = torch.arange(b, device=ids.device).remainder(r.vocab_size).unsqueeze(1)
            at = torch.zeros_like(probe)
            got = self(probe, at).float()
            want = r.decode(probe, at, 1).float()
            tol = 1e-4 if got.dtype == torch.float32 and r.cache.k.dtype == torch.float32 else 3e-2
            if not torch.allclose(got, want, rtol=tol, atol=tol * max(1.0, float(want.abs().max()))):
                bad.append(b)
        return bad

    def bucket(self, n: int) -> int | None:
        return next((b for b in sorted(self.graphs) if b >= n), None)

    def decode(self, ids, pos, length: int) -> torch.Tensor:
        """The runner's `decode`: replayed from a bucket's graph, or the runner's own step for more rows
        than any bucket left holds."""
        if self.bucket(ids.shape[0]) is None:
            return self.runner.decode(ids, pos, length)
        return self(ids, pos)

    def __call__(self, ids, pos) -> torch.Tensor:
        """Next-token logits (n, V) for `ids`, `pos` (n, 1) of rows 0..n-1 (n at most the largest
        bucket). Rows past n in the bucket write their padding into free cache rows, at slot 0, which a
        prefill overwrites before anything reads it."""
        n = ids.shape[0]
        b = self.bucket(n)
        graph, sid, spos, out = self.graphs[b]
        sid.narrow(0, 0, n).copy_(ids)
        spos.narrow(0, 0, n).copy_(pos)
        if b > n:
            sid.narrow(0, n, b - n).zero_()
            spos.narrow(0, n, b - n).zero_()
        if graph is None:
            return self.static_step(sid, spos).narrow(0, 0, n)
        graph.replay()
        return out.narrow(0, 0, n)
