"""The `minimind` console script: one parser per subcommand (SPEC §2), handlers imported lazily.

A handler is `module:function`, called with the parsed arguments and returning an exit code. A
subcommand whose module does not exist yet says so and exits 1; usage errors exit 2 and name the flag.
"""

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

from minimind.choices import COMPILE_MODES, DEVICES, DTYPES, KERNELS, OPTIMIZERS, SCHEDULES
from minimind.recipes import DATA_KINDS, STAGE_NAMES, STAGES, TAG_WEIGHT

HANDLERS = {
    "synth": "minimind.data.synth:run",
    "tokenizer": "minimind.data.tokenizer:run",
    "prepare": "minimind.data.prepare:run",
    "train": "minimind.train:run",
    "info": "minimind.cli:run_info",
    "chat": "infer.chat:run",
    "serve": "infer.server:run",
    "eval choice": "minimind.eval.choice:run",
    "eval ppl": "minimind.eval.ppl:run",
    "eval lm-eval": "minimind.eval.lm_eval:run",
    "eval answers": "minimind.eval.answers:run",
    "report": "minimind.report:run",
    "export": "minimind.interop.export:run",
    "import": "minimind.interop.importer:run",
}


def existing_path(value: str) -> Path:
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {value}")
    return path


def _betas(value: str) -> tuple[float, float]:
    try:
        b1, b2 = (float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers B1,B2 (e.g. 0.9,0.95), got {value!r}") from None
    return b1, b2


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def seconds(value: str, allow_zero: bool = False) -> float:
    """A finite number of seconds, positive (or, with allow_zero, not negative)."""
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds {'>= 0' if allow_zero else '> 0'}, "
                                         f"got {value!r}")
    return x


def seconds_or_zero(value: str) -> float:
    return seconds(value, allow_zero=True)


def thread_count(value: str) -> int:
    """1..the cores this process may run on: more threads than cores make every OpenMP region wait for
    threads the scheduler parked (three batch requests on 2 cores: 180 s at 999 threads, 1.7 s at 1)."""
    n = positive_int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n > cores:
        raise argparse.ArgumentTypeError(f"{n} threads on {cores} usable cores: use 1 to {cores}")
    return n


def port(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1-65535), got {value!r}") from None
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1-65535), got {value!r}")
    return n


