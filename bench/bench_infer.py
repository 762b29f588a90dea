"""Inference throughput, `small` preset, random weights (throughput does not care), greedy, fixed
lengths (`ignore_eos`):
- batch-1 decode: engine eager, engine eager with plain `F.linear` (`_unpacked`: no prepacked oneDNN
  weights, see minimind/linear.py), engine compiled, stock transformers `generate()` of the same
  weights, and `weights_floor`: the same token count of the model's bare matrix-vector products
  through the fastest path this machine has (the packed one), the memory-bandwidth ceiling of any
  fp32 engine's matrix products; and `weights_read`: every weight only read (summed) once per token,
  no products and nothing else, the memory-bandwidth bound itself;
- the engine alone decoding 16 rows at once, packed and unpacked;
- aggregate output tokens/s with time to first token at 1/8/16/32 concurrent streams through
  `minimind serve` with the openai client, against the same server taking the 16 requests one at a
  time;
- batch 1 through that server (the official client, one request at a time, streaming and not)
  against the engine alone and transformers `generate()`, taking turns (issue 19);
- compiled decode (`compile="always"`) against eager at 16, 128 and 512 new tokens after prompts of
  16 and 200 tokens, taking turns, with the warm-up's time and the products floor beside them.
`MINIMIND_BENCH_SMOKE=1`: `tiny`, a few tokens, no compile.

    .venv/bin/python -m pytest bench/bench_infer.py -s --benchmark-columns=mean,stddev,rounds
"""

import asyncio
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from unittest import mock

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from infer.engine import Engine
from infer.sampling import SamplingParams
from minimind import linear
from minimind.checkpoint import save_checkpoint
from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM
from tests.conftest import ROOT

SMOKE = os.environ.get("MINIMIND_BENCH_SMOKE") == "1"
PRESET = "tiny" if SMOKE else "small"
PROMPT = list(range(10, 26))  # 16 tokens
NEW = 8 if SMOKE else 64
STREAMS = (1, 4) if SMOKE else (1, 8, 16, 32)
SEQUENTIAL = 4 if SMOKE else 16
ROUNDS = 1 if SMOKE else 3
SERVE_ROUNDS = 1 if SMOKE else 5  # the HTTP figures swing most on a shared 2-core machine
RESULTS: dict[str, float] = {}
COMPILED_PROMPTS = (16, 200)
COMPILED_NEW = (16, 128, 512)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from minimind.data.synth import write_corpus
    from minimind.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("bench_infer")
    write_corpus(root / "synth", seed=0, scale=0.2)
    tok_dir = train_tokenizer([root / "synth" / "pretrain.jsonl"], vocab_size=6400, out=root / "tok")
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.from_preset(PRESET, kernels="torch")).eval()
    ckpt = save_checkpoint(root / PRESET, model, tokenizer_dir=tok_dir)
    return model, AutoTokenizer.from_pretrained(tok_dir), ckpt


def hf_copy(model) -> LlamaForCausalLM:
    """Stock transformers Llama of the same shape holding our weights (names already match)."""
    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
    )).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf


def _unique_linears(model) -> list[torch.nn.Module]:
    """Every Linear of the model once (the tied lm_head shares the embedding's weight: counted once)."""
    return list({id(m.weight): m for m in model.modules() if isinstance(m, torch.nn.Linear)}.values())


def _per_token(op):
    """A runner doing `op()` once for each of NEW tokens, without grad: a bound's stand-in for decode."""
    def run():
        with torch.no_grad():
            for _ in range(NEW):
                op()
        return [0] * NEW

    return run


def _weights_floor(model):
    """The matrix-vector products of one batch-1 decode token and nothing else: every Linear of the
    model times one fp32 vector, through the model's own (packed) path, which is ~25% faster here than
    `F.linear`. At batch 1 these read all ~100 MB of weights from memory per token, which bounds any
    fp32 engine's matrix products with the same weights on this machine."""
    layers = _unique_linears(model)
    inputs = {m.in_features: torch.randn(1, m.in_features) for m in layers}
    return _per_token(lambda: [m(inputs[m.in_features]) for m in layers])


