"""llama.cpp on our GGUF export against our engine: batch-1 greedy decode of `small` (random weights,
MiniMind2's 6,400-token vocabulary), f32 and q8_0, taking turns in one run so the machine's state is
the same for each. Prints tokens/s and the ratio to our engine (issue 30).

    pytest bench/bench_gguf.py -s
"""

import os
import statistics
import time

import pytest
import torch

from infer.engine import Engine
from infer.sampling import SamplingParams
from minimind.checkpoint import save_checkpoint
from minimind.config import ModelConfig
from minimind.interop.gguf_export import export_gguf
from minimind.model import MiniMindForCausalLM
from tests.conftest import ROOT

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the lock's runtimes extra) is not installed")

TOKENIZER = ROOT.parent / "shared" / "minimind_tokenizer"
SMOKE = os.environ.get("MINIMIND_BENCH_SMOKE") == "1"  # tests/test_bench_smoke.py: tiny, one round
PROMPT = list(range(10, 26))  # 16 tokens
NEW = 8 if SMOKE else 64
ROUNDS = 1 if SMOKE else 5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    if not TOKENIZER.is_dir():
        pytest.skip("../shared/minimind_tokenizer is absent")
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny" if SMOKE else "small", kernels="torch"))
    return save_checkpoint(tmp_path_factory.mktemp("gguf") / "small", model, tokenizer_dir=TOKENIZER)


def _llama_run(path):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, n_threads=torch.get_num_threads())

    def run():
        llm.reset()
        llm.eval(PROMPT)
        for _ in range(NEW):
            llm.eval([llm.sample(top_k=1, temp=0.0)])

    return run


def _engine_run(ckpt):
    engine = Engine.from_checkpoint(ckpt, max_batch=1, max_len=256, dtype=torch.float32)
    params = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)
    return lambda: engine.generate([PROMPT], params)


def test_llama_cpp_vs_engine_batch1(ckpt, tmp_path):
    runs = {"engine f32": _engine_run(ckpt)}
    for outtype in ("f32", "q8_0"):
        runs[f"llama.cpp {outtype}"] = _llama_run(export_gguf(ckpt, tmp_path / f"small-{outtype}.gguf", outtype))
    for run in runs.values():
        run()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    engine = statistics.median(times["engine f32"])
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"{name:16s} {NEW / s:7.1f} tokens/s (16-token prompt + {NEW} new, greedy)  "
              f"{engine / s:.2f}x our engine")
    assert all(ts for ts in times.values())
