"""Training-step throughput on CPU: the real loop's optimizer step (`Trainer.train_step`) for the
`small` preset, batch 4 x 256, against a stock transformers LlamaForCausalLM of the same shape trained
the plain way (AdamW, `labels=` loss, padded SFT rows), side by side in one run.

Providers: pretrain eager fp32 / --compile / bf16 autocast; SFT packed / padded (useful tokens/s =
tokens with non-zero loss weight); transformers pretrain and padded SFT; and `matmul_floor` (MKL and
oneDNN), the step's counted FLOPs as large GEMMs, the bound no fp32 trainer of this model beats here.

    pytest bench/bench_train.py --benchmark-columns=mean,stddev,rounds
"""

import pytest
import torch

B, T = 4, 256


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, smoke):
    from minimind.data.prepare import prepare
    from minimind.data.synth import write_corpus
    from minimind.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("bench-train")
    files = write_corpus(root / "synth", seed=0, scale=0.05 if smoke else 0.3)
    tok = train_tokenizer([files["pretrain"], files["sft"]], vocab_size=6400, out=root / "tok")
    return {
        "root": root,
        "pretrain": prepare("pretrain", files["pretrain"], tok, root / "pre"),
        "sft": prepare("sft", files["sft"], tok, root / "sft", max_seq_len=T),
    }


def _trainer(prepared, tmp_path, stage, smoke=False, **knobs):
    """A Trainer of the real loop from a TrainConfig: the stage's defaults, these shapes, `knobs` on top."""
    from minimind.train import Trainer
    from minimind.trainconfig import TrainConfig, resolve

    b, t = (2, 32) if smoke else (B, T)
    fields = dict(stage=stage, data=str(prepared[stage if stage == "pretrain" else "sft"]), out=str(tmp_path / "run"),
                  batch_size=b, seq_len=t, device="cpu", max_steps=1000000, kernels="torch")
    if stage == "pretrain":
        fields["model"] = "tiny" if smoke else "small"
    else:
        fields["init"] = str(_init_ckpt(prepared, smoke))
    return Trainer(resolve(TrainConfig(**{**fields, **knobs})))


def _init_ckpt(prepared, smoke):
    from minimind.checkpoint import save_checkpoint
    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM

    path = prepared["root"] / "init"
    if not path.exists():
        torch.manual_seed(0)
        model = MiniMindForCausalLM(ModelConfig.from_preset("tiny" if smoke else "small"))
        save_checkpoint(path, model, tokenizer_dir=prepared["root"] / "tok")
    return path


