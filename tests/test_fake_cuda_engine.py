"""The engine's device core on CUDA, checked on a CPU-only machine with torch's FakeTensorMode (issue
15): the runner's `prefill`, `decode` (eager) and `sample` (infer/runner.py)
on a fake-CUDA `tiny` model, greedy and sampled with penalties and top-k/p, keep every tensor on cuda;
mixing in a CPU tensor raises, and so does reading a value back to the host.

What cannot run here, and why:
- the request bookkeeping around the core (`Engine.step`'s prefill, decode and sampling of requests):
  it builds the core's inputs from Python lists (`torch.tensor(list, device="cuda")`), which needs a
  real CUDA device even under fake mode on a CPU-only torch;
- `BatchParams.build` (the same), so the sampling parameters are made here with `torch.full`;
- the step's one device-to-host read (`.tolist()` of the sampled ids): fake tensors have no values;
- the compiled decode: inductor cannot generate CUDA code without a CUDA toolchain and device;
- the CUDA-graph decode (infer/graphs.py, the default on CUDA): capture needs a real device, and its
  replay copies into slices of static buffers (in-place writes into views fail under fake mode on a
  CPU-only torch); its static-shape step is checked against the runner's on the CPU in
  tests/test_engine_graphs.py, and the capture on a GPU by bench/gpu.sh.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from transformers import AutoTokenizer

from infer.engine import Engine
from infer.sampling import BatchParams
from tests.test_fake_cuda import fake_cuda, tiny


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def params(rows: int, sampled: bool) -> BatchParams:
    def full(value, dtype=torch.float32):
        return torch.full((rows,), value, dtype=dtype, device="cuda")

    return BatchParams(temperature=full(0.8 if sampled else 0.0), top_p=full(0.9), top_k=full(20, torch.int64),
                       repetition=full(1.1), presence=full(0.5), frequency=full(0.2), seed=full(7, torch.int64),
                       any_top=sampled, any_penalty=sampled, any_sampled=sampled)


@pytest.mark.parametrize("sampled", [False, True])
def test_prefill_decode_and_sampling_stay_on_cuda(tokenizer, sampled):
    with FakeTensorMode(allow_non_fake_inputs=False):
        runner = Engine(fake_cuda(tiny()).eval(), tokenizer, max_batch=4, max_len=32, cuda_graphs=False).runner
        with torch.no_grad():
            runner.ensure_cache()
            assert runner.cache.k.device.type == "cuda" and runner.counts.device.type == "cuda"
            ids = torch.zeros(2, 5, dtype=torch.long, device="cuda")
            last = torch.full((2,), 4, dtype=torch.long, device="cuda")
            has_zero = torch.zeros(2, dtype=torch.bool, device="cuda")
            logits, hidden = runner.prefill(ids, last, has_zero, start=0)
            batch_params = params(2, sampled)
            steps = torch.zeros(2, dtype=torch.long, device="cuda")
            tokens = runner.sample(logits, batch_params, steps)
            decoded = runner.decode(tokens.unsqueeze(1), torch.full((2, 1), 5, device="cuda"), length=6)
            tokens2 = runner.sample(decoded, batch_params, steps + 1)
        outs = [logits, hidden, tokens, decoded, tokens2, runner.counts, runner.seen, runner.cache.k]
        assert all(t.device.type == "cuda" for t in outs), [t.device for t in outs]
        assert logits.shape == decoded.shape == (2, runner.vocab_size) and tokens2.shape == (2,)
        with pytest.raises((DataDependentOutputException, RuntimeError)):  # the host read is seen
            tokens2.tolist()


def test_a_cpu_tensor_in_the_core_is_caught(tokenizer):
    with FakeTensorMode(allow_non_fake_inputs=True):
        runner = Engine(fake_cuda(tiny()).eval(), tokenizer, max_batch=2, max_len=32, cuda_graphs=False).runner
        with torch.no_grad():
            runner.ensure_cache()
            with pytest.raises(Exception, match="found at least two devices"):
                runner.decode(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), 2)
