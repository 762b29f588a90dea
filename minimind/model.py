"""The minimind decoder: Llama-style, pre-norm, GQA attention, RoPE, SwiGLU, RMSNorm, tied embeddings.

Shapes (README): B batch, T time, D hidden, H heads (Hq query, Hk key/value), Dh head dim, V vocab.
Every op a Triton kernel replaces goes through `self.ops` (minimind.kernels.dispatch), picked at build time.
The forward returns logits (or the final hidden states, for a fused loss) and the MoE aux loss; the
loss itself belongs to an objective, outside the model (`head_loss` is only the fused head op it calls).
"""

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minimind.config import ModelConfig
from minimind.kernels.dispatch import Ops, get_ops
from minimind.linear import Linear
from minimind.mlp import MLP
from minimind.moe import MoEFeedForward

try:  # optional, CUDA only
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, T, V), None when return_hidden
    hidden: torch.Tensor | None  # (B, T, D) after the final norm, only when return_hidden
    aux_loss: torch.Tensor  # scalar; 0 for dense models and in eval mode


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x):
        return self.ops.rmsnorm(x, self.weight, self.eps)

    def add_forward(self, x, residual):
        """Returns (norm(x + residual), x + residual)."""
        return self.ops.add_rmsnorm(x, residual, self.weight, self.eps)


class FusedHeadLoss(nn.Module):
    """The output head and the token loss as one op: (hidden (N, D), weight (V, D), targets (N,), weights
    (N,)) -> loss, never holding all N x V logits on the Triton path. A module that is handed the head's
    weight rather than reading it: DeepSpeed ZeRO-3 gathers a partitioned parameter only for the forward
    and backward of a module it is registered with, and the tied weight belongs to the embedding
    (`distributed.deepspeed_engine` registers it here). Elsewhere it costs one module call."""

    def __init__(self, ops: Ops):
        super().__init__()
        self.ops = ops

    def forward(self, hidden, weight, targets, weights=None, reduction="sum"):
        return self.ops.fused_linear_cross_entropy(hidden, weight, targets, weights, reduction=reduction)


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (P, Dh/2) in fp32; YaRN-scaled when config.rope_scaling asks for it."""
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    attention_factor = 1.0
    if config.rope_scaling is not None:
        inv_freq, attention_factor = _yarn(inv_freq, config.rope_scaling, dim, base)
    t = torch.arange(config.max_position_embeddings, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    return (freqs.cos() * attention_factor).float(), (freqs.sin() * attention_factor).float()


def _yarn(inv_freq, scaling: dict, dim: int, base: float):
    # YaRN (arXiv:2309.00071), with the same parameters and defaults as transformers' "yarn" rope type
    # so an exported model reproduces our logits.
    factor = float(scaling["factor"])
    original = scaling.get("original_max_position_embeddings", 2048)
    beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)
    attention_factor = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 on high-frequency dims: keep them, interpolate the low ones
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, attention_factor


class KVCache(nn.Module):
    """Preallocated keys/values for every layer, written by index at each row's positions."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__()
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.max_len = max_len

    def update(self, layer: int, k, v, position_ids):
        """k, v (B, T, Hk, Dh) written at position_ids (B, T); returns the layer's (B, Hk, Tmax, Dh)."""
        rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1).expand_as(position_ids)
        self.k[layer][rows, :, position_ids] = k.to(self.k.dtype)
        self.v[layer][rows, :, position_ids] = v.to(self.v.dtype)
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops, layer: int):
        super().__init__()
        d, hq, hk, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.hq, self.hk, self.dh, self.layer = hq, hk, dh, layer
        self.q_proj = Linear(d, hq * dh, bias=False)
        self.k_proj = Linear(d, hk * dh, bias=False)
        self.v_proj = Linear(d, hk * dh, bias=False)
        self.o_proj = Linear(hq * dh, d, bias=False)
        self.q_norm = RMSNorm(dh, config.rms_norm_eps, ops) if config.qk_norm else None
        self.k_norm = RMSNorm(dh, config.rms_norm_eps, ops) if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.ops = ops

    def forward(self, x, rope, position_ids, mask, kv_cache: KVCache | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.hq, self.dh)
        k = self.k_proj(x).view(b, t, self.hk, self.dh)
        v = self.v_proj(x).view(b, t, self.hk, self.dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.rope(q, k, rope[0], rope[1], position_ids)
        dropout = self.dropout if self.training else 0.0
        if kv_cache is None and mask is None and flash_attn_func is not None and _flash_ok(q):
            y = flash_attn_func(q, k, v, dropout_p=dropout, causal=True)  # (B, T, Hq, Dh)
        else:
            if kv_cache is not None:
                k, v = kv_cache.update(self.layer, k, v, position_ids)  # (B, Hk, S, Dh)
            else:
                k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hk, T, Dh)
            q = q.transpose(1, 2)  # (B, Hq, T, Dh)
            y = F.scaled_dot_product_attention(
                q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=dropout,
                is_causal=mask is None, enable_gqa=self.hq != self.hk,
            )
            y = y.transpose(1, 2)  # (B, T, Hq, Dh)
        return self.resid_dropout(self.o_proj(y.reshape(b, t, self.hq * self.dh)))


