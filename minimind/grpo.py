"""GRPO (DeepSeekMath, arXiv:2402.03300): sample a group of completions per prompt with the KV-cached
engine, score them with rule rewards, and push up the log-probs of completions that beat their
group's mean, with a clipped ratio and a k3 KL penalty to a frozen reference. The batches are
rollouts (`Rollouts`, here); the loss is objectives.GRPO, beside the other objectives.

Rewards: exact match on the rlaif `answer` (1), the <think>/<answer> format (0.2), minus penalties
for running out of tokens without stopping (0.1) and for repeated trigrams (up to 0.2).
"""

import random
import re

import torch

from minimind.batches import DataBatches
from minimind.data.loader import open_prepared
from minimind.errors import UsageError
from minimind.linear import drop_packed
from minimind.objectives import RolloutBatch, token_logps

_NUMBER = re.compile(r"-?\d+")
_FORMAT = re.compile(r"^\s*<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>\s*$", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def reward(text: str, answer: str | None, finished: bool) -> float:
    r = 0.0
    if answer is not None and answer_matches(text, answer):
        r += 1.0
    if _FORMAT.match(text):
        r += 0.2
    if not finished:
        r -= 0.1
    return r - 0.2 * repetition(text)


def answer_matches(text: str, answer: str) -> bool:
    m = _ANSWER.search(text)
    body = (m.group(1) if m else text).strip()
    gold = answer.strip()
    if _NUMBER.fullmatch(gold):
        numbers = _NUMBER.findall(body)
        return bool(numbers) and numbers[-1] == gold
    return gold in body


def repetition(text: str) -> float:
    """Fraction of character trigrams that are repeats (0 for short texts)."""
    grams = [text[i : i + 3] for i in range(len(text) - 2)]
    if len(grams) < 8:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)




class PromptSuccess:
    """Each prompt's recent exact-match success, a moving average over the groups it was sampled in (keyed
    by its token ids), and from it the chance that the prompt is used when the data stream offers it: 1
    until it has been tried, then 4p(1-p), highest for a prompt solved half the time, floored at FLOOR so a
    prompt always solved (or never) still comes back now and then to be checked."""

    FLOOR = 0.1

    def __init__(self, decay: float = 0.5):
        self.decay, self.rate = decay, {}

    def record(self, key, success: float) -> None:
        old = self.rate.get(key)
        self.rate[key] = success if old is None else self.decay * old + (1 - self.decay) * success

    def weight(self, key) -> float:
        p = self.rate.get(key)
        return 1.0 if p is None else max(self.FLOOR, 4 * p * (1 - p))


def has_signal(rewards: torch.Tensor) -> bool:
    """A group whose rewards all equal has no advantage: it adds nothing but the KL term to the update."""
    return bool((rewards.max() - rewards.min()) > 1e-6)


