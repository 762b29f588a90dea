"""The model config: one dataclass, saved as config.json in every checkpoint, plus the presets.

Field names follow Hugging Face's Llama/Qwen configs so export is a rename, not a translation;
MiniMind's own short names (dim, n_layers, ...) are accepted as aliases when reading.
"""

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field

from minimind.kernels.dispatch import IMPLEMENTATIONS

PRESETS: dict[str, dict] = {
    # tests and the demo; ~1.2M params, most of them the embedding
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    # MiniMind2-Small, ~25.8M
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2),
    # MiniMind2, ~104M
    "base": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2),
    # MiniMind2-MoE, ~145M total: 4 routed experts (top-2) + 1 shared
    "moe": dict(
        hidden_size=640,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        use_moe=True,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
    ),
}

# MiniMind's LMConfig names -> ours
ALIASES = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "hidden_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings",
}

# Runtime choices: accepted when building a model, never written into config.json (SPEC §9).
RUNTIME_FIELDS = ("kernels",)


@dataclass
class ModelConfig:
    hidden_size: int = 512  # D
    num_hidden_layers: int = 8
    num_attention_heads: int = 8  # Hq
    num_key_value_heads: int = 2  # Hk; GQA when < Hq
    vocab_size: int = 6400  # V
    intermediate_size: int | None = None  # FFN width F; None: round_up(8/3 * D, multiple_of)
    multiple_of: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    qk_norm: bool = False  # RMSNorm on each head of q and k before RoPE (as Qwen3)
    initializer_range: float = 0.02  # the std of a fresh model's weights (o_proj, down_proj: / sqrt(2 layers))
    # YaRN, for inference past the trained context, e.g.
    # {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    rope_scaling: dict | None = None
    # MoE
    use_moe: bool = False
    n_routed_experts: int = 4  # E
    num_experts_per_tok: int = 2  # K
    n_shared_experts: int = 1
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.01
    seq_aux: bool = True
    norm_topk_prob: bool = True
    # runtime
    kernels: str = "auto"
    head_dim: int = field(init=False)  # Dh, derived

    def __post_init__(self):
        check_types(self)
        check_ranges(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.intermediate_size is None:
            # MiniMind/Llama rule: 2/3 of 4*D, rounded up to a multiple of `multiple_of`
            width = int(2 * 4 * self.hidden_size / 3)
            self.intermediate_size = self.multiple_of * math.ceil(width / self.multiple_of)
        if self.kernels not in IMPLEMENTATIONS:
            raise ValueError(f"kernels must be one of {', '.join(IMPLEMENTATIONS)}, got {self.kernels!r}")
        if self.scoring_func != "softmax":
            raise ValueError(f"scoring_func {self.scoring_func!r} is not supported (only 'softmax')")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in "
                f"1..n_routed_experts ({self.n_routed_experts})"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind != "yarn":
                raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'yarn')")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in RUNTIME_FIELDS + ("head_dim",):
            d.pop(name)
        return d

    @classmethod
    def from_dict(cls, d: dict, **runtime) -> "ModelConfig":
        d = {ALIASES.get(k, k): v for k, v in d.items()}
        d.pop("head_dim", None)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**{**d, **runtime})

    @classmethod
    def from_preset(cls, name: str, overrides: list[str] | None = None, **runtime) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        d = dict(PRESETS[name])
        d.update(parse_overrides(overrides or []))
        try:
            return cls.from_dict(d, **runtime)
        except ValueError as e:  # a value of the right type that makes no sense: say which flag gave it
            if not overrides:
                raise
            raise ValueError(f"--set {' '.join(overrides)}: {e}") from None

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


# sizes that must be at least 1, and real numbers that must be finite and above 0 (a 0 here fails later as a
# ZeroDivisionError or a reshape error, or builds a model with no layers)
POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                 "intermediate_size", "multiple_of", "max_position_embeddings", "n_routed_experts",
                 "num_experts_per_tok")
POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta", "initializer_range")


def check_types(config: "ModelConfig") -> None:
    """TypeError naming the first field whose value is not of its annotated type (config.json is user
    data: `"num_hidden_layers": "two"` must not reach `range()`). An int is accepted for a float; a bool
    is not an int here, though Python says it is."""
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        options = typing.get_args(f.type) if isinstance(f.type, types.UnionType) else (f.type,)
        if not any(_is_a(value, t) for t in options):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in options)
            raise TypeError(f"field {f.name!r}: expected {names}, got {type(value).__name__} {value!r}")


def _is_a(value, t) -> bool:
    if t is type(None):
        return value is None
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, t)


def check_ranges(config: "ModelConfig") -> None:
    """ValueError naming the first size below 1, or a non-finite or non-positive eps/theta/rate."""
    for name in POSITIVE_INTS:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"field {name!r} must be a positive integer, got {value}")
    for name in POSITIVE_FLOATS:
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"field {name!r} must be a finite number above 0, got {value}")
    if config.n_shared_experts < 0:
        raise ValueError(f"field 'n_shared_experts' must not be negative, got {config.n_shared_experts}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"field 'dropout' must be in [0, 1), got {config.dropout}")
    if not (math.isfinite(config.aux_loss_alpha) and config.aux_loss_alpha >= 0):
        raise ValueError(f"field 'aux_loss_alpha' must be a finite number >= 0, got {config.aux_loss_alpha}")


def parse_overrides(items: list[str]) -> dict:
    """`--set FIELD=VALUE` items -> dict, each value parsed and checked against the field's type."""
    types_ = {f.name: f.type for f in dataclasses.fields(ModelConfig) if f.init}
    out = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = ALIASES.get(name.strip(), name.strip())
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        if name not in types_:
            raise ValueError(f"--set {item!r}: unknown field {name!r}; fields: {', '.join(sorted(types_))}")
        out[name] = _parse_value(raw.strip(), types_[name], item)
    return out


def _parse_value(raw: str, annotation, item: str):
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if raw.lower() in ("none", "null") and type(None) in options:
        return None
    for t in options:
        try:
            if t is bool:
                if raw.lower() in ("true", "1", "yes"):
                    return True
                if raw.lower() in ("false", "0", "no"):
                    return False
                continue
            if t is int:
                return int(raw)
            if t is float:
                return float(raw)
            if t is str:
                return raw
            if t is dict:
                value = json.loads(raw)
                if isinstance(value, dict):
                    return value
        except (ValueError, json.JSONDecodeError):
            continue
    names = "/".join(getattr(t, "__name__", str(t)) for t in options)
    raise ValueError(f"--set {item!r}: {raw!r} is not a valid {names}")
