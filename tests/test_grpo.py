"""GRPO's parts on fixed inputs: the rewards, which groups carry signal, the prompt sampler's weights, and
dynamic sampling in Rollouts (groups with equal rewards are dropped and replaced), driven by a scripted
policy so each group's rewards are known."""

import random
from types import SimpleNamespace

import pytest
import torch

from minimind.grpo import PromptSuccess, Rollouts, answer_matches, has_signal, repetition, reward
from minimind.objectives import GRPO, RolloutBatch


def test_rewards_on_fixed_replies():
    assert reward("7 + 5 = 12.", "12", finished=True) == 1.0
    assert reward("7 + 5 = 13.", "12", finished=True) == 0.0
    assert reward("7 + 5 = 12", "12", finished=False) == pytest.approx(0.9)  # ran out of tokens
    formatted = "<think>\n7 plus 5\n</think>\n<answer>\n12\n</answer>"
    assert reward(formatted, "12", finished=True) == pytest.approx(1.2 - 0.2 * repetition(formatted))
    assert answer_matches("<answer>13</answer> 12", "12") is False  # the answer tag decides
    assert answer_matches("He lives in Riverton.", "Riverton") is True
    assert repetition("abcabcabcabcabcabc") > 0.5 and repetition("the quick brown fox") == 0.0
    assert reward("12 " * 20, "12", finished=True) < 1.0  # repeated trigrams cost


def test_a_group_with_equal_rewards_has_no_signal():
    assert not has_signal(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert not has_signal(torch.tensor([-0.1, -0.1]))
    assert has_signal(torch.tensor([1.0, 0.0, 1.0, 1.0]))


def test_a_group_with_equal_rewards_contributes_nothing_but_kl():
    """Its advantages are zero, so with beta 0 its loss and gradient are zero."""
    model = torch.nn.Linear(2, 2)
    ids = torch.zeros(4, 3, dtype=torch.long)
    batch = RolloutBatch(ids, ids, torch.ones(4, 3), None, torch.zeros(4), torch.zeros(4, 3), torch.zeros(4, 3),
                         torch.ones(4))
    logp = torch.full((4, 3), -0.5, requires_grad=True)
    import minimind.objectives as objectives

    original = objectives.token_logps
    objectives.token_logps = lambda m, i, t: logp
    try:
        loss, _, metrics = GRPO(beta=0.0)(model, batch)
    finally:
        objectives.token_logps = original
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(logp.grad) == 0
    assert "zero_adv" not in metrics  # a plain batch has no sampling record


def test_the_prompt_sampler_weights_follow_recorded_successes():
    s = PromptSuccess(decay=0.5)
    assert s.weight("new") == 1.0  # untried: always offered
    s.record("half", 0.5)
    s.record("solved", 1.0)
    s.record("hopeless", 0.0)
    assert s.weight("half") == 1.0
    assert s.weight("solved") == s.weight("hopeless") == PromptSuccess.FLOOR
    s.record("solved", 0.0)  # failed once after: rate 0.5 again
    assert s.rate["solved"] == 0.5 and s.weight("solved") == 1.0
    s.record("quarter", 0.25)
    assert s.weight("quarter") == pytest.approx(0.75)


class _Script:
    """A stand-in for the rollout engine: prompt [k] answers correctly in the completions listed for it."""

    def __init__(self, right: dict[int, int], group: int):
        self.right, self.group, self.calls = right, group, []

    def generate(self, prompts, params):
        self.calls.append([p[0] for p in prompts[:: self.group]])
        outs = []
        for i, p in enumerate(prompts):
            ok = (i % self.group) < self.right.get(p[0], 0)
            outs.append(SimpleNamespace(text="= 1." if ok else "= 0.", token_ids=[5, 6], finish_reason="stop"))
        return outs


ROUNDS = 4


def _rollouts(right: dict[int, int], prompts: list[int], want: int = 2, group: int = 4,
              rounds: int = ROUNDS) -> tuple[Rollouts, _Script]:
    """A Rollouts without a model: the data stream yields `prompts` in order, each answer "1"."""
    r = Rollouts.__new__(Rollouts)
    r.group, r.max_new_tokens, r.seed, r.rollouts, r.want, r.rounds = group, 8, 0, 0, want, rounds
    r.success, r._offered, r._rng = PromptSuccess(), [], random.Random(0)
    stream = iter([SimpleNamespace(prompt_ids=[[k, 1]], answers=["1"]) for k in prompts * 100])
    r._iter = stream
    r.engine = script = _Script(right, group)
    r.model = torch.nn.Linear(1, 1)
    r._pack = lambda flat, completions, adv, rewards, zero_adv, sampled: SimpleNamespace(
        prompts=flat, adv=adv, rewards=rewards, zero_adv=zero_adv, sampled=sampled)
    return r, script


def test_dynamic_sampling_drops_groups_with_equal_rewards_and_samples_more():
    # prompts 0 and 1 are always solved, 2 never, 3 and 4 half the time
    r, script = _rollouts({0: 4, 1: 4, 2: 0, 3: 2, 4: 2}, prompts=[0, 1, 2, 3, 4])
    batch = r.next_batch()
    kept = sorted({p[0] for p in batch.prompts})
    assert kept == [3, 4]  # only the groups whose rewards differ
    assert batch.sampled == 5 and batch.zero_adv == pytest.approx(3 / 5)
    assert script.calls == [[0, 1], [2, 3], [4]]  # three rounds: two prompts wanted, then what was missing
    assert batch.adv.abs().sum() > 0
    assert r.success.rate[(0, 1)] == 1.0 and r.success.rate[(3, 1)] == 0.5


def test_dynamic_sampling_stops_after_max_rounds():
    r, script = _rollouts({}, prompts=[0, 1, 2])  # nothing ever solved: no group has signal
    batch = r.next_batch()
    assert len(script.calls) == ROUNDS
    assert batch.zero_adv == 1.0 and float(batch.adv.abs().sum()) == 0.0  # the last round's groups, no advantage


def test_one_round_keeps_every_group_and_counts_those_without_signal():
    """--sample-rounds 1 (the default): the stream's prompts in order, all kept, as before dynamic sampling."""
    r, script = _rollouts({0: 4, 1: 2}, prompts=[0, 1], rounds=1)
    batch = r.next_batch()
    assert script.calls == [[0, 1]] and [p[0] for p in batch.prompts[:: r.group]] == [0, 1]
    assert batch.sampled == 2 and batch.zero_adv == 0.5