class Rollouts(DataBatches):
    """GRPO's batches (a stage record's `batches="rollouts"`): each step's prompts, read from prepared grpo
    data, with a group of completions each sampled from the policy as it is now, scored (`reward`) and
    packed with their advantages and their log-probs under the policy and the frozen reference `ref`."""

    def __init__(self, loader, model, ref, tokenizer_dir, cfg, device: torch.device):
        from infer.engine import Engine
        from minimind.data.tokenizer import load_tokenizer

        super().__init__(loader, device)
        if ref.config.to_dict() != model.config.to_dict():
            raise ValueError(f"--ref {cfg.ref}: its architecture differs from the policy's (--init)")
        self.model, self.ref, self.tokenizer = model, ref, load_tokenizer(tokenizer_dir)
        self.group, self.max_new_tokens, self.seed = cfg.group_size, cfg.max_new_tokens, cfg.seed
        # no CUDA graphs: the policy trains between rollouts (dropout, and DeepSpeed may re-point weights)
        self.engine = Engine(model, self.tokenizer, max_batch=cfg.batch_size * self.group, cuda_graphs=False)
        self._check_rollout_length()
        self.rollouts, self.want, self.rounds = 0, cfg.batch_size, cfg.sample_rounds
        self.success, self._offered = PromptSuccess(), []
        self._rng = random.Random(cfg.seed)

    @staticmethod
    def check_data(data_dir):
        stage = open_prepared(data_dir).meta.get("stage")
        if stage != "grpo":
            raise UsageError(f"--data {data_dir} was prepared for stage {stage!r}; "
                             "--stage grpo needs data prepared as grpo (rlaif prompts)")

    def _check_rollout_length(self):
        """A rollout is a prompt plus --max-new-tokens; past the engine's context it would fail at the first
        step (ContextLengthError), so the longest prompt of the data is checked here."""
        lengths = self.loader.data.lengths
        longest = int(lengths.max()) if len(lengths) else 0
        if longest + self.max_new_tokens > self.engine.max_len:
            raise UsageError(f"--max-new-tokens {self.max_new_tokens}: with the longest prompt of --data "
                             f"({longest} tokens) a rollout exceeds the model's context of {self.engine.max_len} "
                             f"tokens; use at most {max(0, self.engine.max_len - longest)}")

    def next_step(self, n: int) -> list[tuple]:
        """Rollouts need the policy as it is now, so nothing is read ahead; they are made on the device."""
        return [(b, b) for b in (self.next_batch() for _ in range(n))]

    def next_batch(self) -> RolloutBatch:
        """A group of completions for each of --batch-size prompts. With --sample-rounds N > 1 (DAPO's dynamic
        sampling) only groups that carry signal are kept: a group whose rewards all equal is dropped and more
        prompts are sampled, for at most N rounds, each prompt of the data stream used with its PromptSuccess
        weight; if none differs, the last round's groups are kept (their advantages are zero). `zero_adv` and
        `sampled` say how many groups had no signal and what the step sampled."""
        if self.rounds == 1:
            groups = self._sample_groups(self._draw(self.want, weighted=False))
            zero = sum(not has_signal(r) for _, _, r in groups)
            return self._batch(groups, [r for _, _, r in groups], zero / len(groups), len(groups))
        kept, last, rewards_all, sampled, zero = [], [], [], 0, 0
        for _ in range(self.rounds):
            last = self._sample_groups(self._draw(self.want - len(kept)))
            for group in last:
                prompt, _, rewards = group
                sampled += 1
                rewards_all.append(rewards)
                self.success.record(tuple(prompt), float((rewards >= 1.0).float().mean()))
                if has_signal(rewards):
                    kept.append(group)
                else:
                    zero += 1
            if len(kept) >= self.want:
                break
        return self._batch(kept or last, rewards_all, zero / sampled, sampled)

    def _batch(self, groups, rewards_all: list[torch.Tensor], zero_adv: float, sampled: int) -> RolloutBatch:
        """The groups packed with their advantages (reward minus the group's mean, over its std); the logged
        reward is the mean over every group sampled, kept or not."""
        rewards = torch.stack([r for _, _, r in groups])  # (prompts, g)
        adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
        flat = [p for p, _, _ in groups for _ in range(self.group)]
        completions = [c for _, cs, _ in groups for c in cs]
        return self._pack(flat, completions, adv, torch.cat(rewards_all), zero_adv, sampled)

    def _draw(self, n: int, weighted: bool = True) -> list[tuple[list[int], str | None]]:
        """n prompts (ids, answer) from the data stream, each offered one used with its PromptSuccess weight
        (all of them in order when not `weighted`)."""
        out = []
        while len(out) < n:
            if not self._offered:
                batch = next(self._iter)
                self._offered = list(zip(batch.prompt_ids, batch.answers))
            prompt, answer = self._offered.pop(0)
            if not weighted or self._rng.random() < self.success.weight(tuple(prompt)):
                out.append((prompt, answer))
        return out

    def _sample_groups(self, prompts) -> list[tuple[list[int], list[list[int]], torch.Tensor]]:
        """(prompt ids, its group's completions, their rewards) per prompt, sampled from the policy as it is."""
        from infer.engine import SamplingParams

        g = self.group
        seed = self.seed * 1_000_003 + self.rollouts
        self.rollouts += 1
        flat = [p for p, _ in prompts for _ in range(g)]
        params = [SamplingParams(max_new_tokens=self.max_new_tokens, temperature=1.0, top_p=1.0,
                                 seed=seed + i) for i in range(len(flat))]
        drop_packed(self.model)  # the optimizer may have written weights through .data (DeepSpeed)
        outs = self.engine.generate(flat, params)
        rewards = torch.tensor([reward(o.text, a, o.finish_reason == "stop")
                                for o, a in zip(outs, [a for _, a in prompts for _ in range(g)])])
        return [(p, [o.token_ids for o in outs[i * g : (i + 1) * g]], rewards[i * g : (i + 1) * g])
                for i, (p, _) in enumerate(prompts)]

    def _pack(self, prompts, completions, adv, rewards, zero_adv: float, sampled: int) -> RolloutBatch:
        eos = self.tokenizer.eos_token_id
        seqs = [p + c for p, c in zip(prompts, completions)]
        t = max(len(s) for s in seqs) - 1
        ids = torch.full((len(seqs), t), eos, dtype=torch.long)
        targets = torch.full((len(seqs), t), -100, dtype=torch.long)
        for i, (p, s) in enumerate(zip(prompts, seqs)):
            ids[i, : len(s) - 1] = torch.tensor(s[:-1])
            targets[i, len(p) - 1 : len(s) - 1] = torch.tensor(s[len(p) :])
        weights = (targets != -100).float()
        ids, targets = ids.to(self.device), targets.to(self.device)
        with torch.no_grad():
            old = token_logps(self.model, ids, targets)
            ref = token_logps(self.ref, ids, targets)
        return RolloutBatch(ids, targets, weights.to(self.device), None, adv.to(self.device), old, ref,
                            rewards.to(self.device), torch.tensor(zero_adv, device=self.device),
                            torch.tensor(float(sampled), device=self.device))


@torch.no_grad()
def mean_reward(engine, tokenizer, pairs: list[tuple[str, str]], max_new_tokens: int) -> float:
    """Greedy mean reward on (question, answer) pairs: how GRPO is evaluated on held-out prompts."""
    from infer.engine import SamplingParams

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True) for q, _ in pairs]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    return sum(reward(o.text, a, o.finish_reason == "stop") for o, (_, a) in zip(outs, pairs)) / len(pairs)