PROVIDERS = {
    "pretrain-eager-fp32": ("pretrain", {"dtype": "float32"}),  # pinned: --dtype auto may pick bf16
    "pretrain-compile-fp32": ("pretrain", {"compile": True, "dtype": "float32"}),
    "pretrain-bf16-autocast": ("pretrain", {"dtype": "bfloat16"}),
    "sft-packed-fp32": ("sft", {"dtype": "float32"}),
    "sft-padded-fp32": ("sft", {"no_packing": True, "dtype": "float32"}),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_minimind_step(benchmark, provider, prepared, tmp_path, smoke):
    stage, extra = PROVIDERS[provider]
    if smoke and extra.get("compile"):
        pytest.skip("smoke mode: torch.compile takes a minute on 2 cores; the full run measures it")
    trainer = _trainer(prepared, tmp_path, stage, smoke=smoke, **extra)
    stats = {"tokens": 0, "useful": 0}

    def step():
        done = trainer.train_step()
        stats["tokens"] += done.tokens  # this rank's counts of the step, from the batches' host copies
        stats["useful"] += done.useful

    step()  # warm-up (and compilation) outside the timing
    stats.update(tokens=0, useful=0)
    slow = extra["dtype"] == "bfloat16" and not torch.cuda.is_available()  # ~1 min a step on AVX2: 2 rounds say it
    benchmark.pedantic(step, rounds=2 if smoke or slow else 6, iterations=1, warmup_rounds=0 if smoke or slow else 1)
    _record(benchmark, stats, smoke or slow)


def _record(benchmark, stats, no_warmup):
    if benchmark.stats is None:  # --benchmark-disable
        return
    n = benchmark.stats.stats.rounds + (0 if no_warmup else 1)  # warmup rounds also ran step()
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(tokens_per_s=round(stats["tokens"] / n / mean, 1),
                                useful_tokens_per_s=round(stats["useful"] / n / mean, 1),
                                useful_fraction=round(stats["useful"] / max(stats["tokens"], 1), 3),
                                threads=torch.get_num_threads())


@pytest.mark.parametrize("stage", ["pretrain", "sft-padded"])
def test_transformers_step(benchmark, stage, prepared, smoke):
    """Stock LlamaForCausalLM, same shape and parameter count, trained the plain way: AdamW, `labels=`
    with -100 outside the loss, MiniMind's padded layout for SFT."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minimind.config import ModelConfig
    from minimind.data.loader import make_loader

    c = ModelConfig.from_preset("tiny" if smoke else "small")
    b, t = (2, 32) if smoke else (B, T)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True, attn_implementation="sdpa",
    )).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    data_stage = "pretrain" if stage == "pretrain" else "sft"
    loader = iter(make_loader(prepared[data_stage], stage=data_stage, batch_size=b, seq_len=t, packed=False))
    stats = {"tokens": 0, "useful": 0}

    def step():
        batch = next(loader)
        # HF shifts labels itself: labels[i] is the token at i, predicted from i-1
        labels = torch.cat([batch.input_ids[:, :1], batch.targets[:, :-1]], dim=1)
        labels[:, 0] = -100
        labels[:, 1:][batch.weights[:, :-1] == 0] = -100
        hf(input_ids=batch.input_ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats["tokens"] += batch.input_ids.numel()
        stats["useful"] += int((labels != -100).sum())

    step()
    stats.update(tokens=0, useful=0)
    benchmark.pedantic(step, rounds=2 if smoke else 6, iterations=1, warmup_rounds=0 if smoke else 1)
    _record(benchmark, stats, smoke)


@pytest.mark.parametrize("library", ["mkl", "onednn"])
def test_matmul_floor(benchmark, smoke, library):
    """The FLOPs of one `small` pretrain step (counted by FlopCounterMode over forward + backward) run as
    square 1024^3 fp32 GEMMs, the fastest shape this CPU multiplies, through MKL (`torch.mm`) and
    through oneDNN with the second operand prepacked: the faster of the two is a lower bound on the step
    time of any fp32 trainer of this model here, ours or transformers'. tokens_per_s is that bound."""
    from torch.utils.flop_counter import FlopCounterMode

    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM

    b, t = (2, 32) if smoke else (B, T)
    c = ModelConfig.from_preset("tiny" if smoke else "small", kernels="torch")
    model = MiniMindForCausalLM(c).train()
    ids = torch.randint(0, c.vocab_size, (b, t + 1))
    with FlopCounterMode(display=False) as counter:
        logits = model(ids[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    flops = counter.get_total_flops()
    n = 1024
    x, y = torch.randn(n, n), torch.randn(n, n)
    reps = max(1, round(flops / (2 * n ** 3)))
    if library == "onednn":
        from minimind.linear import onednn_available, pack_weight, packed_product

        if not onednn_available():
            pytest.skip("this torch build has no oneDNN")
        packed = pack_weight(y, rows_hint=n)

        def mm():
            return packed_product(x, packed)
    else:
        def mm():
            return torch.mm(x, y)

    def run():
        for _ in range(reps):
            mm()

    benchmark.pedantic(run, rounds=2 if smoke else 6, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        mean = benchmark.stats.stats.mean
        benchmark.extra_info.update(step_gflop=round(flops / 1e9, 1), gemm_gflop_per_s=round(flops / mean / 1e9, 1),
                                    tokens_per_s=round(b * t / mean, 1), threads=torch.get_num_threads())


@pytest.mark.parametrize("rows", [4, 8, 12])  # 12: the CPU default
def test_muon_vs_adamw_interleaved(prepared, tmp_path, smoke, rows):
    """The default pretrain step (Muon on the block matrices) against the same step with AdamW, in
    float32 and in bf16 autocast (Muon's iteration in the run's precision), at `rows` x 256: one
    trainer each, their steps taking turns, medians (issue 27's bar: Muon <= 1.5x AdamW)."""
    import statistics
    import time

    configs = {f"{optim} {dtype}": (optim, dtype) for dtype in ("float32", "bfloat16") for optim in ("muon", "adamw")}
    if smoke:
        configs = dict(list(configs.items())[:2])
    trainers = {name: _trainer(prepared, tmp_path / name.replace(" ", "-"), "pretrain", optim=optim, dtype=dtype,
                               batch_size=2 if smoke else rows, smoke=smoke)
                for name, (optim, dtype) in configs.items()}
    times = {name: [] for name in trainers}
    for round_ in range(2 if smoke else 6):
        for name, trainer in trainers.items():
            t = time.perf_counter()
            trainer.train_step()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    tokens = (2 * 32) if smoke else rows * T
    for name, s in med.items():
        optim, dtype = configs[name]
        ratio = s / med[f"adamw {dtype}"] if f"adamw {dtype}" in med else float("nan")
        print(f"{rows} x {T if not smoke else 32} {name:16s} {s * 1e3:7.0f} ms  {tokens / s:7.0f} tokens/s  "
              f"{ratio:.2f}x adamw at {dtype}")
    assert all(s > 0 for s in med.values())


def _minimind2_model(src: str, shape):
    """MiniMind2's own model code (model/model_minimind.py of a jingyaogong/minimind checkout at `src`),
    built at our preset's shape."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(src) / "model" / "model_minimind.py"
    spec = importlib.util.spec_from_file_location("minimind2_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # transformers' config machinery looks the class's module up
    spec.loader.exec_module(module)
    config = module.MiniMindConfig(hidden_size=shape.hidden_size, num_hidden_layers=shape.num_hidden_layers,
                                   num_attention_heads=shape.num_attention_heads,
                                   num_key_value_heads=shape.num_key_value_heads,
                                   intermediate_size=shape.intermediate_size, vocab_size=shape.vocab_size)
    return module.MiniMindForCausalLM(config).train()


def test_vs_minimind2_interleaved(prepared, tmp_path, smoke):
    """Our float32 step against MiniMind2's, same shape (`small`, 4 x 256) and tokens, taking turns.
    MiniMind2's step is its train_pretrain.py's on a CPU: logits, per-token cross-entropy times the loss
    mask over the mask's sum, backward, clip 1.0, torch's AdamW with its defaults. Ours: the real loop's
    step, with AdamW (like for like) and with the defaults (Muon). Needs MINIMIND2_SRC, a checkout of
    github.com/jingyaogong/minimind (not a dependency: skipped without it)."""
    import os
    import statistics
    import time

    import torch.nn.functional as F

    from minimind.config import ModelConfig
    from minimind.data.loader import make_loader

    src = os.environ.get("MINIMIND2_SRC")
    if not src:
        pytest.skip("set MINIMIND2_SRC to a checkout of github.com/jingyaogong/minimind to time its step")
    b, t = (2, 32) if smoke else (B, T)
    theirs = _minimind2_model(src, ModelConfig.from_preset("tiny" if smoke else "small"))
    opt = torch.optim.AdamW(theirs.parameters(), lr=5e-4)
    loader = iter(make_loader(prepared["pretrain"], stage="pretrain", batch_size=b, seq_len=t, packed=True))

    def minimind2_step():
        batch = next(loader)
        logits = theirs(batch.input_ids).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), batch.targets.view(-1), reduction="none")
        mask = batch.weights.view(-1)
        ((loss * mask).sum() / mask.sum()).backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    ours = {name: _trainer(prepared, tmp_path / name, "pretrain", dtype="float32", smoke=smoke, **knobs)
            for name, knobs in (("ours adamw", {"optim": "adamw"}), ("ours default", {}))}
    steps = {"minimind2": minimind2_step, **{name: tr.train_step for name, tr in ours.items()}}
    times = {name: [] for name in steps}
    for round_ in range(2 if smoke else 11):  # 10 timed: whole periods of Muon's block-periodic steps
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_:
                times[name].append(time.perf_counter() - start)
    mean = {name: statistics.mean(ts) for name, ts in times.items()}
    for name, s in mean.items():
        print(f"{b} x {t} float32 {name:12s} {s * 1e3:7.0f} ms  {b * t / s:6.0f} tokens/s  "
              f"{mean['minimind2'] / s:.2f}x minimind2's speed")
    assert all(s > 0 for s in mean.values())
