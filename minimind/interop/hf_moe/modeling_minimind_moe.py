"""Hugging Face modeling code for exported minimind MoE models (loaded with `trust_remote_code=True`).

The decoder is stock Llama (with Qwen3's attention, which has per-head q/k RMSNorm, when the
config has `qk_norm`); only each layer's feed-forward is replaced by the DeepSeek-style MoE of
minimind (arXiv:2401.06066): a softmax router over E experts, top-K per token (renormalised when
`norm_topk_prob`), stacked expert weights gate_proj/up_proj (E, F, D) and down_proj (E, D, F), plus
shared experts that see every token. Tensor names equal minimind's, so the export is a copy. The
routing loop is plain torch, for inference and fine-tuning; it returns no auxiliary balance loss.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from .configuration_minimind_moe import MiniMindMoEConfig


class MiniMindMoEExperts(nn.Module):
    def __init__(self, config: MiniMindMoEConfig):
        super().__init__()
        e, f, d = config.n_routed_experts, config.intermediate_size, config.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(e, f, d))
        self.up_proj = nn.Parameter(torch.empty(e, f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))


class MiniMindMoEFeedForward(nn.Module):
    def __init__(self, config: MiniMindMoEConfig):
        super().__init__()
        if config.scoring_func != "softmax":
            raise ValueError(f"scoring_func {config.scoring_func!r} is not supported (only 'softmax')")
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.n_routed_experts, bias=False)
        self.experts = MiniMindMoEExperts(config)
        self.shared_experts = nn.ModuleList(LlamaMLP(config) for _ in range(config.n_shared_experts))

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        # router softmax in fp32, as in training: the combine weights come from it
        probs = F.linear(flat.float(), self.gate.weight.float()).softmax(dim=-1)  # (N, E)
        weight, idx = torch.topk(probs, self.top_k, dim=-1)  # (N, K)
        if self.top_k > 1 and self.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        y = torch.zeros_like(flat)
        ex = self.experts
        for e in range(ex.gate_proj.shape[0]):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            h = flat[token]
            out = F.linear(F.silu(F.linear(h, ex.gate_proj[e])) * F.linear(h, ex.up_proj[e]), ex.down_proj[e])
            y = y.index_add(0, token, (out * weight[token, slot].unsqueeze(-1).to(out.dtype)).to(y.dtype))
        for shared in self.shared_experts:
            y = y + shared(flat)
        return y.view(b, t, d)


class MiniMindMoEForCausalLM(LlamaForCausalLM):
    config_class = MiniMindMoEConfig
    _can_compile_fullgraph = False  # data-dependent routing

    def __init__(self, config: MiniMindMoEConfig):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.mlp = MiniMindMoEFeedForward(config)
            if getattr(config, "qk_norm", False):
                from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

                layer.self_attn = Qwen3Attention(config, layer_idx=i)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MiniMindMoEExperts):
            for p in (module.gate_proj, module.up_proj, module.down_proj):
                p.normal_(mean=0.0, std=self.config.initializer_range)