def device_name(value: str) -> str:
    """A torch device string (cpu, cuda, cuda:N) that this machine has: checked here, so that a wrong one
    is an error about --device, not about the checkpoint file that loading it onto the device met."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}")
    return value


def _allow_nonfinite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="use a checkpoint whose weights hold NaN or inf (refused otherwise)")


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Appends '(default: X)' to the help of every option, in this parser and its subparsers, that has
    a default worth showing (not None, False or suppressed)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
            continue
        if action.default in (None, False, [], argparse.SUPPRESS) or action.help == argparse.SUPPRESS:
            continue
        if action.help is None or "%(default)" not in action.help:
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"
    return parser


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of SPEC §5; None means 'the stage's default'."""
    p.add_argument("--stage", required=True, choices=STAGE_NAMES)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PRESET", help="start from a fresh preset (tiny, small, base, moe)")
    src.add_argument("--init", type=existing_path, metavar="CKPT", help="start from a checkpoint or run dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field (repeatable, type-checked)")
    p.add_argument("--data", type=existing_path, metavar="PATH", help="prepared data dir or raw .jsonl")
    p.add_argument("--val-data", type=existing_path, metavar="PATH")
    p.add_argument("--eval-every", type=positive_int, metavar="N")
    p.add_argument("--tokenizer", type=existing_path, metavar="DIR")
    p.add_argument("--out", type=Path, metavar="DIR", help="the run directory (default: runs/STAGE)")
    p.add_argument("--max-steps", type=positive_int, metavar="N")
    p.add_argument("--epochs", type=float, metavar="N", help="default: 1, unless --max-steps is given")
    p.add_argument("--max-time", type=float, metavar="SECONDS",
                   help="a wall-clock budget: the schedule is sized to it (the run ends there with the lr at "
                        "--min-lr, then evaluates and saves); the data repeats if the budget allows")
    p.add_argument("--max-tokens", type=positive_int, metavar="N", help="a budget in tokens, as --max-time")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="auto: wsd (warmup, stable, linear decay over the last --decay-frac) with a budget, "
                        "else cosine")
    p.add_argument("--decay-frac", type=float, metavar="F", help="wsd: the fraction of the run spent decaying")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--seq-len", type=positive_int)
    p.add_argument("--grad-accum", type=positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr", type=float, help="end of the cosine (default: --lr / 10)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--optim", choices=OPTIMIZERS,
                   help="muon: Muon on the blocks' matrices, AdamW on the rest, same --lr (experimental)")
    p.add_argument("--embed-lr-scale", type=float, metavar="X", help="the embeddings' (and tied head's) lr: --lr x X")
    p.add_argument("--dtype", choices=("auto", *DTYPES),
                   help="default auto: bfloat16 on CUDA where supported; on a CPU float32 or bfloat16 autocast, "
                        "whichever a timed forward and backward at the run's shape finds faster (bf16 by 10%%)")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile's mode with --compile; reduce-overhead adds CUDA graphs (static shapes: "
                        "pretrain windows always are)")
    p.add_argument("--kernels", choices=KERNELS)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-packing", action="store_true",
                   help="one sample (pretrain: document) per row padded to --seq-len, MiniMind's layout, instead of "
                        "packing")
    p.add_argument("--adam-betas", type=_betas, metavar="B1,B2", help="AdamW's betas ("
                        + ", ".join(f"{s.name} {s.adam_betas[0]:g},{s.adam_betas[1]:g}" for s in STAGES.values()) + ")")
    p.add_argument("--doc-mask", action=argparse.BooleanOptionalAction,
                   help="pretrain: each token attends only to its own document and positions restart after each "
                        "document's end token (packed chat rows always work this way)")
    p.add_argument("--save-every", type=positive_int, metavar="N")
    p.add_argument("--keep", type=positive_int, metavar="N")
    p.add_argument("--log-every", type=positive_int, metavar="N")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int)
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline unless a key is set)")
    p.add_argument("--deepspeed", type=existing_path, metavar="CONFIG.json")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    dpo = p.add_argument_group("dpo")
    dpo.add_argument("--ref", type=existing_path, metavar="CKPT")
    dpo.add_argument("--beta", type=float)
    distill = p.add_argument_group("distill")
    distill.add_argument("--teacher", type=existing_path, metavar="CKPT")
    distill.add_argument("--temperature", type=float)
    distill.add_argument("--alpha", type=float)
    lora = p.add_argument_group("lora")
    lora.add_argument("--lora-rank", type=positive_int)
    lora.add_argument("--lora-alpha", type=float)
    lora.add_argument("--lora-targets", metavar="NAMES", help="comma-separated module names")
    grpo = p.add_argument_group("grpo")
    grpo.add_argument("--group-size", type=positive_int)
    grpo.add_argument("--max-new-tokens", type=positive_int)
    grpo.add_argument("--sample-rounds", type=positive_int, metavar="N",
                      help="dynamic sampling (DAPO): a group whose rewards all equal is replaced by another prompt's, "
                           "for up to N rounds of sampling a step, prompts drawn by their recent success; 1: off")
    _defaults_from_trainconfig(p)


def _defaults_from_trainconfig(p: argparse.ArgumentParser) -> None:
    """Defaults live in TrainConfig; a flag may not carry another (a knob the stage decides shows as
    such in --help)."""
    from minimind.trainconfig import FIELDS, STAGE_FIELDS, default

    for action in p._actions:
        if action.dest not in FIELDS:
            continue
        if action.default not in (None, False, []) and action.default != default(action.dest):
            raise AssertionError(f"{action.option_strings[0]}: default {action.default!r} differs from TrainConfig's")
        if action.default is None:
            action.default = default(action.dest)
        if action.dest in STAGE_FIELDS and action.help != argparse.SUPPRESS:
            action.help = f"{action.help} (default: per stage)" if action.help else "default: per stage"


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=positive_int, default=512)
    p.add_argument("--seed", type=int)


def _engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--max-len", type=positive_int, metavar="N", help="KV-cache length (default min(context, 2048))")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (kept only if it beats eager on a timed warm-up)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="weights and KV cache; auto: the fastest decode on this device, timed at start")
    _allow_nonfinite(p)


