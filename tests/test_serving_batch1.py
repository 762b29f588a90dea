"""Batch-1 serving (issue 19): the server returns the engine's own tokens, streaming and not, through
the official `openai` client over real HTTP; a non-streaming job is handed its text once, when it is
done; the server logs the thread layout it chose; and the measured serving choices (dtype, threads)."""

import asyncio
import logging

import openai
import pytest
import torch

from infer.async_engine import AsyncEngine
from infer.engine import Engine
from infer.sampling import SamplingParams
from infer.server import ServerThread, create_app
from infer.tokens import token_table
from infer.tuning import engine_threads, fastest_dtype, resolve_dtype
from tests.test_server import wide_checkpoint

PROMPT = [5, 300, 301, 17, 42, 9, 1000, 77]
NEW = 40


@pytest.fixture(scope="module")
def wide_ckpt(tokenizer_dir, tmp_path_factory):
    return wide_checkpoint(tmp_path_factory.mktemp("wide") / "run" / "step-3", tokenizer_dir)


@pytest.fixture(scope="module")
def reference(wide_ckpt):
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=1, max_len=128)
    out = engine.generate([PROMPT], SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True))[0]
    assert len(set(out.token_ids)) > 3  # the comparisons below are not vacuous
    return engine, out


@pytest.fixture(scope="module")
def served(wide_ckpt):
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=4, max_len=128)
    with ServerThread(create_app(engine, model_name="m", threads=torch.get_num_threads())) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def _ask(client, **kw):
    return client.completions.create(model="m", prompt=PROMPT, max_tokens=NEW, temperature=0,
                                     extra_body={"ignore_eos": True}, **kw)


def test_server_gives_the_engines_tokens(served, reference):
    engine, want = reference
    pieces = [token_table(engine.tokenizer).key[t] for t in want.token_ids]  # one key per id (bytes:\xNN...)
    plain = _ask(served, logprobs=0)
    assert plain.choices[0].logprobs.tokens == pieces
    assert plain.choices[0].text == want.text and plain.usage.completion_tokens == NEW
    assert _ask(served).choices[0].text == want.text  # without logprobs: the step packs only the ids
    chunks = list(_ask(served, stream=True, logprobs=0))
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == pieces
    assert "".join(c.choices[0].text for c in _ask(served, stream=True)) == want.text


def test_non_streaming_job_gets_one_delta_per_sequence(wide_ckpt, reference):
    _, want = reference
    loop_engine = AsyncEngine(Engine.from_checkpoint(wide_ckpt, max_batch=4, max_len=128))
    loop_engine.start()
    params = SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True)

    async def deltas(stream):
        job = loop_engine.submit(PROMPT, [params, params], stream=stream)
        return [(i, d) async for i, d in job.deltas()]

    try:
        plain, streamed = asyncio.run(deltas(False)), asyncio.run(deltas(True))
    finally:
        loop_engine.stop()
    assert sorted(i for i, _ in plain) == [0, 1]
    assert all(d.text == want.text and d.token_ids == want.token_ids and d.finish_reason for _, d in plain)
    assert len(streamed) > 2 * 5  # a streamed job still gets its text as it comes
    assert "".join(d.text for i, d in streamed if i == 0) == want.text


def test_server_logs_its_thread_layout(wide_ckpt, caplog):
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=2, max_len=64)
    threads = torch.get_num_threads()
    with caplog.at_level(logging.INFO, logger="infer"), ServerThread(create_app(engine, threads=threads)):
        pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine: device cpu")]
    assert len(lines) == 1 and f"(torch threads {threads} of " in lines[0], lines
    assert any(r.getMessage() == "dtype: float32" for r in caplog.records)


def test_engine_threads_leave_a_core_on_small_cpus():
    cpu = torch.device("cpu")
    assert [engine_threads(cpu, cores=n) for n in (1, 2, 4, 8, 16)] == [1, 1, 3, 7, 16]


def test_dtype_choices(wide_ckpt):
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=2, max_len=64)
    assert resolve_dtype(engine.model, None, "bfloat16", rows=2)[0] == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        resolve_dtype(engine.model, None, "float8", rows=2)
    best, report = fastest_dtype(engine.model, lambda m, rows: Engine(m, engine.tokenizer, max_batch=rows), rows=2)
    assert best in (torch.float32, torch.bfloat16) and next(engine.model.parameters()).dtype == torch.float32
    assert report.startswith(f"dtype: {str(best).removeprefix('torch.')}, the fastest here")
    assert "float32 " in report and "bfloat16 " in report  # both were timed
    auto = Engine.from_checkpoint(wide_ckpt, max_batch=2, max_len=64, dtype="auto")
    assert auto.dtype_report.split(",")[0] == f"dtype: {str(next(auto.model.parameters()).dtype)[6:]}"