def _weights_read(model):
    """Every weight of the model read once per token and nothing else (a sum per tensor): the memory
    bandwidth bound of batch-1 decode with these weights, below what any matrix-vector product reaches."""
    weights = [m.weight for m in _unique_linears(model)]
    return _per_token(lambda: [w.sum() for w in weights])


def _unpacked(provider: str):
    """`*_unpacked` providers: every product through plain F.linear (MKL), as before minimind/linear.py."""
    return mock.patch.object(linear, "PACKED_MAX_ROWS", 0) if provider.endswith("unpacked") else nullcontext()


DECODE_PROVIDERS = ["engine_eager", "engine_eager_unpacked", "engine_compiled", "engine_graphs", "transformers",
                    "weights_floor", "weights_read"]
if os.environ.get("MINIMIND_BENCH_DECODE"):  # e.g. bench/gpu.sh: the providers its time limit allows
    DECODE_PROVIDERS = os.environ["MINIMIND_BENCH_DECODE"].split(",")


def _decode_runner(model, tok, provider):
    """-> a function generating NEW tokens at batch 1 (or the floors' equivalent), already warmed up."""
    if provider == "weights_floor":
        run = _weights_floor(model)
    elif provider == "weights_read":
        run = _weights_read(model)
    elif provider == "transformers":
        hf, ids = hf_copy(model), torch.tensor([PROMPT])

        def run():
            with torch.no_grad():
                out = hf.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            return out[0, len(PROMPT):].tolist()
    else:
        compile = "always" if provider == "engine_compiled" else False  # the compiled figure even where it loses
        graphs = None if provider == "engine_graphs" else False  # captured on CUDA (their default there)
        engine = Engine(model, tok, max_batch=1, max_len=256, compile=compile, cuda_graphs=graphs)
        sp = SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True)

        def run():
            with _unpacked(provider):
                return engine.generate([PROMPT], sp)[0].token_ids
    assert len(run()) == NEW  # warm-up: compilation is not measured
    return run


@pytest.fixture(scope="module")
def decode_runners(setup):
    model, tok, _ = setup
    skip = {"engine_compiled"} if SMOKE else set()
    if not torch.cuda.is_available():
        skip.add("engine_graphs")  # CUDA graphs need CUDA
    return {p: _decode_runner(model, tok, p) for p in DECODE_PROVIDERS if p not in skip}


@pytest.mark.parametrize("provider", DECODE_PROVIDERS)
def test_decode_batch1(benchmark, decode_runners, provider):
    if provider not in decode_runners:
        pytest.skip("CUDA graphs need CUDA" if provider == "engine_graphs"
                    else "compiling takes minutes; not in smoke mode")
    run, times = decode_runners[provider], []

    def timed():
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1)
    RESULTS[f"decode_{provider}"] = NEW * len(times) / sum(times)
    benchmark.extra_info["tokens_per_s"] = RESULTS[f"decode_{provider}"]


