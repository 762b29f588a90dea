"""DeepSeek-style mixture-of-experts feed-forward (arXiv:2401.06066, as in MiniMind2-MoE).

Shared expert(s) see every token; each token is also routed to its top-K of E experts by a softmax
gate, optionally renormalised over the K chosen. The sequence-level auxiliary balance loss
(`seq_aux`) pushes each row's expert load toward uniform; it is returned, never stored on the module.
"""

import torch
import torch.nn as nn

from minimind.config import ModelConfig
from minimind.kernels.dispatch import Ops
from minimind.mlp import MLP


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: gate_proj, up_proj (E, F, D), down_proj (E, D, F)."""

    def __init__(self, n_experts: int, dim: int, width: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, width, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, width, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, width))
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(p, mean=0.0, std=0.02)


class MoEFeedForward(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops):
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.hidden_size, config.n_routed_experts, bias=False)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.intermediate_size)
        self.shared_experts = nn.ModuleList(MLP(config, ops) for _ in range(config.n_shared_experts))
        self.ops = ops

    def forward(self, x):  # x (B, T, D) -> (B, T, D), aux loss
        b, t, d = x.shape
        c = self.config
        flat = x.reshape(b * t, d)
        topk_weight, topk_idx, probs = self.ops.moe_gate(
            flat, self.gate.weight, top_k=c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob
        )
        e = self.experts
        y = self.ops.moe_dispatch_combine(flat, topk_weight, topk_idx, e.gate_proj, e.up_proj, e.down_proj)
        for shared in self.shared_experts:
            y = y + shared(flat)
        if self.training and c.aux_loss_alpha > 0:
            aux = balance_loss(probs.view(b, t, -1), topk_idx.view(b, t, -1), c.seq_aux) * c.aux_loss_alpha
        else:
            aux = flat.new_zeros((), dtype=torch.float32)
        return y.view(b, t, d), aux


def balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, seq_aux: bool) -> torch.Tensor:
    """sum_e f_e * P_e, with f_e the fraction of routed slots sent to e (scaled so uniform = 1) and
    P_e the mean router probability; per row when seq_aux, else over the whole batch.

    probs (B, T, E) fp32, topk_idx (B, T, K). Its minimum, 1, is reached by a perfectly balanced router.
    """
    b, t, n_experts = probs.shape
    k = topk_idx.shape[-1]
    if seq_aux:
        load = torch.zeros(b, n_experts, device=probs.device, dtype=probs.dtype)
        load.scatter_add_(1, topk_idx.reshape(b, t * k), torch.ones(b, t * k, device=probs.device, dtype=probs.dtype))
        load = load / (t * k / n_experts)  # (B, E)
        return (load * probs.mean(dim=1)).sum(dim=1).mean()
    load = torch.bincount(topk_idx.reshape(-1), minlength=n_experts).to(probs.dtype) / (b * t * k / n_experts)
    return (load * probs.reshape(-1, n_experts).mean(dim=0)).sum()
