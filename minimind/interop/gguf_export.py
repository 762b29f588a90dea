"""`minimind export --format gguf`: a checkpoint as one .gguf file for llama.cpp (and what runs on it:
Ollama, LM Studio, phone apps), written with `gguf`, llama.cpp's own Python writer, so no llama.cpp
checkout is needed.

The file holds the weights (f32, f16, bf16 or q8_0; norms stay f32), the config under llama.cpp's
keys, the byte-level BPE tokenizer (tokens, types, merges, special ids, the pre-tokenizer's name) and
the chat template. Dense models only:
- without QK-norm they are llama.cpp's `llama`. Its RoPE rotates adjacent pairs (2i, 2i+1) where ours,
  like Hugging Face's Llama, rotates (i, i + Dh/2), so q_proj's and k_proj's rows are reordered per head
  to match (what llama.cpp's own converter does for HF Llama);
- with QK-norm they are `qwen3`, whose RoPE already pairs (i, i + Dh/2): no reordering.
MoE models are refused by name: llama.cpp's MoE architectures gate their shared expert (qwen2moe) or
have none (llama, mixtral), and ours has an ungated one.

llama.cpp does not run a tokenizer's pre-tokenizer; it knows a fixed list of them by name. Ours map to:
MiniMind2's and ours by default (byte-level with GPT-2's split regex) -> "gpt-2"; `--split-digits`
(each digit alone, then GPT-2's regex) -> "smollm", which splits the same way. `--split-cjk` has no
counterpart, and is refused by name rather than written as a file that tokenizes differently.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minimind.checkpoint import (
    CheckpointError,
    atomic_dir,
    checkpoint_inputs,
    load_checkpoint,
    resolve_checkpoint,
    tokenizer_dir,
)
from minimind.config import ModelConfig
from minimind.faults import writing
from minimind.lora import strip_lora
from minimind.outputs import check_output

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
MODELFILE = "Modelfile"
OLLAMA_GGUF = "model.gguf"


class GGUFExportError(Exception):
    """An export llama.cpp could not run as our model; the message names the field and what to do."""


def export_gguf(ckpt, out, outtype: str = "f16", force: bool = False, allow_nonfinite: bool = False) -> Path:
    """`minimind export --format gguf`: checkpoint (or run dir) `ckpt` as the file `out` (.gguf). A LoRA
    checkpoint is merged into its base first."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise GGUFExportError(f"--out {out}: --format gguf writes one file; name it NAME.gguf")
    model, tokenizer = _load(ckpt, out, force, allow_nonfinite, directory=False)
    with writing("the export", out, need=lambda: _gguf_bytes(model)):
        return write_gguf(model, tokenizer, out, outtype, name=_name(ckpt))


def export_ollama(ckpt, out, outtype: str = "f16", force: bool = False, allow_nonfinite: bool = False) -> Path:
    """`minimind export --format ollama`: a directory `out` with model.gguf and a Modelfile (the chat
    template in Ollama's template language, the stop tokens, the sampling defaults of `minimind chat`);
    `ollama create NAME -f OUT/Modelfile`, then `ollama run NAME`."""
    out = Path(out)
    model, tokenizer = _load(ckpt, out, force, allow_nonfinite, directory=True)

    def fill(tmp: Path):
        write_gguf(model, tokenizer, tmp / OLLAMA_GGUF, outtype, name=_name(ckpt))
        (tmp / MODELFILE).write_text(modelfile(tokenizer), encoding="utf-8")

    with writing("the export", out, need=lambda: _gguf_bytes(model)):
        return atomic_dir(out, fill)


def _load(ckpt, out: Path, force: bool, allow_nonfinite: bool, directory: bool):
    src = resolve_checkpoint(ckpt)
    check_output(out, flag="--out", inputs=checkpoint_inputs(ckpt, "--ckpt"), force=force, directory=directory)
    tokenizer = tokenizer_dir(src)
    if tokenizer is None:
        raise CheckpointError(f"{src}: no tokenizer files; a GGUF file must carry its tokenizer")
    model, _ = load_checkpoint(src, kernels="torch", allow_nonfinite=allow_nonfinite)
    strip_lora(model)  # merged adapters become plain Linears: stock names only
    return model, tokenizer