def _eval_device(p: argparse.ArgumentParser) -> None:
    def device(value: str) -> str:  # checked as serve's is: `--device cuda` on a CPU machine is a usage error
        return value if value == "auto" else device_name(value)

    p.add_argument("--device", type=device, default="auto", metavar="DEVICE",
                   help="auto (cuda when this machine has it, else cpu), cpu, cuda, cuda:N")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=positive_int, default=16)
    _eval_device(p)
    p.add_argument("--dtype", choices=DTYPES, help="default: as saved (float32)")
    p.add_argument("--report", type=Path, metavar="FILE.json", help="also write the JSON report here")
    p.add_argument("--force", action="store_true", help="replace an existing --report file (never an input)")
    _allow_nonfinite(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minimind", description="Train, serve and evaluate small language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_data_parsers, _train_parsers, _serve_parsers, _eval_parsers, _report_parser, _interop_parsers):
        add(sub)
    return show_defaults(parser)


def _data_parsers(sub) -> None:
    """synth, tokenizer, prepare."""
    p = sub.add_parser("synth", help="write the built-in synthetic corpus")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its files")

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    p.add_argument("--input", type=existing_path, nargs="+", required=True, metavar="FILE")
    p.add_argument("--vocab-size", type=positive_int, default=6400)
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--force", action="store_true", help="replace an existing tokenizer in --out")
    p.add_argument("--split-digits", action="store_true", help="every digit its own token (numbers compose)")
    p.add_argument("--split-cjk", action="store_true", help="every CJK ideograph its own token")

    p = sub.add_parser("prepare", help="tokenize jsonl into memory-mapped training data")
    p.add_argument("--stage", required=True, choices=DATA_KINDS)
    p.add_argument("--input", type=existing_path, required=True, metavar="FILE.jsonl")
    p.add_argument("--tokenizer", type=existing_path, required=True, metavar="DIR")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--max-seq-len", type=positive_int, default=512)
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--skip-bad", action="store_true", help="skip malformed lines and report how many")
    p.add_argument("--force", action="store_true",
                   help="replace prepared data already in --out (files prepare does not write stay)")
    p.add_argument("--tag-weight", type=float, default=TAG_WEIGHT, help="loss weight of <think>/<answer> tags (reason)")
    p.add_argument("--doc-format", choices=("minimind", "eos"), default="minimind",
                   help="pretrain: a document's tokens: 'minimind' = <|im_start|> text <|im_end|> (MiniMind2's "
                        "layout), 'eos' = text <|endoftext|>")


def _train_parsers(sub) -> None:
    """train, info."""
    p = sub.add_parser("train", help="train a model (same as train.py)")
    add_train_arguments(p)

    p = sub.add_parser("info", help="print a model's config and parameter counts as JSON")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", metavar="PRESET")
    g.add_argument("--ckpt", type=existing_path, metavar="CKPT")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")


def _serve_parsers(sub) -> None:
    """chat, serve."""
    p = sub.add_parser("chat", help="interactive terminal chat")
    p.add_argument("--ckpt", type=existing_path, required=True, metavar="CKPT")
    p.add_argument("--lora", type=existing_path, metavar="DIR")
    _sampling_arguments(p)
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    _engine_arguments(p)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("--ckpt", type=existing_path, required=True, metavar="CKPT")
    p.add_argument("--lora", type=existing_path, metavar="DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=port, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", metavar="KEY")
    p.add_argument("--model-name", metavar="ID")
    p.add_argument("--max-batch", type=positive_int, default=32)
    p.add_argument("--max-queue", type=positive_int, default=256)
    p.add_argument("--max-request-rows", type=positive_int, metavar="N",
                   help="the most batch rows one request's sequences (prompts x n) hold at once; the rest wait "
                        "while other requests join (default: half of --max-batch)")
    p.add_argument("--header-timeout", type=seconds, default=10.0, metavar="SECONDS",
                   help="close a connection that has not sent a whole request head in this time")
    p.add_argument("--body-timeout", type=seconds, default=60.0, metavar="SECONDS",
                   help="answer 408 and close when a request body has not arrived this long after its head")
    p.add_argument("--max-connections", type=positive_int, metavar="N",
                   help="open connections at most; at the cap a new one closes the oldest still sending a request, "
                        "or gets 503 (default: the open-file limit less 128)")
    p.add_argument("--grace", type=seconds_or_zero, default=10.0, metavar="SECONDS",
                   help="on SIGINT/SIGTERM, let running requests finish this long; then end them (finish_reason "
                        "length)")
    p.add_argument("--threads", type=thread_count, metavar="N",
                   help="torch threads of the engine thread (default: on a CPU of up to 8 cores, one fewer "
                        "than its cores: the event loop keeps one)")
    _engine_arguments(p)


