"""The data pipeline on CPU: tokenizer training, `prepare` throughput, loader throughput, packing efficiency.

Providers, side by side in one run:
- prepare (MB/s of jsonl, SFT): `minimind` with 1 and 2 worker processes (tiktoken as the encoder), the
  same with tokenizers as the encoder (`minimind_tokenizers`, 2 workers), against `transformers`: the
  tokenizer's own `apply_chat_template(tokenize=True)` line by line in one process, which is what
  MiniMind's SFTDataset does for every sample it serves (it re-tokenizes at every epoch).
- loader (tokens/s of (B, T) batches): packed and padded SFT, pretrain windows; compared with the
  ~900 tokens/s a `small` training step runs at on this CPU (BENCHMARKS.md, model section).
- `tokenizers_only`: just `encode_batch` over the already rendered chats, the tokenizer-bound ceiling.
- useful-token fraction (real tokens / B*T) of packed vs padded SFT rows, on the synth corpus and on a
  realistic length mix (log-normal lengths, median ~180 tokens, a long tail cut at T), in extra_info.

    pytest bench/bench_data.py --benchmark-columns=mean,stddev,rounds
"""

import json
import os
import time

import numpy as np
import pytest

from minimind.data.loader import make_loader, open_prepared, pack
from minimind.data.prepare import prepare
from minimind.data.synth import write_corpus
from minimind.data.tokenizer import load_tokenizer, train_tokenizer

TRAIN_STEP_TOKENS_PER_S = 900  # `small`, batch 4 x 256, fp32 on 2 cores (bench_model.py)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    smoke = os.environ.get("MINIMIND_BENCH_SMOKE") == "1"  # the `smoke` fixture is per test; this is per module
    out = tmp_path_factory.mktemp("bench-synth")
    paths = write_corpus(out, seed=0, scale=0.02 if smoke else 3.0)
    tok = train_tokenizer([paths["pretrain"], paths["sft"]], vocab_size=6400, out=out / "tok")
    return paths, tok


def test_tokenizer_training(benchmark, corpus, tmp_path):
    paths, _ = corpus
    files = [paths["pretrain"], paths["sft"]]
    size = sum(p.stat().st_size for p in files)
    kwargs = {"vocab_size": 6400, "out": tmp_path / "tok", "force": True}  # round 2 replaces round 1's
    benchmark.pedantic(train_tokenizer, args=(files,), kwargs=kwargs, rounds=2, iterations=1)
    benchmark.extra_info["input_MB"] = round(size / 1e6, 2)


def _minimind_prepare(src, tok, out, workers):
    return lambda: prepare("sft", src, tok, out, workers=workers, progress=False, force=True)  # round 2 replaces 1's


def _minimind_tokenizers_prepare(src, tok, out, workers):
    """The same pipeline with tokenizers as the encoder instead of tiktoken (same ids; fastbpe.py)."""
    return lambda: prepare("sft", src, tok, out, workers=workers, progress=False, fast=False, force=True)


