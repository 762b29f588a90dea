"""The sampler's noise: every value it can produce lies strictly inside (0, 1) and gives finite Gumbel
noise (checked over all 2**23 values), a token that top-k/top-p masked is never drawn whatever the
noise says, and the seeded request that drew a masked token on e630cdd ('Hi thon Riverwick', issue 25)
now gets the scripted reply. Before the fix, the largest 24-bit value rounded to 1.0 in fp32, so one
token in ~2,600 at vocab 6,400 was taken whatever the logits."""

import pytest
import torch

import infer.sampling as sampling
from infer.sampling import BatchParams, SamplingParams, sample, uniform_noise


def test_every_noise_value_is_strictly_inside_the_unit_interval_and_its_gumbel_is_finite():
    bits = torch.arange(1 << sampling.NOISE_BITS, dtype=torch.int64)  # every value the hash can give
    u = sampling.unit_interval(bits)
    assert u.dtype == torch.float32
    assert u.min().item() > 0.0 and u.max().item() < 1.0
    assert bool((u[1:] > u[:-1]).all()), "distinct inputs must stay distinct (every step exact)"
    # exact: each value equals the float64 computation, so nothing rounded on the way
    assert torch.equal(u.double(), (bits.double() + 0.5) / (1 << sampling.NOISE_BITS))
    gumbel = -torch.log(-torch.log(u))
    assert bool(torch.isfinite(gumbel).all())


def test_the_hash_at_its_largest_gives_noise_below_one(monkeypatch):
    """The hash's output with every bit set (the value that rounded to 1.0 on e630cdd)."""
    monkeypatch.setattr(sampling, "_mix", lambda x: torch.full_like(x, -1))
    u = uniform_noise(torch.tensor([5]), torch.tensor([0]), 8)
    assert u.max().item() < 1.0
    assert bool(torch.isfinite(sampling.gumbel_noise(torch.tensor([5]), torch.tensor([0]), 8)).all())


@pytest.mark.parametrize("bad", [1.0, 0.0, float("nan")])
def test_a_masked_token_is_never_drawn_whatever_its_noise(monkeypatch, bad):
    """Tokens 2.. are outside top-k 2; give them noise that used to win (1.0 -> +inf Gumbel, or NaN)."""
    vocab, rows = 16, 64

    def noise(seed, step, v):
        u = torch.full((seed.shape[0], v), 0.5)
        u[:, 2:] = bad
        return u

    monkeypatch.setattr(sampling, "uniform_noise", noise)
    logits = torch.linspace(3.0, 0.0, vocab).expand(rows, vocab)
    bp = BatchParams.build([SamplingParams(temperature=1.0, top_k=2)] * rows, seeds=list(range(rows)), device="cpu")
    drawn = sample(logits, bp, torch.zeros(rows, dtype=torch.long))
    assert set(drawn.tolist()) <= {0, 1}


def test_tokens_outside_the_nucleus_are_never_drawn_over_many_seeds():
    """One token holds 99% of the mass, so top_p 0.9 masks all the others: every draw must be token 0.
    At vocab 6,400 the old noise drew a masked token once in ~2,600 draws: 6 of these 12,288 on e630cdd."""
    vocab, rows, steps = 6400, 1024, 12
    logits = torch.full((rows, vocab), -20.0)
    logits[:, 0] = 0.0
    bp = BatchParams.build([SamplingParams(temperature=0.7, top_p=0.9)] * rows,
                           seeds=[s * 7919 - 3 * 2**40 for s in range(rows)], device="cpu")
    wrong = 0
    for step in range(steps):
        wrong += int((sample(logits, bp, torch.full((rows,), step, dtype=torch.long)) != 0).sum())
    assert wrong == 0, f"{wrong} of {rows * steps} draws took a masked token"


def test_the_seed_that_drew_a_masked_token_gets_the_scripted_reply(tokenizer_dir, tmp_path):
    """The issue's reproduction: the scripted checkpoint, 'hello browser', this seed, temperature 0.7 and
    top_p 0.9 (the web UI's) gave '<think>hm</think>Hi thon Riverwick' on e630cdd."""
    from infer.engine import Engine
    from tests.test_server import SCRIPT, scripted_checkpoint

    engine = Engine.from_checkpoint(scripted_checkpoint(tmp_path / "scripted", tokenizer_dir), max_batch=2,
                                    max_len=256)
    prompt = engine.encode_chat([{"role": "user", "content": "hello browser"}])
    params = SamplingParams(max_new_tokens=200, temperature=0.7, top_p=0.9, seed=-1526543993305627658)
    assert engine.generate([prompt], params)[0].text == SCRIPT