def _eval_parsers(sub) -> None:
    """eval choice, ppl, lm-eval, answers."""
    p = sub.add_parser("eval", help="evaluate a model")
    ev = p.add_subparsers(dest="eval_command", required=True, metavar="KIND")
    q = ev.add_parser("choice", help="multiple-choice accuracy (C-Eval CSV)")
    q.add_argument("--ckpt", type=existing_path, required=True, metavar="CKPT")
    q.add_argument("--data", type=existing_path, required=True, metavar="CSV_OR_DIR")
    q.add_argument("--shots", type=int, default=0, metavar="K", help="worked examples before each question")
    q.add_argument("--dev", type=existing_path, metavar="CSV_OR_DIR",
                   help="where the shots come from, by subject (default: the other questions of the file)")
    _eval_arguments(q)
    q = ev.add_parser("ppl", help="perplexity and bits per byte")
    q.add_argument("--ckpt", type=existing_path, required=True, metavar="CKPT")
    q.add_argument("--data", type=existing_path, required=True, metavar="FILE")
    q.add_argument("--seq-len", type=positive_int, default=512, metavar="N", help="targets per window")
    _eval_arguments(q)
    q = ev.add_parser("lm-eval", help="lm-evaluation-harness tasks")
    q.add_argument("--ckpt", type=existing_path, required=True, metavar="CKPT")
    q.add_argument("--tasks", required=True, metavar="T", help="comma-separated task names")
    q.add_argument("--include-path", type=existing_path, metavar="DIR", help="directory of extra task yamls")
    q.add_argument("--num-fewshot", type=int, metavar="K")
    q.add_argument("--limit", type=float, metavar="N", help="examples per task (a fraction if < 1)")
    q.add_argument("--max-len", type=positive_int, metavar="N", help="context length (default: the model's)")
    q.add_argument("--bootstrap-iters", type=int, default=100000, metavar="N",
                   help="bootstrap resamples for standard errors (lm-eval's default; 0 skips them)")
    q.add_argument("--apply-chat-template", action="store_true",
                   help="render prompts (and few-shot turns) with the tokenizer's chat template")
    _eval_arguments(q)
    q = ev.add_parser("answers", help="exact-match accuracy of greedy replies, per task family (rlaif jsonl)")
    q.add_argument("--ckpt", type=existing_path, required=True, metavar="CKPT")
    q.add_argument("--data", type=existing_path, required=True, metavar="FILE.jsonl",
                   help="a user turn and its 'answer' per line, optional 'family' (minimind.eval.answers)")
    q.add_argument("--max-new-tokens", type=positive_int, default=64)
    q.add_argument("--samples", type=int, default=3, metavar="K", help="example replies shown per family")
    _eval_arguments(q)


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="a report card of runs, side by side (report.md, report.html, pictures)")
    p.add_argument("runs", type=existing_path, nargs="+", metavar="RUN", help="train.py --out directories")
    p.add_argument("--eval", type=existing_path, nargs="+", action="extend", metavar="FILE",
                   help="held-out text (.txt, or jsonl of {text}), held-out prompts (rlaif jsonl with answers) or "
                        "multiple-choice questions (C-Eval CSV or a directory of them); default: each run's "
                        "--val-data, and the held-out text and prompts of the synthetic corpus it trained on")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the report goes (never a run)")
    p.add_argument("--price-per-hour", type=float, default=2.0, metavar="USD",
                   help="what an hour of the machine costs, for the cost row (2.0: about an hour of one rented H100)")
    _eval_device(p)
    p.add_argument("--force", action="store_true", help="replace an earlier report in --out")