def _name(ckpt) -> str:
    path = Path(ckpt).resolve()
    return path.parent.name if path.name.startswith("step-") else path.name


def _gguf_bytes(model) -> int:
    return sum(4 * p.numel() for p in model.parameters())


def modelfile(tokenizer: Path) -> str:
    """An Ollama Modelfile for our ChatML chat format: <|im_start|>ROLE\nTEXT<|im_end|>\n per message, a
    generation prompt for the assistant, and the template's default system prompt where it has one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    rendered = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                       add_generation_prompt=True)
    system = None
    head = "<|im_start|>system\n"
    if rendered.startswith(head):
        system = rendered[len(head):rendered.index("<|im_end|>")]
    lines = ["FROM ./" + OLLAMA_GGUF, 'TEMPLATE """{{- if .System }}<|im_start|>system',
             "{{ .System }}<|im_end|>", "{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}",
             "{{ .Content }}<|im_end|>", '{{ end }}<|im_start|>assistant', '"""']
    if system:
        lines.append(f"SYSTEM {json.dumps(system)}")
    lines += ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|endoftext|>"',
              "PARAMETER temperature 0.7", "PARAMETER top_p 0.9"]
    return "\n".join(lines) + "\n"


def write_gguf(model: torch.nn.Module, tokenizer: Path, out: Path, outtype: str = "f16",
               name: str = "minimind") -> Path:
    """`model`'s weights, config and the tokenizer in `tokenizer` as the GGUF file `out` (written to a
    temporary name beside it, then renamed). -> out."""
    import gguf

    config: ModelConfig = model.config
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    if config.use_moe:
        raise GGUFExportError("MoE models have no llama.cpp architecture: ours has an ungated shared expert, "
                              "llama.cpp's qwen2moe gates it and llama/mixtral have none. Use --format hf "
                              "(transformers, vLLM with trust_remote_code) instead")
    arch = "qwen3" if config.qk_norm else "llama"
    vocab = read_vocab(tokenizer, config.vocab_size)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _write_config(writer, config, outtype, name, len(vocab.tokens))
        _write_tokenizer(writer, vocab)
        for tensor_name, data, qtype in _tensors(model, arch, outtype, len(vocab.tokens)):
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=sys.stderr.isatty())  # a bar per tensor on a terminal
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def summary(out: Path, outtype: str) -> str:
    """What an export wrote, for its last line: the file, its size and type, and, where llama-cpp-python
    is installed, llama.cpp's own greedy speed on it (a quick check that it loads and runs)."""
    line = f"{out} ({out.stat().st_size / 1e6:.1f} MB, {outtype})"
    try:
        import llama_cpp
    except ImportError:
        return line + "; install llama-cpp-python to check it here"
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False)
    llm.eval(llm.tokenize(b"Hello", add_bos=False))
    began, n = time.perf_counter(), 16
    for _ in range(n):
        llm.eval([llm.sample(top_k=1, temp=0.0)])
    return line + f"; llama.cpp loads it and decodes {n / (time.perf_counter() - began):.0f} tokens/s here"


def _write_config(writer, config: ModelConfig, outtype: str, name: str, n_vocab: int) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    if config.rope_scaling is not None:  # YaRN (the only scaling ModelConfig takes)
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(config.rope_scaling["original_max_position_embeddings"]))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---- the tokenizer ----

class Vocab:
    """What llama.cpp's "gpt2" tokenizer model needs, read from tokenizer.json and tokenizer_config.json."""

    def __init__(self, tokens, types, merges, pre, special, chat_template):
        self.tokens, self.types, self.merges, self.pre = tokens, types, merges, pre
        self.special, self.chat_template = special, chat_template


