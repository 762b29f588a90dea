"""The dense SwiGLU feed-forward: the block's MLP, and each shared expert of the MoE block (moe.py).
Below both model.py and moe.py, so neither imports the other for it."""

import torch.nn as nn

from minimind.config import ModelConfig
from minimind.kernels.dispatch import Ops
from minimind.linear import Linear


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(d, f, bias=False)
        self.up_proj = Linear(d, f, bias=False)
        self.down_proj = Linear(f, d, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.ops = ops

    def forward(self, x):
        return self.dropout(self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x))))
