"""A step's one device->host transfer: the sampled token ids and, when any row asked for them, their
logprobs, packed into one float64 vector so that they cross in a single copy.

The packed layout, for n rows and the most top logprobs any row asked for, k:

    [ ids (n) | chosen logprobs (n) | top logprobs (k x n) | top ids (k x n) ]

each top block row-fastest: row i's j-th top logprob is at 2n + j*n + i, its id at 2n + n*k + j*n + i.
"""

import torch

from infer.sampling import logprobs_of


def to_host(tokens: torch.Tensor, logits: torch.Tensor, asked: list[int | None]) -> tuple[list[int], list | None]:
    """`tokens` (n,) sampled from `logits` (n, V); `asked[i]`: how many top logprobs row i wants (None:
    no logprobs) -> (the ids, and per row (logprob, {top id: logprob}) or None where not asked; None for
    every row when none asked)."""
    k = max((a for a in asked if a is not None), default=None)
    if k is None:
        return tokens.tolist(), None
    chosen, top = logprobs_of(logits, tokens, k)
    packed = [tokens.to(torch.float64), chosen.to(torch.float64)]
    if top is not None:
        packed += [top.values.to(torch.float64).T.reshape(-1), top.indices.to(torch.float64).T.reshape(-1)]
    host = torch.cat(packed).tolist()
    n = len(asked)
    return [int(x) for x in host[:n]], [None if a is None else _unpack(host, n, k, i, a) for i, a in enumerate(asked)]


def _unpack(host: list[float], n: int, k: int, i: int, asked: int) -> tuple[float, dict[int, float]]:
    """Row i's logprob and its `asked` (<= k) top ones out of the packed vector."""
    base = 2 * n
    return host[n + i], {int(host[base + n * k + j * n + i]): host[base + j * n + i] for j in range(asked)}