def read_vocab(tokenizer: Path, vocab_size: int) -> Vocab:
    import gguf

    file = tokenizer / "tokenizer.json"
    data = json.loads(file.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{file}: model.type {model.get('type')!r}; only byte-level BPE exports to GGUF")
    ids = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    ids.update({content: t["id"] for content, t in added.items()})
    by_id = {i: token for token, i in ids.items()}
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"{file}: token id {max(by_id)} does not fit the model's vocab_size {vocab_size}")
    tokens, types = [], []
    # the model's rows past the tokenizer's last id (a vocab padded to a round size) are left out of the
    # file: our engine never samples them, and llama.cpp would
    for i in range(max(by_id) + 1):
        token = by_id.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            types.append(gguf.TokenType.CONTROL if added[token].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    config_file = tokenizer / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    special = {}
    for role in ("bos", "eos", "pad", "unk"):
        token = tok_config.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and token in ids:
            special[role] = ids[token]
    template = tok_config.get("chat_template")
    jinja = tokenizer / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return Vocab(tokens, types, merges, pre_tokenizer_name(file, data.get("pre_tokenizer")), special, template)


def pre_tokenizer_name(file: Path, pre: dict | None) -> str:
    """llama.cpp's name for the pre-tokenizer in tokenizer.json, or GGUFExportError naming what differs."""
    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    if pre is not None and byte_level(pre):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre is not None and pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
            and byte_level(parts[1])):
        return "smollm"  # each digit alone, then GPT-2's regex: SmolLM's, which llama.cpp knows
    described = json.dumps(pre)[:200]
    why = ("it isolates CJK ideographs (--split-cjk), which no llama.cpp pre-tokenizer does"
           if "Split" in described else "llama.cpp knows no pre-tokenizer that splits text this way")
    raise GGUFExportError(f"{file}: pre_tokenizer {described}: {why}, so llama.cpp would tokenize text differently "
                          "from this model. Export --format hf (transformers, vLLM), or train the tokenizer "
                          "without --split-cjk")


def _write_tokenizer(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "pad": writer.add_pad_token_id,
              "unk": writer.add_unk_token_id}
    for role, token_id in vocab.special.items():
        adders[role](token_id)
    writer.add_add_bos_token(False)  # our prompts carry no BOS (the chat template writes <|im_start|>)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# ---- the weights ----

LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(name: str) -> str:
    """Our (HF Llama) tensor name -> llama.cpp's."""
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")  # model.layers.{i}.{module...}.weight
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight" and ".".join(parts[3:-1]) in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:-1])]}.weight"
    raise GGUFExportError(f"tensor {name!r} has no llama.cpp name (a LoRA or MoE tensor left in the model?)")


def pairs_adjacent(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k projection rows reordered per head from rotate-half pairing (i, i + Dh/2) to adjacent pairs
    (2i, 2i+1), so llama.cpp's RoPE on them computes ours."""
    out, cols = w.shape
    return w.reshape(heads, 2, out // heads // 2, cols).transpose(1, 2).reshape(out, cols)


def _tensors(model: torch.nn.Module, arch: str, outtype: str, n_vocab: int):
    """(llama.cpp name, numpy data, GGML type) for every tensor; tied heads are written once, and the
    embedding and head keep their first `n_vocab` rows."""
    import gguf

    config: ModelConfig = model.config
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, w in state.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            w = w[:n_vocab]
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            w = pairs_adjacent(w, config.num_attention_heads)
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            w = pairs_adjacent(w, config.num_key_value_heads)
        data = w.numpy()
        if data.ndim == 1 or outtype == "f32":  # norms stay f32 (llama.cpp's converter does the same)
            yield gguf_name(name), data.astype(np.float32), gguf.GGMLQuantizationType.F32
        elif outtype == "f16":
            yield gguf_name(name), data.astype(np.float16), gguf.GGMLQuantizationType.F16
        else:
            qtype = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
            yield gguf_name(name), gguf.quants.quantize(data, qtype), qtype
