"""Repetition in generated text: how often a continuation falls into a loop, and how varied its bigrams are.

Repetitive output is what MiniMind's users report most about small models (its issues #96, #101, #218,
#309, #410, #711), so the report card measures it on every run, over token ids (the same for English
and Chinese, and independent of how the tokenizer decodes):

- **loop**: a continuation loops when some stretch of it repeats one n-gram back to back, at least
  `MIN_REPEATS` times and over at least `MIN_SPAN` tokens, for a period n up to `MAX_PERIOD` tokens
  ("the cat the cat the cat ...", "1 1 1 1 ..."). A model that fell into such a loop never leaves it
  under greedy decoding, which is why loops show at the end of a reply that ran to its token limit.
- **distinct-2**: distinct bigrams / all bigrams, over all continuations together (Li et al., 2016):
  1.0 when no bigram is said twice, near 0 when every reply says the same few.
"""

MIN_REPEATS = 3
MIN_SPAN = 12
MAX_PERIOD = 16


def loop_period(ids: list[int], min_repeats: int = MIN_REPEATS, min_span: int = MIN_SPAN,
                max_period: int = MAX_PERIOD) -> int | None:
    """The shortest period p <= max_period of a stretch of `ids` that repeats a p-gram back to back at least
    `min_repeats` times and spans at least `min_span` tokens; None when there is none."""
    n = len(ids)
    for p in range(1, min(max_period, n // min_repeats) + 1):
        need = max(min_repeats * p, min_span)
        run = p  # length of the current stretch in which ids[i] == ids[i - p]; its first p tokens start it
        for i in range(p, n):
            run = run + 1 if ids[i] == ids[i - p] else p
            if run >= need:
                return p
    return None


def distinct_n(sequences: list[list[int]], n: int = 2) -> float | None:
    """Distinct n-grams / all n-grams over every sequence; None when no sequence has n tokens."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def measure(sequences: list[list[int]]) -> dict:
    """{"replies", "looping", "loop_share", "distinct_2", "mean_tokens"} over generated token ids."""
    looping = sum(loop_period(s) is not None for s in sequences)
    return {"replies": len(sequences), "looping": looping,
            "loop_share": looping / len(sequences) if sequences else None,
            "distinct_2": distinct_n(sequences, 2),
            "mean_tokens": sum(map(len, sequences)) / len(sequences) if sequences else None}
