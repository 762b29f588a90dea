"""The model runner: the model on its device, its KV cache and the penalty state of each cache row, and
the three device steps of serving (prefill, decode, sampling). It knows nothing of requests: tensors
go in and come out, on the model's device, and are never read back (scoring's `prompt_logprobs` aside).

The runner's methods index with methods (narrow, select, gather), not Python's `t[...]`, so that they
also run on fake CUDA tensors (tests/test_fake_cuda_engine.py). Its `decode` is the eager step; a
compiled one (`infer.compiled.CompiledDecode`) or one replayed from CUDA graphs (`infer.graphs`) wraps
the runner from outside and offers the same `decode(ids, pos, length)`.
"""

import torch

from infer import sampling
from infer.sampling import BatchParams, logprobs_of
from minimind.model import KVCache


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


class ModelRunner:
    def __init__(self, model, max_batch: int, max_len: int, vocab_size: int):
        """`max_batch` cache rows of `max_len` slots; logits cut to the first `vocab_size` ids (the
        embedding may be padded past the tokenizer's vocabulary: those ids are never sampled)."""
        self.model, self.max_batch, self.max_len, self.vocab_size = model, max_batch, max_len, vocab_size
        self.cache: KVCache | None = None
        self.counts: torch.Tensor | None = None  # (max_batch, V) int32: each row's output-token counts
        self.seen: torch.Tensor | None = None  # (max_batch, V) bool: each row's prompt and output tokens

    def ensure_cache(self) -> bool:
        """A cache on the model's device and dtype; -> True when it made a new one (the first, or the
        model moved or changed dtype: whatever read the old one must let it go)."""
        p = next(self.model.parameters())
        if self.cache is not None and self.cache.k.device == p.device and self.cache.k.dtype == p.dtype:
            return False
        # one spare slot, never attended: a compiled decode's cache window [:length] is then never
        # the whole tensor, which would be a shape of its own (a recompilation at length max_len)
        self.cache = KVCache(self.model.config, self.max_batch, self.max_len + 1, device=p.device, dtype=p.dtype)
        self.counts = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.int32, device=p.device)
        self.seen = torch.zeros(self.max_batch, self.vocab_size, dtype=torch.bool, device=p.device)
        return True

    def forward_last(self, ids, pos, k, v, start: int, length: int) -> torch.Tensor:
        """The model over `ids` (B, T) at `pos` (B, T), in cache rows start..start+B-1 of the cache
        tensors `k`, `v`, attending their first `length` slots -> the last position's logits (B, V)."""
        view = _CacheView(k, v, start, ids.shape[0], length)
        logits = self.model(ids, position_ids=pos, kv_cache=view).logits  # (B, T, V)
        return logits.select(1, -1).narrow(1, 0, self.vocab_size)

    def decode(self, ids, pos, length: int) -> torch.Tensor:
        """The decode step: each running row's last token `ids` (n, 1) at `pos` (n, 1), rows 0..n-1,
        attending their first `length` cache slots -> next-token logits (n, V)."""
        return self.forward_last(ids, pos, self.cache.k, self.cache.v, 0, length)

    def prefill(self, ids, last, has_zero, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompts `ids` (B, T) into cache rows start..start+B-1 (the padding writes slots
        that decode overwrites before reading them), `last` (B,) each prompt's last index, `has_zero`
        (B,) whether it holds token id 0 (the padding id) -> (last-token logits (B, V), hidden states
        (B, T, D)); resets the rows' penalty state to their prompts."""
        b, t = ids.shape
        pos = torch.arange(t, device=ids.device).unsqueeze(0).expand(b, t)
        view = _CacheView(self.cache.k, self.cache.v, start, b, t)
        hidden = self.model(ids, position_ids=pos, kv_cache=view, return_hidden=True).hidden  # (B, T, D)
        at_last = hidden.gather(1, last.view(b, 1, 1).expand(b, 1, hidden.shape[-1])).squeeze(1)  # (B, D)
        logits = self.model.lm_head(at_last).narrow(1, 0, self.vocab_size)
        self.counts.narrow(0, start, b).zero_()
        seen = self.seen.narrow(0, start, b)
        seen.zero_()
        seen.scatter_(1, ids, True)
        seen.scatter_(1, torch.zeros_like(last).unsqueeze(1), has_zero.unsqueeze(1))  # undo the padding id
        return logits, hidden

    def embed(self, hidden, lengths: list[int]) -> torch.Tensor:
        """Prompts' final hidden states (B, T, D), right-padded, their `lengths` -> one unit vector each
        (B, D), float32: the mean over positions weighted by position (1, 2, ..., n), as SGPT does for
        decoder-only models (Muennighoff, 2022). A causal model's position t has read only tokens
        0..t, so later positions know more of the text; a plain mean gives the first tokens, which know
        little, as much say, and the last position alone is shaped for predicting the next token."""
        b, t, _ = hidden.shape
        n = torch.tensor(lengths, device=hidden.device).unsqueeze(1)  # (B, 1)
        pos = torch.arange(1, t + 1, device=hidden.device).unsqueeze(0)  # (1, T)
        weights = torch.where(pos <= n, pos, 0).float()  # padding gets no weight
        pooled = (weights.unsqueeze(-1) * hidden.float()).sum(1)  # (B, D)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def prompt_logprobs(self, hidden, prompt: list[int], k: int) -> list:
        """Scoring (echo + logprobs), read back to the host: from a prompt's hidden states (T, D), the
        logprob of each prompt token given the ones before it, and the `k` most likely; the first is None."""
        ids = torch.tensor(prompt[1:], device=hidden.device)
        logits = self.model.lm_head(hidden[:-1])[:, : self.vocab_size]  # (T-1, V)
        chosen, top = logprobs_of(logits, ids, k)
        top_vals, top_ids = (top.values.tolist(), top.indices.tolist()) if top is not None else (None, None)
        out = [None]
        for j, lp in enumerate(chosen.tolist()):
            out.append((lp, dict(zip(top_ids[j], top_vals[j])) if top is not None else {}))
        return out

    def sample(self, logits, params: BatchParams, steps) -> torch.Tensor:
        """Logits (n, V) of rows 0..n-1, their sampling `params` and output indices `steps` (n,) ->
        token ids (n,), counted into the rows' penalty state."""
        n = logits.shape[0]
        counts, seen = self.counts.narrow(0, 0, n), self.seen.narrow(0, 0, n)
        tokens = sampling.sample(logits, params, steps, counts, seen)
        counts.scatter_add_(1, tokens.unsqueeze(1), torch.ones_like(tokens, dtype=torch.int32).unsqueeze(1))
        seen.scatter_(1, tokens.unsqueeze(1), True)
        return tokens

    def move_row(self, dst: int, src: int, length: int) -> None:
        """Row `src`'s first `length` cache slots and its penalty state into row `dst` (compaction)."""
        self.cache.k[:, dst, :, :length] = self.cache.k[:, src, :, :length]
        self.cache.v[:, dst, :, :length] = self.cache.v[:, src, :, :length]
        self.counts[dst], self.seen[dst] = self.counts[src], self.seen[src]

    def dummy_batch(self, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and positions of `rows` dummy rows at slot `length - 1`, for timing a decode step (the
        slots such a step writes are overwritten by the next prefill before anything reads them)."""
        device = self.cache.k.device
        ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        return ids, torch.full((rows, 1), length - 1, dtype=torch.long, device=device)
