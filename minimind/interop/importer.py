"""`minimind import`: a MiniMind `.pth` state dict or a Hugging Face directory -> our checkpoint.

MiniMind's training scripts save `model.state_dict()` in fp16 (sometimes under `_orig_mod.` after
torch.compile, or inside a resume dict's "model"), with MiniMind2 names: Llama names for attention
and the dense MLP, routed experts as separate Linears `mlp.experts.N.{gate,up,down}_proj.weight`,
the router `mlp.gate.weight`, `mlp.shared_experts.N.*`. We stack the routed experts into our
(E, F, D) / (E, D, F) tensors; everything else keeps its name. Hugging Face directories (Llama,
Qwen3, our MoE export, MiniMind's own `model_type: minimind`) map config fields one to one.
Every missing, unknown or misshapen tensor is reported by name.
"""

import re
import sys
from pathlib import Path

import torch

from minimind.checkpoint import CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, CheckpointError, read_json, save_checkpoint
from minimind.config import ModelConfig
from minimind.model import MiniMindForCausalLM
from minimind.outputs import OutputError, carry_over, check_output

EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# buffers some MiniMind/transformers versions save; recomputed from the config, so dropped
RECOMPUTED = re.compile(r"(^|\.)(freqs_cos|freqs_sin|rotary_emb\.inv_freq)$")
# what an import writes in --out: what --force may replace; a user's other files there stay
IMPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES)


class ImportFormatError(Exception):
    """An input that cannot be imported; the message names the file, field or tensor."""


def run(args) -> int:
    try:
        check_output(args.out, flag="--out", inputs=[("the input", args.path), ("--tokenizer", args.tokenizer)],
                     force=args.force, directory=True)
        if args.source == "minimind-pth":
            if args.config is None:
                print("minimind import: --from minimind-pth needs --config PRESET (the model's size)", file=sys.stderr)
                return 2
            config = ModelConfig.from_preset(args.config, args.overrides, kernels="torch")
            model, tokenizer = import_minimind_pth(args.path, config), args.tokenizer
        else:
            if args.config is not None or args.overrides:
                print("minimind import: --config/--set apply to --from minimind-pth only; an hf directory "
                      "carries its config.json", file=sys.stderr)
                return 2
            model = import_hf(args.path)
            tokenizer = args.tokenizer or (args.path if (Path(args.path) / "tokenizer.json").is_file() else None)
        save_checkpoint(args.out, model, tokenizer_dir=tokenizer, metadata={"imported_from": args.path},
                        extra=lambda tmp: carry_over(args.out, tmp, owned=IMPORT_FILES))
    except (ImportFormatError, CheckpointError, OutputError, ValueError) as e:
        print(f"minimind import: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print("minimind import: warning: no tokenizer given (--tokenizer DIR); the checkpoint has none",
              file=sys.stderr)
    print(f"minimind import: wrote {args.out} ({model.num_params() / 1e6:.1f}M params)")
    return 0


def import_minimind_pth(file, config: ModelConfig) -> MiniMindForCausalLM:
    """A MiniMind2 state dict file -> our model (fp32) with `config`'s architecture."""
    file = Path(file)
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors have many types
        raise ImportFormatError(f"{file}: not a loadable torch state dict ({e})") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]  # a resume checkpoint {"model": ..., "optimizer": ...}
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ImportFormatError(f"{file}: expected a dict of tensor name -> tensor")
    return build_model(config, minimind_to_ours(sd, config), source=file)