def _transformers_prepare(src, tok, _out, _workers):
    hf = load_tokenizer(tok)

    def run():
        n = 0
        with open(src, encoding="utf-8") as f:
            for line in f:
                chat = json.loads(line)["conversations"]
                n += len(hf.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
        return n

    return run


def _tokenizers_only(src, tok, _out, _workers):
    """The ceiling: the rendered chats through `tokenizers` encode_batch (all threads), nothing else."""
    from tokenizers import Tokenizer

    from minimind.data.tokenizer import render_chatml

    with open(src, encoding="utf-8") as f:
        texts = [render_chatml(json.loads(line)["conversations"]) for line in f]
    backend = Tokenizer.from_file(str(tok / "tokenizer.json"))
    return lambda: backend.encode_batch(texts, add_special_tokens=False)


PROVIDERS = {"minimind": _minimind_prepare, "minimind_tokenizers": _minimind_tokenizers_prepare,
             "transformers": _transformers_prepare, "tokenizers_only": _tokenizers_only}


@pytest.mark.parametrize("provider,workers", [("minimind", 2), ("minimind", 1), ("minimind_tokenizers", 2),
                                              ("transformers", 1), ("tokenizers_only", 1)])
def test_prepare_throughput(benchmark, corpus, tmp_path, provider, workers):
    paths, tok = corpus
    src = paths["sft"]
    fn = PROVIDERS[provider](src, tok, tmp_path / "prep", workers)
    cpu = []

    def timed():
        # CPU seconds of this process and its (reaped) workers: a figure the other tenants of a shared
        # machine do not distort the way they distort wall time
        t0 = os.times()
        fn()
        t1 = os.times()
        cpu.append(sum(t1[:4]) - sum(t0[:4]))

    benchmark.pedantic(timed, rounds=2, iterations=1, warmup_rounds=0)
    if sum(cpu) > 0:  # os.times() ticks at 10 ms: a smoke-sized input can take "no" CPU time
        benchmark.extra_info["MB_per_cpu_s"] = round(src.stat().st_size / (sum(cpu) / len(cpu)) / 1e6, 2)
    benchmark.extra_info["load_avg_1m"] = round(os.getloadavg()[0], 1)
    if benchmark.stats:
        benchmark.extra_info["MB_per_s"] = round(src.stat().st_size / benchmark.stats.stats.mean / 1e6, 2)
    benchmark.extra_info["input_MB"] = round(src.stat().st_size / 1e6, 2)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    paths, tok = corpus
    out = tmp_path_factory.mktemp("bench-prep")
    return {stage: prepare(stage, paths[file], tok, out / stage, workers=2, progress=False)
            for stage, file in (("sft", "sft"), ("pretrain", "pretrain"))}


@pytest.mark.parametrize("stage,packed", [("sft", True), ("sft", False), ("pretrain", True)])
def test_loader_throughput(benchmark, prepared, stage, packed, smoke):
    b, t = (2, 64) if smoke else (16, 512)
    loader = make_loader(prepared[stage], stage=stage, batch_size=b, seq_len=t, packed=packed)
    n = 5 if smoke else 50

    def run():
        for _ in range(n):
            next(loader)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    if benchmark.stats:
        tokens_per_s = n * b * t / benchmark.stats.stats.mean
        benchmark.extra_info["tokens_per_s"] = round(tokens_per_s)
        benchmark.extra_info["x_train_step"] = round(tokens_per_s / TRAIN_STEP_TOKENS_PER_S)


def _useful(lengths: list[int], t: int, seed: int = 0) -> dict:
    capped = np.minimum(lengths, t)
    rows = pack(capped.tolist(), np.random.default_rng(seed).permutation(len(lengths)), t)
    return {"packed": round(float(capped.sum() / (len(rows) * t)), 4), "padded": round(float(capped.mean() / t), 4),
            "packed_rows": len(rows), "padded_rows": len(lengths)}


def test_useful_token_fraction(benchmark, prepared, smoke):
    t = 64 if smoke else 512
    synth = np.diff(open_prepared(prepared["sft"]).offsets).tolist()
    rng = np.random.default_rng(0)
    realistic = np.clip(rng.lognormal(mean=np.log(180), sigma=0.9, size=len(synth)), 8, 4096).astype(int).tolist()
    t0 = time.perf_counter()
    result = benchmark.pedantic(lambda: {"synth": _useful(synth, t), "realistic": _useful(realistic, t)},
                                rounds=1, iterations=1)
    benchmark.extra_info.update({f"{k}_{m}": v for k, r in result.items() for m, v in r.items()})
    benchmark.extra_info["pack_seconds"] = round(time.perf_counter() - t0, 3)
    loader = make_loader(prepared["sft"], stage="sft", batch_size=8, seq_len=t)
    batches = [next(loader) for _ in range(10)]
    real = sum(int((bt.input_ids != 0).sum()) for bt in batches) / sum(bt.input_ids.numel() for bt in batches)
    benchmark.extra_info["synth_packed_loader_batches"] = round(real, 4)