def _flash_ok(q) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.self_attn = Attention(config, ops, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        if config.use_moe:
            self.mlp = MoEFeedForward(config, ops)
        else:
            self.mlp = MLP(config, ops)

    def forward(self, x, residual, rope, position_ids, mask, kv_cache):
        # The residual stream travels beside the block output so each norm fuses with the add before it.
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, rope, position_ids, mask, kv_cache)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        if isinstance(self.mlp, MLP):
            return self.mlp(h), residual, None
        out, aux = self.mlp(h)
        return out, residual, aux


class MiniMindModel(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, ops, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)  # (P, Dh/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpointing = False  # recompute each block in backward: activations O(layers) -> O(1)

    def forward(self, input_ids, position_ids=None, kv_cache: KVCache | None = None):
        b, t = input_ids.shape
        mask = attention_mask(position_ids, kv_cache, t)
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
        x, residual, aux_total = self.dropout(self.embed_tokens(input_ids)), None, None
        rope = (self.rope_cos, self.rope_sin)
        for layer in self.layers:
            if self.grad_checkpointing and self.training and kv_cache is None:
                x, residual, aux = checkpoint(layer, x, residual, rope, position_ids, mask, None, use_reentrant=False)
            else:
                x, residual, aux = layer(x, residual, rope, position_ids, mask, kv_cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        x, _ = self.norm.add_forward(x, residual)
        return x, aux_total


def attention_mask(position_ids, kv_cache: KVCache | None, t: int):
    """Boolean (B, 1, T, S) mask, True = may attend; None means plain causal (SDPA's fast path).

    With a cache, a query at position p sees cache slots 0..p of its own row. Without one, a 0 in
    position_ids starts a new document and tokens see only earlier tokens of their own document.
    """
    if kv_cache is not None:
        if position_ids is None:
            raise ValueError("a KV cache needs position_ids (each row's absolute positions)")
        slots = torch.arange(kv_cache.max_len, device=position_ids.device)
        return (slots.view(1, 1, 1, -1) <= position_ids.unsqueeze(1).unsqueeze(-1))
    if position_ids is None:
        return None
    doc = torch.cumsum(position_ids == 0, dim=1)  # (B, T) document number within the row
    same_doc = doc.unsqueeze(2) == doc.unsqueeze(1)  # (B, T, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return (same_doc & causal).unsqueeze(1)


class MiniMindForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.config = config
        self.ops = get_ops(config.kernels, device)
        self.model = MiniMindModel(config, self.ops)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.head_loss = FusedHeadLoss(self.ops)  # no parameters: the state dict is unchanged
        std = config.initializer_range

        def init(module):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)

        self.apply(init)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                # GPT-2's scaled init: the residual stream's variance stays ~1 with depth
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * config.num_hidden_layers))
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, position_ids=None, kv_cache: KVCache | None = None, return_hidden=False):
        hidden, aux = self.model(input_ids, position_ids, kv_cache)
        if aux is None:
            aux = hidden.new_zeros(())
        if return_hidden:
            return ModelOutput(logits=None, hidden=hidden, aux_loss=aux)
        return ModelOutput(logits=self.lm_head(hidden), hidden=None, aux_loss=aux)

    def num_params(self, active: bool = False) -> int:
        """Unique parameters (tied embeddings counted once); `active`: those one token passes through."""
        total = sum(p.numel() for p in self.parameters())
        if active and self.config.use_moe:
            c = self.config
            per_expert = 3 * c.hidden_size * c.intermediate_size
            total -= c.num_hidden_layers * (c.n_routed_experts - c.num_experts_per_tok) * per_expert
        return total