def minimind_to_ours(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """MiniMind2 names -> ours: strip `_orig_mod.`, stack per-expert Linears, drop recomputed buffers."""
    out, experts = {}, {}
    for name, tensor in sd.items():
        name = name.replace("_orig_mod.", "")
        if RECOMPUTED.search(name):
            continue
        m = EXPERT_KEY.match(name)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = tensor
        else:
            out[name] = tensor.float()
    for (prefix, proj), by_index in experts.items():
        wanted = list(range(config.n_routed_experts))
        missing = [f"{prefix}.{i}.{proj}.weight" for i in wanted if i not in by_index]
        extra = [f"{prefix}.{i}.{proj}.weight" for i in sorted(by_index) if i not in wanted]
        if missing or extra:
            raise ImportFormatError(
                f"expert tensors do not match n_routed_experts={config.n_routed_experts}: "
                f"missing {missing[:4]}, unexpected {extra[:4]}"
            )
        out[f"{prefix}.{proj}"] = torch.stack([by_index[i].float() for i in wanted])  # (E, F, D) / (E, D, F)
    if config.tie_word_embeddings and "lm_head.weight" in out and "model.embed_tokens.weight" in out:
        if not torch.equal(out.pop("lm_head.weight"), out["model.embed_tokens.weight"]):
            raise ImportFormatError("lm_head.weight differs from model.embed_tokens.weight but the config ties them; "
                               "pass --set tie_word_embeddings=false")
    return out


def build_model(config: ModelConfig, sd: dict[str, torch.Tensor], source) -> MiniMindForCausalLM:
    """A model of `config` holding exactly the tensors of sd; errors name every bad tensor."""
    model = MiniMindForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing, unknown = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    bad_shapes = [f"{k} {tuple(sd[k].shape)} (config implies {tuple(expected[k])})"
                  for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:10])}")
    if unknown:
        problems.append(f"unknown {len(unknown)} tensor(s): {', '.join(unknown[:10])}")
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} tensor(s) of the wrong shape: {'; '.join(bad_shapes[:6])}")
    if problems:
        raise ImportFormatError(f"{source}: " + "; ".join(problems))
    model.load_state_dict(sd, strict=False)  # strict=False only for the tied lm_head, checked above
    return model.eval()


def import_hf(path) -> MiniMindForCausalLM:
    """A Hugging Face model directory (Llama, Qwen3, minimind_moe, minimind) -> our model."""
    path = Path(path)
    hf = _read_json(path / "config.json")
    config = config_from_hf(hf, path / "config.json")
    sd = {k: v for k, v in _read_hf_weights(path).items() if not RECOMPUTED.search(k)}
    if hf.get("model_type") == "minimind":
        sd = minimind_to_ours(sd, config)
    else:
        sd = {k: v.float() for k, v in sd.items()}
        if config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
    return build_model(config, sd, source=path)


def config_from_hf(hf: dict, source: Path) -> ModelConfig:
    kind = hf.get("model_type")
    if kind not in ("llama", "qwen3", "minimind_moe", "minimind"):
        raise ImportFormatError(
            f"{source}: model_type {kind!r} is not supported (llama, qwen3, minimind_moe, minimind)"
        )
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                      ("use_sliding_window", False)):
        if hf.get(key, want) != want:
            raise ImportFormatError(f"{source}: {key}={hf[key]!r} has no minimind equivalent (needs {want!r})")
    fields = {k: hf[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                 "max_position_embeddings") if hf.get(k) is not None}
    fields["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", kind == "minimind"))
    fields["qk_norm"] = kind == "qwen3" or bool(hf.get("qk_norm", False))
    fields.update(_rope_from_hf(hf, source))
    if kind == "minimind_moe" or hf.get("use_moe"):
        fields["use_moe"] = True
        for k in ("n_routed_experts", "num_experts_per_tok", "n_shared_experts", "norm_topk_prob", "scoring_func",
                  "seq_aux"):
            if k in hf:
                fields[k] = hf[k]
    try:
        config = ModelConfig.from_dict(fields, kernels="torch")
    except (TypeError, ValueError) as e:
        raise ImportFormatError(f"{source}: {e}") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != config.head_dim:
        raise ImportFormatError(f"{source}: head_dim={head_dim} but hidden_size/num_attention_heads={config.head_dim}")
    return config


def _rope_from_hf(hf: dict, source: Path) -> dict:
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else hf.get("rope_scaling")
    if not scaling:
        return {"rope_theta": float(theta)}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "yarn":
        raise ImportFormatError(f"{source}: rope type {kind!r} is not supported (default or yarn)")
    keep = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "truncate")
    return {"rope_theta": float(theta),
            "rope_scaling": {"rope_type": "yarn", **{k: scaling[k] for k in keep if scaling.get(k) is not None}}}


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        return {k: v for shard in shards for k, v in _load_tensors(path / shard).items()}
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return _load_tensors(path / name)
    raise ImportFormatError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        if file.suffix == ".safetensors":
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors have many types
        raise ImportFormatError(f"{file}: missing, truncated or corrupt ({e})") from None


def _read_json(file: Path) -> dict:
    return read_json(file, ImportFormatError)