def _take_turns(runs: dict, rounds: int) -> dict[str, list[float]]:
    """Each run once per round, in turn: seconds per call, by name (a drifting machine hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def test_decode_batch1_interleaved(decode_runners):
    """The same providers taking turns, one generation each per round: this machine's speed drifts by
    tens of percent within a minute, which the back-to-back rounds above fold into the ratios."""
    times = _take_turns(decode_runners, ROUNDS + 2)
    for provider, ts in times.items():
        RESULTS[f"interleaved_{provider}"] = NEW / statistics.median(ts)


@pytest.mark.parametrize("provider", ["packed", "unpacked"])
def test_engine_16_rows(benchmark, setup, provider):
    """The engine alone, 16 sequences decoding together: the batching headroom the server can use."""
    model, tok, _ = setup
    engine = Engine(model, tok, max_batch=SEQUENTIAL, max_len=256)
    sp = SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True)
    prompts = [[10 + i] + PROMPT[1:] for i in range(SEQUENTIAL)]
    times = []

    def run():
        with _unpacked(provider):
            t0 = time.perf_counter()
            outs = engine.generate(prompts, sp)
            times.append(time.perf_counter() - t0)
        assert all(len(o.token_ids) == NEW for o in outs)

    run()  # warm-up
    times.clear()
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    RESULTS[f"engine_16_rows_{provider}"] = NEW * SEQUENTIAL * len(times) / sum(times)
    benchmark.extra_info["tokens_per_s"] = RESULTS[f"engine_16_rows_{provider}"]


@pytest.fixture(scope="module")
def server(setup):
    """`minimind serve` in its own process (the client's parsing must not share the server's GIL)."""
    _, _, ckpt = setup
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "minimind.cli", "serve", "--ckpt", str(ckpt), "--port", str(port),
         "--max-batch", "32", "--max-len", "256", "--model-name", "bench", "--dtype", "float32"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


async def _stream(client, i: int):
    """-> (output tokens, seconds to the first token) for one streaming completion."""
    start, ttft, usage = time.perf_counter(), None, None
    stream = await client.completions.create(
        model="bench", prompt=[10 + i] + PROMPT[1:], max_tokens=NEW, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return usage, ttft


def _client(url):
    return openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0,
                              http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64), timeout=600))


@pytest.mark.parametrize("streams", STREAMS)
def test_server_concurrent_streams(benchmark, server, streams):
    stats = {}

    def run():
        async def main():
            client = _client(server)
            t0 = time.perf_counter()
            outs = await asyncio.gather(*(_stream(client, i) for i in range(streams)))
            return outs, time.perf_counter() - t0

        outs, wall = asyncio.run(main())
        assert all(n == NEW for n, _ in outs)
        stats.setdefault("tps", []).append(sum(n for n, _ in outs) / wall)
        stats.setdefault("ttft", []).append(sum(t for _, t in outs) / len(outs))

    run()  # warm-up
    stats.clear()
    benchmark.pedantic(run, rounds=SERVE_ROUNDS, iterations=1)
    RESULTS[f"streams_{streams}"] = sum(stats["tps"]) / len(stats["tps"])
    RESULTS[f"ttft_{streams}"] = sum(stats["ttft"]) / len(stats["ttft"])
    benchmark.extra_info.update(tokens_per_s=RESULTS[f"streams_{streams}"], ttft_s=RESULTS[f"ttft_{streams}"])


def test_server_one_at_a_time(benchmark, server):
    """The baseline for batching: the same requests as the 16-stream run, each after the last."""
    tps = []

    def run():
        async def main():
            client = _client(server)
            t0, total = time.perf_counter(), 0
            for i in range(SEQUENTIAL):
                total += (await _stream(client, i))[0]
            return total / (time.perf_counter() - t0)

        tps.append(asyncio.run(main()))

    benchmark.pedantic(run, rounds=SERVE_ROUNDS, iterations=1)
    RESULTS["one_at_a_time"] = sum(tps) / len(tps)
    benchmark.extra_info["tokens_per_s"] = RESULTS["one_at_a_time"]


def _server_batch1(url, stream: bool):
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)

    def run():
        kw = dict(model="bench", prompt=PROMPT, max_tokens=NEW, temperature=0, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
            return [0] * chunks[-1].usage.completion_tokens
        return [0] * client.completions.create(**kw).usage.completion_tokens

    return run


def test_server_batch1_interleaved(server, decode_runners):
    """One request at a time through `minimind serve` (its own process, --dtype float32 like the
    engine here), streaming and not, taking turns with the engine alone and transformers."""
    runs = {"engine_alone": decode_runners["engine_eager"], "server_plain": _server_batch1(server, False),
            "server_stream": _server_batch1(server, True), "transformers": decode_runners["transformers"]}
    for run in runs.values():
        assert len(run()) == NEW  # warm-up
    times = _take_turns(runs, SERVE_ROUNDS)
    for name, ts in times.items():
        RESULTS[f"batch1_{name}"] = NEW / statistics.median(ts)
    for name in ("server_plain", "server_stream"):  # pairwise: each server run against the engine's same round
        RESULTS[f"batch1_{name}_vs_engine"] = statistics.median(
            [e / s for e, s in zip(times["engine_alone"], times[name])])


@pytest.fixture(scope="module")
def compiled_engines(setup):
    if SMOKE:
        pytest.skip("compiling takes minutes; not in smoke mode")
    model, tok, _ = setup
    t0 = time.perf_counter()
    compiled = Engine(model, tok, max_batch=1, max_len=1024, compile="always")
    RESULTS["compile_warmup_s"] = time.perf_counter() - t0
    print(f"\n{compiled.warmup_report}")
    return {"eager": Engine(model, tok, max_batch=1, max_len=1024), "compiled": compiled,
            "floor": _weights_floor(model)}


@pytest.mark.parametrize("new", COMPILED_NEW)
@pytest.mark.parametrize("prompt_len", COMPILED_PROMPTS)
def test_compiled_decode_lengths(compiled_engines, prompt_len, new):
    """tokens/s of the whole generate() (the prompt's prefill is eager in both) and of the products
    floor (64 tokens' matrix-vector products), taking turns."""
    prompt = [10 + i % 500 for i in range(prompt_len)]
    sp = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    times: dict[str, list[float]] = {"eager": [], "compiled": [], "floor": []}
    outs = {}
    for _ in range(ROUNDS):
        for name, engine in compiled_engines.items():
            t0 = time.perf_counter()
            out = engine() if name == "floor" else engine.generate([prompt], sp)[0].token_ids
            times[name].append(time.perf_counter() - t0)
            outs[name] = out
    assert len(outs["compiled"]) == new and len(outs["eager"]) == new
    key = f"p{prompt_len}_n{new}"
    for name in ("eager", "compiled"):
        RESULTS[f"decode_{name}_{key}"] = new / statistics.median(times[name])
    floor = NEW / statistics.median(times["floor"])
    RESULTS[f"compiled_vs_eager_{key}"] = statistics.median([e / c for e, c in zip(times["eager"], times["compiled"])])
    RESULTS[f"compiled_vs_floor_{key}"] = RESULTS[f"decode_compiled_{key}"] / floor


def test_zz_summary(capsys):
    """Ratios of the figures above, measured in this run."""
    lines = [f"{k}: {v:.3f}" for k, v in RESULTS.items()]
    base = RESULTS.get("decode_transformers")
    for p in ("engine_eager", "engine_eager_unpacked", "engine_compiled", "weights_floor", "weights_read"):
        if base and f"decode_{p}" in RESULTS:
            lines.append(f"batch-1 decode {p} / transformers generate(): {RESULTS[f'decode_{p}'] / base:.2f}x")
    base = RESULTS.get("interleaved_transformers")
    for p in DECODE_PROVIDERS:
        if base and p != "transformers" and f"interleaved_{p}" in RESULTS:
            lines.append(f"interleaved, median: batch-1 {p} / transformers generate(): "
                         f"{RESULTS[f'interleaved_{p}'] / base:.2f}x")
    packed, plain = RESULTS.get("engine_16_rows_packed"), RESULTS.get("engine_16_rows_unpacked")
    if packed and plain:
        lines.append(f"engine alone, 16 rows, packed / F.linear: {packed / plain:.2f}x")
    if packed and RESULTS.get("decode_engine_eager"):
        lines.append(f"engine alone, 16 rows / batch-1 eager: {packed / RESULTS['decode_engine_eager']:.2f}x")
    seq = RESULTS.get("one_at_a_time")
    for n in STREAMS:
        if seq and f"streams_{n}" in RESULTS:
            lines.append(f"{n} streams / one at a time: {RESULTS[f'streams_{n}'] / seq:.2f}x")
    for name in ("server_plain", "server_stream"):
        if f"batch1_{name}_vs_engine" in RESULTS:
            ratio = RESULTS[f"batch1_{name}_vs_engine"]
            lines.append(f"batch 1, {name} / engine alone (pairwise median): {ratio:.2f}x")
    if RESULTS.get("batch1_transformers"):
        lines.append(f"batch 1, engine alone / transformers: "
                     f"{RESULTS['batch1_engine_alone'] / RESULTS['batch1_transformers']:.2f}x")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert RESULTS, "run the whole file: the summary needs the benchmarks above"
