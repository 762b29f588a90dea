"""Sampling parameters and the batched, on-device sampler used by every decode step.

One call turns the last-position logits of the whole running batch into one token per row, on the
device, with per-row temperature, top-k, top-p and repetition/presence/frequency penalties. The
randomness is a counter-based hash of (request seed, token index, vocab id) fed to the Gumbel-max
trick, so a seeded request draws the same tokens whatever else shares its batch, with no per-row
torch.Generator and no host sync. Greedy rows (temperature 0) take the argmax of the penalised logits.
"""

from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20  # as OpenAI's API
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # seeds live in an int64 tensor (OpenAI's seed is an int64 too)


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # Hugging Face's: over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI's: over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings; not part of the returned text
    stop_token_ids: list[int] = field(default_factory=list)  # added to the tokenizer's end tokens
    ignore_eos: bool = False  # only `stop_token_ids` end the sequence (benchmarks)
    logprobs: int | None = None  # None: off; k: the chosen token's logprob plus the k most likely
    prompt_logprobs: int | None = None  # the same for each prompt token (echo=True scoring)
    embed: bool = False  # the prompt's pooled final hidden state (POST /v1/embeddings; max_new_tokens 0)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the field; the server turns it into a 400."""
        top = f"in [0, {MAX_TOP_LOGPROBS}]"
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, "an integer >= 0"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "in (0, 10]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("seed", self.seed is None or INT64_MIN <= self.seed <= INT64_MAX, "an int64"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS, top),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS, top),
            ("embed", not self.embed or self.max_new_tokens == 0, "False when max_new_tokens is not 0"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")


@dataclass
class BatchParams:
    """SamplingParams of the running rows as (B,) device tensors; rebuilt only when the batch changes."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    repetition: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor
    seed: torch.Tensor  # int64
    any_top: bool  # host-side flags: skip the sort / penalties / noise when no row asks for them
    any_penalty: bool
    any_sampled: bool

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], device) -> "BatchParams":
        def t(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=t([p.temperature for p in params]),
            top_p=t([p.top_p for p in params]),
            top_k=t([p.top_k for p in params], torch.int64),
            repetition=t([p.repetition_penalty for p in params]),
            presence=t([p.presence_penalty for p in params]),
            frequency=t([p.frequency_penalty for p in params]),
            seed=t(seeds, torch.int64),
            any_top=any(p.top_k > 0 or p.top_p < 1.0 for p in params),
            any_penalty=any(
                p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params
            ),
            any_sampled=any(p.temperature > 0 for p in params),
        )


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_M1, _M2, _GOLDEN = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(0x9E3779B97F4A7C15)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    # logical shift right on int64 (torch's >> is arithmetic)
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    # splitmix64's finaliser; int64 multiplication wraps, which is what the hash wants
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


NOISE_BITS = 23  # (k + 0.5) needs NOISE_BITS + 1 significant bits: fp32 has 24


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """Integers k in [0, 2**23) -> (k + 0.5) / 2**23 in fp32, every step exact: k + 0.5 fits fp32's 24
    significant bits and the scale is a power of two. So the values lie in [2**-24, 1 - 2**-24], strictly
    inside (0, 1), and -log(-log(u)) is finite for every one of them (tests check all 2**23). With 24 bits
    (as before 2026-12-07) the largest, (2**24 - 0.5) / 2**24, rounded to exactly 1.0: infinite noise."""
    return (bits.float() + 0.5) * (1.0 / (1 << NOISE_BITS))


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) floats strictly inside (0, 1), a pure function of (seed[b], step[b], vocab id)."""
    key = _mix(seed * _GOLDEN + _mix(step + 1))  # (B,)
    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    x = _mix(key.unsqueeze(1) + ids.unsqueeze(0) * _GOLDEN)  # (B, V)
    return unit_interval(_shr(x, 64 - NOISE_BITS))  # the hash's top bits


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) standard Gumbel noise, finite everywhere (see unit_interval)."""
    return -torch.log(-torch.log(uniform_noise(seed, step, vocab)))


def apply_penalties(logits, bp: BatchParams, counts, seen):
    """logits (B, V) fp32; counts (B, V) output-token counts; seen (B, V) bool, prompt or output."""
    rep = bp.repetition.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    counts = counts.to(logits.dtype)
    return logits - bp.frequency.unsqueeze(1) * counts - bp.presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def top_k_top_p_drop(logits, top_k, top_p):
    """(B, V) bool: True outside each row's top-k and nucleus (smallest set with probability >= top_p)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token
    drop = (ranks >= k) | (before >= top_p.unsqueeze(1))
    drop.select(1, 0).fill_(False)  # the most likely token always stays
    return drop.scatter(1, order, drop)  # back to vocab order


def sample(logits, bp: BatchParams, steps, counts=None, seen=None):
    """logits (B, V) -> token ids (B,) int64, on device. `steps` (B,): each row's output index."""
    logits = logits.float()
    if bp.any_penalty:
        logits = apply_penalties(logits, bp, counts, seen)
    greedy = logits.argmax(dim=-1)
    if not bp.any_sampled:
        return greedy
    temp = bp.temperature.unsqueeze(1)
    scaled = logits / torch.where(temp > 0, temp, 1.0)
    noisy = scaled + gumbel_noise(bp.seed, steps, logits.shape[-1])
    if bp.any_top:  # masked after the noise is added: a dropped token stays -inf whatever its noise
        noisy = noisy.masked_fill(top_k_top_p_drop(scaled, bp.top_k, bp.top_p), float("-inf"))
    drawn = noisy.argmax(dim=-1)
    return torch.where(bp.temperature > 0, drawn, greedy)


def logprobs_of(logits, tokens, k: int):
    """The model's log-probabilities (before penalties/temperature) of `tokens` (B,) and its top k."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)  # (B,)
    top = logp.topk(k, dim=-1) if k > 0 else None
    return chosen, top