def _interop_parsers(sub) -> None:
    """export, import."""
    p = sub.add_parser("export", help="export to a stock transformers directory, a GGUF file or an Ollama directory")
    p.add_argument("--ckpt", type=existing_path, required=True, metavar="CKPT")
    p.add_argument("--out", type=Path, required=True, metavar="PATH",
                   help="a directory (hf, ollama) or a NAME.gguf file (gguf)")
    p.add_argument("--format", choices=("hf", "gguf", "ollama"), default="hf",
                   help="hf: transformers (and vLLM); gguf: one file for llama.cpp; ollama: the GGUF and a Modelfile")
    p.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0"), default="f16",
                   help="the weights' type in a GGUF file (norms stay f32)")
    p.add_argument("--lora-format", choices=("merged", "peft"), default="merged")
    p.add_argument("--force", action="store_true")
    _allow_nonfinite(p)

    p = sub.add_parser("import", help="import a MiniMind .pth or a Hugging Face directory")
    p.add_argument("--from", dest="source", choices=("minimind-pth", "hf"), required=True)
    p.add_argument("path", type=existing_path, metavar="FILE_OR_DIR")
    p.add_argument("--config", metavar="PRESET", help="the .pth model's preset (small, base, moe); minimind-pth only")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of --config's preset (repeatable, type-checked)")
    p.add_argument("--tokenizer", type=existing_path, metavar="DIR",
                   help="tokenizer files to put in the checkpoint (default: the hf directory's own)")
    p.add_argument("--out", type=Path, required=True, metavar="CKPT")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def _handler(args):
    key = args.command if args.command != "eval" else f"eval {args.eval_command}"
    module_name, func = HANDLERS[key].split(":")
    if importlib.util.find_spec(module_name.rsplit(".", 1)[0]) is None or importlib.util.find_spec(module_name) is None:
        return key, None
    return key, getattr(importlib.import_module(module_name), func)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    key = args.command if args.command != "eval" else f"eval {args.eval_command}"
    return _ended(_guarded(f"minimind {key}", args), program=argv is None)


def _ended(rc: int, program: bool) -> int:
    """A program stopped by a signal (exit 128 + signal: its checkpoint saved or its partial output
    removed by now) leaves at once: the interpreter's teardown of torch and friends takes seconds on a
    busy CPU, and a second Ctrl-C means now. Called in-process (argv given), it returns as usual."""
    if program and rc > 128:
        from minimind.faults import exit_now

        exit_now(rc)
    return rc


def _guarded(prog: str, args) -> int:
    """Runs the handler (imported here: torch's import takes seconds) so that a full disk or Ctrl-C /
    SIGTERM at any moment ends it with one line on stderr, not a traceback: exit 1 for a full disk,
    128 + the signal for a signal (the `finally` blocks that remove partial output have run)."""
    from minimind.faults import DiskFull, Interrupted, interrupted_exit, stop_signals

    try:
        with stop_signals():
            _, handler = _handler(args)
            if handler is None:
                print(f"{prog}: not implemented yet", file=sys.stderr)
                return 1
            return handler(args) or 0
    except DiskFull as e:
        print(f"{prog}: error: {e}. Free some space and run it again.", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        return interrupted_exit(prog, e)


def train_main(argv=None) -> int:
    """Entry of train.py (what torchrun and deepspeed launch)."""
    parser = argparse.ArgumentParser(prog="train.py", description="Train a minimind model (SPEC §5).")
    add_train_arguments(parser)
    args = show_defaults(parser).parse_args(argv)
    args.command = "train"
    return _ended(_guarded("train.py", args), program=argv is None)


def run_info(args) -> int:
    import torch

    from minimind.checkpoint import CheckpointError, load_config
    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM

    try:
        if args.ckpt is not None:
            from minimind.checkpoint import resolve_checkpoint

            config = load_config(resolve_checkpoint(args.ckpt))
        else:
            config = ModelConfig.from_preset(args.model, args.overrides)
    except (CheckpointError, ValueError) as e:
        print(f"minimind info: {e}", file=sys.stderr)
        return 2
    with torch.device("meta"):  # shapes only: no memory, no init
        model = MiniMindForCausalLM(config)
    out = {
        "config": config.to_dict(),
        "params_total": model.num_params(),
        "params_active": model.num_params(active=True),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
