"""The inference engine: cached greedy decoding equals argmax over full forwards, continuous batching
gives each request the output it gets alone, seeded sampling is independent of the batch, and the
sampling knobs, stops, logprobs and streaming detokenization do what they say."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from infer.detok import IncrementalDetokenizer, holdback
from infer.engine import ContextLengthError, Engine
from infer.sampling import BatchParams, SamplingParams, apply_penalties, sample, uniform_noise
from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_model(*overrides, wide=True):
    """An untrained tiny model; `wide`: untied, large-scale embeddings, so that its argmax depends on
    the input (with the standard init, tied embeddings make it repeat the last token forever)."""
    torch.manual_seed(7)
    overrides = list(overrides) + (["tie_word_embeddings=false"] if wide else [])
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", overrides, kernels="torch")).eval()
    if wide:
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, 1.0)
            model.lm_head.weight.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def greedy_reference(model, prompt, n, vocab):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1, :vocab].argmax()))
    return ids[len(prompt):]


PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14, 15, 16], [100], [8, 9], list(range(20, 41)), [42] * 3, [300, 301]]


@pytest.mark.parametrize("moe", [False, True])
def test_greedy_with_cache_equals_argmax_over_full_forwards(tokenizer, moe):
    model = make_model(f"use_moe={moe}")
    # max_batch 3 < 7 prompts with different lengths: rows join and leave between steps
    engine = Engine(model, tokenizer, max_batch=3, max_len=64)
    lengths = [4, 9, 6, 12, 3, 8, 5]
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    outs = engine.generate(PROMPTS, params)
    for prompt, n, out in zip(PROMPTS, lengths, outs):
        assert out.token_ids == greedy_reference(model, prompt, n, engine.vocab_size)
        assert out.finish_reason == "length"
    assert len({tuple(o.token_ids[:3]) for o in outs}) > 3  # the check above is not vacuous


def test_batched_equals_one_at_a_time_and_slots_are_freed(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4, max_len=64)
    params = [SamplingParams(max_new_tokens=3 + 2 * i, temperature=0.9, seed=i, ignore_eos=True) for i in range(7)]
    together = engine.generate(PROMPTS, params)
    assert engine.running == [] and not engine.waiting
    alone = [engine.generate([p], sp)[0] for p, sp in zip(PROMPTS, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [len(o.token_ids) for o in together] == [3 + 2 * i for i in range(7)]


def test_seed_reproducible_and_seeds_differ(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=8, max_len=64)
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, seed=123, ignore_eos=True)
    a = engine.generate([[5, 6, 7]] * 3 + [[9, 9]], sp)
    b = engine.generate([[5, 6, 7]], sp)
    assert a[0].token_ids == a[1].token_ids == a[2].token_ids == b[0].token_ids
    c = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=124, ignore_eos=True))
    assert c[0].token_ids != b[0].token_ids
    unseeded = engine.generate([[5, 6, 7]] * 2, SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True))
    assert unseeded[0].token_ids != unseeded[1].token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4, max_len=64)
    greedy = engine.generate(PROMPTS[:3], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        got = engine.generate(PROMPTS[:3], SamplingParams(max_new_tokens=6, temperature=1.5, seed=1, ignore_eos=True,
                                                          **kw))
        assert [o.token_ids for o in got] == [o.token_ids for o in greedy]


def test_sampled_tokens_stay_inside_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    bp = BatchParams.build(
        [SamplingParams(top_k=2), SamplingParams(top_p=0.7)], seeds=[0, 0], device="cpu"
    )
    seen = set()
    for step in range(300):
        seen |= {(r, int(t)) for r, t in enumerate(sample(logits, bp, torch.tensor([step, step])))}
    assert {t for r, t in seen if r == 0} == {0, 1}  # top-2
    assert {t for r, t in seen if r == 1} == {0, 1}  # 0.5 + 0.3 >= 0.7


def test_gumbel_sampling_matches_softmax_frequencies():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 4000
    logits = probs.log().expand(n, 4)
    bp = BatchParams.build([SamplingParams(temperature=1.0)] * n, seeds=list(range(n)), device="cpu")
    counts = torch.bincount(sample(logits, bp, torch.zeros(n, dtype=torch.long)), minlength=4).float() / n
    # 4 standard errors of a binomial proportion at n=4000 is <= 0.032
    torch.testing.assert_close(counts, probs, atol=0.032, rtol=0)
    u = uniform_noise(torch.tensor([1, 2]), torch.tensor([0, 0]), 1000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.03
    assert not torch.equal(u[0], u[1])
    assert torch.equal(u, uniform_noise(torch.tensor([1, 2]), torch.tensor([0, 0]), 1000))


def test_penalties_arithmetic():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    counts = torch.tensor([[2, 0, 1, 0]])
    seen = torch.tensor([[True, True, True, False]])
    bp = BatchParams.build(
        [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)], [0], "cpu"
    )
    got = apply_penalties(logits, bp, counts, seen)
    # token 0: 2/2 - 0.25*2 - 0.5; token 1: -1*2 (seen in the prompt only); 2: 0.5/2 - 0.25 - 0.5; 3: untouched
    torch.testing.assert_close(got, torch.tensor([[0.0, -2.0, -0.5, 1.0]]))


def test_presence_penalty_stops_repeats(tokenizer):
    engine = Engine(make_model(wide=False), tokenizer, max_batch=4, max_len=64)
    plain = engine.generate([[42] * 3], SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))[0]
    assert len(set(plain.token_ids)) < 16  # greedy repeats itself...
    out = engine.generate([[42] * 3], SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True,
                                                     presence_penalty=2.0, frequency_penalty=2.0))[0]
    assert len(set(out.token_ids)) == 16  # ...and the penalties (logits span < 4 here) forbid it


def test_stop_token_and_stop_string(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4, max_len=64)
    free = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))[0]
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    out = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]
    assert out.text == tokenizer.decode(free.token_ids[:first])
    stop = free.text[len(free.text) // 2 :][:2]
    assert stop.strip()
    out = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=10, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == free.text[: free.text.index(stop)]
    deltas = list(engine.stream(PROMPTS[1], SamplingParams(max_new_tokens=10, temperature=0, stop=[stop])))
    assert "".join(d.text for d in deltas) == out.text
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])


def test_logprobs_equal_full_forward(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4, max_len=64)
    prompt = PROMPTS[1]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True, logprobs=3,
                                                   prompt_logprobs=2))[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logp = model(ids).logits[0, :, : engine.vocab_size].float().log_softmax(-1)
    for j, (lp, top) in enumerate(out.logprobs):
        pos = len(prompt) - 1 + j
        assert lp == pytest.approx(logp[pos, out.token_ids[j]].item(), abs=1e-4)
        assert list(top) == logp[pos].topk(3).indices.tolist()
        assert max(top.values()) == pytest.approx(lp, abs=1e-4)  # greedy picks the top token
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for t in range(1, len(prompt)):
        lp, top = out.prompt_logprobs[t]
        assert lp == pytest.approx(logp[t - 1, prompt[t]].item(), abs=1e-4)
        assert list(top) == logp[t - 1].topk(2).indices.tolist()
    scored = engine.generate([prompt], SamplingParams(max_new_tokens=0, prompt_logprobs=0))[0]
    assert scored.token_ids == [] and [p and p[0] for p in scored.prompt_logprobs] == pytest.approx(
        [p and p[0] for p in out.prompt_logprobs], abs=1e-5)


def test_streaming_never_splits_a_character(tokenizer):
    text = "龘 你好, 世界! ok"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    assert "" in deltas  # a character spans several byte tokens here, so holding back was needed
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text


def test_holdback_of_possible_stop_prefix():
    assert holdback("hello wor", ["world"]) == 3
    assert holdback("hello", ["xyz"]) == 0
    assert holdback("ab<", ["<|im", "b<x"]) == 2


def test_context_overflow_and_bad_prompts_are_clear_errors(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_len=16)
    with pytest.raises(ContextLengthError, match="context is 16 tokens"):
        engine.generate([list(range(5, 15))], SamplingParams(max_new_tokens=7))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.generate([[10**6]], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert engine.generate([list(range(5, 15))], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].finish_reason \
        == "length"


def test_generate_reads_current_weights_and_restores_mode(tokenizer):
    model = make_model().train()
    engine = Engine(model, tokenizer, max_batch=2, max_len=32)
    sp = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    before = engine.generate([[5, 6, 7]], sp)[0].token_ids
    assert model.training
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # the trainer updated its policy
    after = engine.generate([[5, 6, 7]], sp)[0].token_ids
    assert after == greedy_reference(model.eval(), [5, 6, 7], 5, engine.vocab_size) and after != before


def test_abort_frees_the_row(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_len=64)
    sp = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    a, b = engine.add_request([5, 6], sp), engine.add_request([7, 8], sp)
    engine.step()
    engine.abort(a)
    engine.step()
    assert a.finish_reason == "abort" and engine.running == [b]
    while engine.has_work():
        engine.step()
    assert b.output == greedy_reference(model, [7, 8], 30, engine.vocab_size)


def test_chat_encoding_uses_the_template(model, tokenizer):
    engine = Engine(model, tokenizer)
    msgs = [{"role": "user", "content": "hi"}]
    assert engine.encode_chat(msgs) == tokenizer.encode(tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True))
    assert engine.max_len == 2048 and not math.isnan(engine.vocab_size)


def test_lora_adapter_from_its_directory_and_on_a_live_unmerged_policy(tokenizer_dir, tmp_path):
    from minimind.checkpoint import save_checkpoint, write_adapter
    from minimind.lora import apply_lora

    base = save_checkpoint(tmp_path / "base", make_model(), tokenizer_dir=tokenizer_dir)
    policy = make_model()
    apply_lora(policy, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write_adapter(adapter, policy, base_ckpt=base, targets=["q_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj", "k_proj"], rank=4, alpha=8.0,
                  dropout=0.0)
    sp = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    live = Engine(policy.eval(), tok, max_batch=2, max_len=32).generate([[5, 6, 7]], sp)[0].token_ids
    assert live == greedy_reference(policy, [5, 6, 7], 6, len(tok))  # unmerged adapters, as GRPO holds them
    for engine in (Engine.from_checkpoint(base, lora=adapter, max_len=32),  # --lora DIR
                   Engine.from_checkpoint(adapter, max_len=32)):  # a LoRA checkpoint names its base
        assert engine.generate([[5, 6, 7]], sp)[0].token_ids == live
    plain = Engine.from_checkpoint(base, max_len=32).generate([[5, 6, 7]], sp)[0].token_ids
    assert plain != live


def test_compiled_decode_equals_eager(model, tokenizer):
    """`compile=True` (torch.compile of the decode step, padded to batch/length buckets) changes
    nothing but speed."""
    eager = Engine(model, tokenizer, max_batch=8, max_len=64)
    compiled = Engine(model, tokenizer, max_batch=8, max_len=64, compile=True)
    # 5 rows decode as a batch padded to 8, one graph (compiling is the slow part of this test)
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    want = eager.generate(PROMPTS[:5], params)
    got = compiled.generate(PROMPTS[:5], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
