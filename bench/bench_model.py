"""Forward+backward throughput of the model on CPU: `small` preset, batch 4 x 256, fp32.

Providers, side by side in one run: `minimind` (this project, torch kernels path) and `transformers`
(a stock LlamaForCausalLM of exactly the same shape and parameter count, trained the plain way).
tokens/s goes to benchmark.extra_info; BENCHMARKS.md has the figures.

    pytest bench/bench_model.py --benchmark-columns=mean,stddev,rounds
"""

import pytest
import torch

from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM

B, T = 4, 256


def _minimind(config):
    model = MiniMindForCausalLM(config)

    def loss(ids):
        logits = model(ids).logits  # (B, T, V)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    return model, loss


def _transformers(config):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf)

    def loss(ids):
        return model(input_ids=ids, labels=ids).loss  # shifts inside, as users call it

    return model, loss


@pytest.mark.parametrize("provider", ["minimind", "transformers"])
def test_forward_backward_small(benchmark, provider, smoke):
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny" if smoke else "small", kernels="torch")
    b, t = (2, 32) if smoke else (B, T)
    model, loss_fn = (_minimind if provider == "minimind" else _transformers)(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (b, t))

    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(ids).backward()

    step()  # warm-up, outside the timing
    benchmark.pedantic(step, rounds=3 if smoke else 10, iterations=1, warmup_rounds=0 if smoke else 1)
    benchmark.extra_info.update(
        preset="tiny" if smoke else "small", params=n_params, batch=f"{b}x{t}", dtype="float32",
        tokens_per_s=round(b * t / benchmark.stats.stats.mean, 1) if benchmark.stats else None,
        threads=torch.get_num_threads(),
    )
