"""infer/graphs.py without a GPU: the static-shape decode step that CUDA graphs replay (rows padded to
a bucket, attention over the whole cache with a mask) gives the engine's tokens, batched and with rows
joining and leaving; buckets are chosen and padded right; a bucket that disagrees with the runner's own
step is left out. The capture itself needs CUDA (tests/test_kernels_gpu.py, bench/gpu.sh)."""

import pytest
import torch

from infer.engine import Engine
from infer.graphs import GraphedDecode
from infer.sampling import SamplingParams
from tests.test_engine import PROMPTS, make_model, tokenizer  # noqa: F401 (tokenizer: a fixture)


@pytest.mark.parametrize("moe", [False, True])
def test_the_static_step_decodes_the_engines_tokens(tokenizer, moe):  # noqa: F811
    model = make_model(f"use_moe={moe}")
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    plain = Engine(model, tokenizer, max_batch=3, max_len=64).generate(PROMPTS, params)
    graphed = Engine(model, tokenizer, max_batch=3, max_len=64, cuda_graphs="static")
    assert graphed.graphs is not None and sorted(graphed.graphs.graphs) == [1, 2, 3]
    assert "prepared" in graphed.graphs.report
    out = graphed.generate(PROMPTS, params)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]


def test_buckets_pad_the_rows_and_a_disagreeing_bucket_is_left_out(tokenizer):  # noqa: F811
    runner = Engine(make_model(), tokenizer, max_batch=40, max_len=32).runner
    runner.ensure_cache()
    graphs = GraphedDecode(runner, capture=False)
    assert graphs.buckets == [1, 2, 4, 8, 16, 32, 40]
    graphs.capture()
    assert [graphs.bucket(n) for n in (1, 3, 5, 33, 40)] == [1, 4, 8, 40, 40]
    ids = torch.tensor([[5], [6], [7]])
    pos = torch.tensor([[0], [0], [0]])
    with torch.no_grad():
        got = graphs(ids, pos)
        assert got.shape == (3, runner.vocab_size)
        assert graphs.graphs[4][1].flatten().tolist() == [5, 6, 7, 0]  # padded with token 0 at slot 0
        want = runner.forward_last(ids, pos, runner.cache.k, runner.cache.v, 0, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a step that computes something else is caught at start, and its bucket dropped
    broken = GraphedDecode(runner, capture=False)
    broken.static_step = lambda i, p: runner.forward_last(i, p, runner.cache.k, runner.cache.v, 0, 1) * 2
    broken.capture()
    assert not broken.graphs and "disagreeing" in broken.report and "runs without them" in broken.report


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_graphs_decode_the_eager_tokens_on_cuda(tokenizer, dtype):  # noqa: F811
    """On a GPU (bench/gpu.sh): the captured graphs, batched with rows joining and leaving, give the
    tokens of the same engine decoding eagerly."""
    model = make_model().to("cuda", dtype)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    eager = Engine(model, tokenizer, max_batch=3, max_len=64, cuda_graphs=False).generate(PROMPTS, params)
    graphed = Engine(model, tokenizer, max_batch=3, max_len=64)  # the default on CUDA
    assert graphed.graphs is not None and "captured 3 batch buckets" in graphed.graphs_report, graphed.graphs_report
    out = graphed.generate(PROMPTS, params)
    same = sum(a.token_ids == b.token_ids for a, b in zip(out, eager))
    assert same == len(PROMPTS) if dtype == torch.float32 else same >= len(PROMPTS) - 1  # bf16: a near-tie may flip
