"""The compiled decode step (issue 19): after the warm-up, generations of other prompt and output
lengths, and other row counts, compile nothing more (torch._dynamo's counters), and they give the
eager engine's tokens. The warm-up's report says what it timed and what it chose."""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoTokenizer

from infer.engine import Engine
from infer.sampling import SamplingParams
from tests.test_engine import greedy_reference, make_model


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def compiled(tokenizer):
    torch._dynamo.reset()
    engine = Engine(make_model(), tokenizer, max_batch=4, max_len=96, compile="always")
    return engine


def _greedy(n):
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def test_no_recompilation_after_warm_up(compiled):
    counters.clear()
    short = compiled.generate([[5, 6, 7]], _greedy(4))[0]
    long = compiled.generate([list(range(20, 60))], _greedy(50))[0]  # to 90 of the 96 slots
    batch = compiled.generate([[8, 9], list(range(100, 130)), [42] * 5], [_greedy(7), _greedy(20), _greedy(3)])
    assert len(short.token_ids) == 4 and len(long.token_ids) == 50 and [len(o.token_ids) for o in batch] == [7, 20, 3]
    assert compiled.compile, "decode fell back to eager: nothing compiled was tested"
    assert counters["stats"]["calls_captured"] == 0, dict(counters["stats"])  # dynamo traced nothing new
    assert sum(counters["recompiles"].values()) == 0 and counters["stats"]["unique_graphs"] == 0


def test_compiled_tokens_equal_eager(compiled):
    prompts = [[5, 6, 7], list(range(20, 41)), [300, 301]]
    outs = compiled.generate(prompts, [_greedy(12), _greedy(30), _greedy(9)])
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == greedy_reference(compiled.model, prompt, len(out.token_ids), compiled.vocab_size)
    assert len({tuple(o.token_ids[:3]) for o in outs}) > 1  # not one repeated token


def test_warm_up_report(compiled):
    report = compiled.warmup_report
    assert report.startswith("compile: warm-up ") and "ms compiled" in report and "ms eager" in report
    assert "decode runs compiled" in report


def test_bad_compile_value(tokenizer):
    with pytest.raises(ValueError, match="compile must be"):
        Engine(make_model(), tokenizer, compile="yes")
