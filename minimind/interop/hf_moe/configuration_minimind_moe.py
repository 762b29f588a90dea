"""Hugging Face config for exported minimind MoE models (loaded with `trust_remote_code=True`).

A Llama config plus the routed-expert fields of minimind's ModelConfig; `minimind export` copies this
file, with modeling_minimind_moe.py, into the export directory and names both in config.json's
`auto_map`. It depends on transformers only, never on the minimind package.
"""

from transformers import LlamaConfig


class MiniMindMoEConfig(LlamaConfig):
    model_type = "minimind_moe"

    def __init__(
        self,
        n_routed_experts: int = 4,
        num_experts_per_tok: int = 2,
        n_shared_experts: int = 1,
        norm_topk_prob: bool = True,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = 0.01,
        seq_aux: bool = True,
        qk_norm: bool = False,
        **kwargs,
    ):
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.qk_norm = qk_norm  # per-head RMSNorm on q and k before RoPE, as Qwen3
        super().__init__(**kwargs)
