"""Mixture-of-experts gating and dispatch/combine (DeepSeek-style routed experts).

Expert weights are stacked: w_gate, w_up (E, F, D) and w_down (E, D, F), so every expert is part of
the graph on every step (an expert that receives no token gets an exact zero gradient, never None,
which DDP needs).

The reference dispatch sorts the N*K token-slots by expert and runs each expert on its contiguous
segment. It reads the per-expert counts on the host, which costs nothing on the CPU; the Triton
path does the same with a grouped matmul and no host sync.
"""

import torch
import torch.nn.functional as F


def moe_gate_ref(
    hidden: torch.Tensor,  # (N, D)
    gate_weight: torch.Tensor,  # (E, D)
    top_k: int,
    norm_topk_prob: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # softmax in fp32: the router's probabilities feed the aux loss and the combine weights.
    probs = F.linear(hidden.float(), gate_weight.float()).softmax(dim=-1)  # (N, E)
    topk_weight, topk_idx = torch.topk(probs, top_k, dim=-1, sorted=False)  # (N, K)
    if top_k > 1 and norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weight, topk_idx, probs


def moe_dispatch_combine_ref(
    hidden: torch.Tensor,  # (N, D)
    topk_weight: torch.Tensor,  # (N, K)
    topk_idx: torch.Tensor,  # (N, K) int64
    w_gate: torch.Tensor,  # (E, F, D)
    w_up: torch.Tensor,  # (E, F, D)
    w_down: torch.Tensor,  # (E, D, F)
) -> torch.Tensor:
    n, k = topk_idx.shape
    n_experts = w_gate.shape[0]
    flat_idx = topk_idx.reshape(-1)  # (N*K,)
    order = torch.argsort(flat_idx, stable=True)
    token_of_slot = order // k
    x = hidden[token_of_slot]  # (N*K, D), grouped by expert
    counts = torch.bincount(flat_idx, minlength=n_experts).tolist()
    outs = []
    start = 0
    for e, count in enumerate(counts):
        seg = x[start : start + count]
        outs.append(F.linear(F.silu(F.linear(seg, w_gate[e])) * F.linear(seg, w_up[e]), w_down[e]))
        start += count
    y = torch.cat(outs, dim=0)  # (N*K, D)
    y = y * topk_weight.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
    out = torch.zeros_like(hidden)
    return out.index_add(0, token_of_slot, y.to(hidden.dtype))
