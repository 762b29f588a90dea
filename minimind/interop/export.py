"""`minimind export`: a checkpoint as a directory that stock Hugging Face `transformers` loads (SPEC §7).

Our tensor names already follow HF Llama, so the weights are copied as they are; the work is the
config. Dense models become `LlamaForCausalLM`, or `Qwen3ForCausalLM` when they use QK-norm (the
stock architecture that has per-head q/k RMSNorm); YaRN maps to the "yarn" rope type both support.
MoE models carry their own modeling code (hf_moe/, loaded with `trust_remote_code=True`). A LoRA
checkpoint exports merged into its base, or with `--lora-format peft` as a peft adapter directory
whose base model is exported beside it, in `base/`. The directory is written atomically.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from minimind.checkpoint import (
    ADAPTER_WEIGHTS,
    ALLOW_NONFINITE_HINT,
    TOKENIZER_FILES,
    CheckpointError,
    atomic_dir,
    check_finite,
    checkpoint_inputs,
    copy_tokenizer,
    is_lora_checkpoint,
    load_adapter_weights,
    load_checkpoint,
    read_adapter_config,
    read_json,
    resolve_checkpoint,
    state_dict_for_save,
    tokenizer_dir,
)
from minimind.config import ModelConfig
from minimind.faults import writing
from minimind.lora import strip_lora
from minimind.outputs import OutputError, carry_over, check_output

HF_MOE_DIR = Path(__file__).parent / "hf_moe"
MOE_FILES = ("configuration_minimind_moe.py", "modeling_minimind_moe.py")
PEFT_BASE_DIR = "base"
# every name an export writes in --out (merged, MoE or peft): what --force may replace; nothing else goes
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", *MOE_FILES, *TOKENIZER_FILES,
                "adapter_config.json", "adapter_model.safetensors", PEFT_BASE_DIR)


class ExportError(Exception):
    """An export that cannot be done; the message names the path or the config field."""


def run(args) -> int:
    from minimind.interop.gguf_export import OLLAMA_GGUF, GGUFExportError, export_gguf, export_ollama, summary

    fmt = getattr(args, "format", "hf")
    try:
        if fmt == "hf":
            out = export_hf(args.ckpt, args.out, lora_format=args.lora_format, force=args.force,
                            allow_nonfinite=args.allow_nonfinite)
        else:
            if args.lora_format != "merged":
                raise ExportError(f"--lora-format {args.lora_format}: --format {fmt} exports LoRA runs merged")
            export = export_gguf if fmt == "gguf" else export_ollama
            out = export(args.ckpt, args.out, outtype=args.outtype, force=args.force,
                         allow_nonfinite=args.allow_nonfinite)
            out = summary(out if fmt == "gguf" else out / OLLAMA_GGUF, args.outtype) + (
                "" if fmt == "gguf" else f"; Modelfile beside it: ollama create NAME -f {out / 'Modelfile'}")
    except (CheckpointError, ExportError, GGUFExportError, OutputError) as e:
        print(f"minimind export: {e}", file=sys.stderr)
        return 2
    print(f"minimind export: wrote {out}")
    return 0


def export_hf(ckpt, out, lora_format: str = "merged", force: bool = False, allow_nonfinite: bool = False) -> Path:
    """Export checkpoint (or run dir) `ckpt` to `out`; returns `out`. With `force` an existing export is
    replaced; files in `out` that export does not write stay. Non-finite weights are refused unless
    `allow_nonfinite` (a NaN model exported is a NaN model served elsewhere)."""
    out = Path(out)
    src = resolve_checkpoint(ckpt)
    check_output(out, flag="--out", inputs=checkpoint_inputs(ckpt, "--ckpt"), force=force, directory=True)
    if lora_format not in ("merged", "peft"):
        raise ExportError(f"--lora-format {lora_format!r}: expected merged or peft")
    if lora_format == "peft":
        if not is_lora_checkpoint(src):
            raise ExportError(f"--lora-format peft: {src} is not a LoRA checkpoint (no adapter_config.json)")
        return _export_peft(src, out, allow_nonfinite=allow_nonfinite)
    model, _ = load_checkpoint(src, kernels="torch", allow_nonfinite=allow_nonfinite)
    strip_lora(model)  # merged adapters become plain Linears: stock names only
    tokenizer = tokenizer_dir(src)

    def fill(tmp: Path):
        write_hf_model(model, tokenizer, tmp)
        carry_over(out, tmp, owned=EXPORT_FILES)

    with writing("the export", out, need=lambda: _export_bytes(state_dict_for_save(model).values(), tokenizer)):
        return atomic_dir(out, fill)


def _export_bytes(tensors, tokenizer: Path | None) -> int:
    """About what an export takes (the full disk's message): its tensors in float32, its tokenizer files."""
    tok = sum(f.stat().st_size for f in tokenizer.iterdir() if f.name in TOKENIZER_FILES) if tokenizer else 0
    return sum(4 * t.numel() for t in tensors) + tok


def write_hf_model(model: torch.nn.Module, tokenizer: Path | None, out: Path) -> None:
    """config.json, model.safetensors, generation_config.json and tokenizer files into `out`."""
    config: ModelConfig = model.config
    special = special_token_ids(tokenizer) if tokenizer is not None else {}
    hf = hf_config(config, special)
    _write_json(out / "config.json", hf)
    _write_json(out / "generation_config.json", {k: v for k, v in special.items() if v is not None})
    sd = {k: v.float().contiguous() for k, v in state_dict_for_save(model).items()}
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    if config.use_moe:
        for name in MOE_FILES:
            shutil.copyfile(HF_MOE_DIR / name, out / name)
    if tokenizer is None:
        print("minimind export: warning: the checkpoint has no tokenizer files; none exported", file=sys.stderr)
        return
    copy_tokenizer(tokenizer, out)
    if not _has_chat_template(out):
        print(f"minimind export: warning: {tokenizer} has no chat template", file=sys.stderr)


def hf_config(config: ModelConfig, special: dict) -> dict:
    """Our ModelConfig as a transformers config.json dict (Llama, Qwen3, or our MoE remote code)."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {**_yarn_parameters(config.rope_scaling), "rope_theta": config.rope_theta}
    hf = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": config.dropout,
        "initializer_range": config.initializer_range,
        "use_cache": True,
        # transformers >= 5 reads rope_parameters; older readers (4.x, vLLM, llama.cpp) rope_theta
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "dtype": "float32",
        **special,
    }
    if config.rope_scaling is not None:
        hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if config.use_moe:
        return {**_moe_fields(config), **hf}
    if config.qk_norm:
        layers = config.num_hidden_layers
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **hf, "use_sliding_window": False,
                "sliding_window": None, "max_window_layers": layers, "layer_types": ["full_attention"] * layers}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **hf, "pretraining_tp": 1}


def _yarn_parameters(scaling: dict) -> dict:
    # our defaults (model._yarn) made explicit, so every reader computes the same frequencies
    known = ("rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
             "attention_factor", "truncate")
    unknown = sorted(set(scaling) - set(known))
    if unknown:
        raise ExportError(f"config.json: rope_scaling field(s) {', '.join(unknown)} have no transformers equivalent")
    out = {"rope_type": "yarn", "factor": float(scaling["factor"]),
           "original_max_position_embeddings": scaling.get("original_max_position_embeddings", 2048),
           "beta_fast": scaling.get("beta_fast", 32.0), "beta_slow": scaling.get("beta_slow", 1.0)}
    if scaling.get("attention_factor") is not None:
        out["attention_factor"] = scaling["attention_factor"]
    if "truncate" in scaling:
        out["truncate"] = scaling["truncate"]
    return out


def _moe_fields(config: ModelConfig) -> dict:
    stem = [name.removesuffix(".py") for name in MOE_FILES]
    return {
        "architectures": ["MiniMindMoEForCausalLM"],
        "model_type": "minimind_moe",
        "auto_map": {
            "AutoConfig": f"{stem[0]}.MiniMindMoEConfig",
            "AutoModelForCausalLM": f"{stem[1]}.MiniMindMoEForCausalLM",
        },
        "n_routed_experts": config.n_routed_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "n_shared_experts": config.n_shared_experts,
        "norm_topk_prob": config.norm_topk_prob,
        "scoring_func": config.scoring_func,
        "aux_loss_alpha": config.aux_loss_alpha,
        "seq_aux": config.seq_aux,
        "qk_norm": config.qk_norm,
    }


def special_token_ids(tokenizer: Path) -> dict:
    """bos/eos/pad token ids named by tokenizer_config.json, looked up in tokenizer.json."""
    config_file = tokenizer / "tokenizer_config.json"
    tok_config = _read_json(config_file) if config_file.is_file() else {}
    vocab = _token_ids(tokenizer / "tokenizer.json")
    out = {}
    for role in ("bos", "eos", "pad"):
        token = tok_config.get(f"{role}_token")
        if isinstance(token, dict):
            token = token.get("content")
        out[f"{role}_token_id"] = vocab.get(token) if token is not None else None
    return out


def _token_ids(file: Path) -> dict[str, int]:
    data = _read_json(file)
    ids = dict(data.get("model", {}).get("vocab", {}))
    ids.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return ids


def _has_chat_template(tokenizer: Path) -> bool:
    if (tokenizer / "chat_template.jinja").is_file():
        return True
    file = tokenizer / "tokenizer_config.json"
    return file.is_file() and bool(_read_json(file).get("chat_template"))


def _export_peft(lora_ckpt: Path, out: Path, allow_nonfinite: bool = False) -> Path:
    """out/: peft adapter (adapter_config.json, adapter_model.safetensors, tokenizer); out/base/: its base."""
    cfg = read_adapter_config(lora_ckpt)
    base_ckpt = resolve_checkpoint(cfg["base_checkpoint"])
    base, _ = load_checkpoint(base_ckpt, kernels="torch", allow_nonfinite=allow_nonfinite)
    tokenizer = tokenizer_dir(lora_ckpt)
    adapter = load_adapter_weights(lora_ckpt)
    if not allow_nonfinite:
        check_finite(adapter, lora_ckpt / ADAPTER_WEIGHTS, hint=ALLOW_NONFINITE_HINT)

    def fill(tmp: Path):
        (tmp / PEFT_BASE_DIR).mkdir()
        write_hf_model(base, tokenizer, tmp / PEFT_BASE_DIR)
        # peft names: base_model.model.<module>.lora_A.weight; same (r, in) / (out, r) layout as ours
        tensors = {f"base_model.model.{k}.weight": v.float().contiguous() for k, v in adapter.items()}
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        _write_json(tmp / "adapter_config.json", _peft_config(cfg, (out / PEFT_BASE_DIR).resolve()))
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)
        carry_over(out, tmp, owned=EXPORT_FILES)

    tensors = [*state_dict_for_save(base).values(), *adapter.values()]
    with writing("the export", out, need=lambda: _export_bytes(tensors, tokenizer)):
        return atomic_dir(out, fill)


def _peft_config(cfg: dict, base_dir: Path) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": cfg["rank"],
        "lora_alpha": cfg["alpha"],
        "lora_dropout": cfg.get("dropout", 0.0),
        "target_modules": sorted(cfg["targets"]),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _read_json(file: Path) -> dict:
    return read_json(file, ExportError)


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
