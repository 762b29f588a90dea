"""`minimind eval answers`: exact-match accuracy of greedy replies, per task family.

`--data` is a jsonl file in the rlaif layout (SPEC §3): a conversation ending with a user turn and its
expected `"answer"` (or ending with a reference assistant turn, used as the answer), plus an optional
`"family"` to group by (`minimind.data.synth.held_out_prompts` writes such lines; default "all").

Exact match, after `normalize` (surrounding whitespace and trailing . 。 ! ！ removed, inner runs of
whitespace made one space; case kept):
- an answer that is an integer ("12") matches a reply whose last integer is that number: "12",
  "7 + 5 = 12." and "等于12。" do; "12 + 1 = 13" does not (the rule of GRPO's reward);
- any other answer ("7 + 5 = 12.", "Kamiren Lin lives in Riverton.") matches only a reply equal to it.
Replies are greedy (temperature 0) from `infer.engine.Engine`, batched, up to `--max-new-tokens` each.
"""

import json
import re
import sys
import unicodedata
from collections import defaultdict

from minimind.checkpoint import CheckpointError
from minimind.data.layouts import ROLES
from minimind.data.tokenizer import TokenizerError
from minimind.eval import EvalDataError, check_data_file, check_report, check_report_path, pick_device, write_report
from minimind.outputs import OutputError

_INTEGER = re.compile(r"-?\d+")
_TRAILING = ".。!！"


def normalize(text: str) -> str:
    return " ".join(text.split()).rstrip(_TRAILING).strip()


def is_match(reply: str, answer: str) -> bool:
    gold = normalize(answer)
    if _INTEGER.fullmatch(gold):
        numbers = _INTEGER.findall(reply)
        return bool(numbers) and int(numbers[-1]) == int(gold)
    return normalize(reply) == gold


def read_questions(file) -> list[dict]:
    """-> [{"messages", "answer", "family"}] from an rlaif-layout jsonl; errors name FILE:LINE."""
    file = check_data_file(file)
    rows = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{file}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise EvalDataError(f"{file}: unreadable ({e.strerror or e})") from None
    for line, text in enumerate(lines, 1):
        if text.strip():
            rows.append(_question(text, f"{file}:{line}"))
    if not rows:
        raise EvalDataError(f"{file}: no questions (empty file)")
    return rows


def _question(text: str, where: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{where}: not valid JSON (column {e.colno}: {e.msg})") from None
    conv = obj.get("conversations") if isinstance(obj, dict) else None
    if not isinstance(conv, list) or not conv or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in conv):
        raise EvalDataError(f"{where}: expected an object with 'conversations', a list of {{role, content}} turns")
    for i, m in enumerate(conv):
        if m.get("role") not in ROLES:
            raise EvalDataError(f"{where}: conversations[{i}].role: {m.get('role')!r} is not one of {', '.join(ROLES)}")
    answer = obj.get("answer")
    if answer is None and conv[-1].get("role") == "assistant":
        conv, answer = conv[:-1], conv[-1]["content"]
    if not isinstance(answer, str) or not answer.strip():
        raise EvalDataError(f"{where}: no expected answer (an 'answer' string or a trailing assistant turn)")
    if not conv or conv[-1].get("role") != "user":
        raise EvalDataError(f"{where}: the conversation must end with a user turn (the question)")
    family = obj.get("family", "all")
    if not isinstance(family, str):
        raise EvalDataError(f"{where}: 'family' must be a string")
    return {"messages": conv, "answer": answer, "family": family, "where": where}


def check_lengths(prompts: list[list[int]], questions: list[dict], *, max_new_tokens: int, context: int) -> None:
    """EvalDataError naming --max-new-tokens, or the FILE:LINE of the first prompt, when a reply would not fit
    the context: the whole run is refused up front rather than scoring the questions that fit (an accuracy
    over a silently smaller set would not compare with others)."""
    if max_new_tokens >= context:
        raise EvalDataError(f"--max-new-tokens {max_new_tokens}: the model's context is {context} tokens, prompt "
                            "included; ask for fewer")
    for q, ids in zip(questions, prompts):
        if len(ids) + max_new_tokens > context:
            raise EvalDataError(f"{q['where']}: the prompt has {len(ids)} tokens; with --max-new-tokens "
                                f"{max_new_tokens} it does not fit the model's context of {context} tokens")


def evaluate(engine, questions: list[dict], max_new_tokens: int, samples: int = 3,
             progress: str | None = "eval answers") -> dict:
    """Greedy replies to every question, scored: overall and per family accuracy, `samples` examples each."""
    from infer.engine import SamplingParams

    prompts = [engine.encode_chat(q["messages"]) for q in questions]
    check_lengths(prompts, questions, max_new_tokens=max_new_tokens, context=engine.max_len)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0), progress=progress)
    families = defaultdict(lambda: {"questions": 0, "correct": 0, "samples": []})
    for q, out in zip(questions, outs):
        got = out.text.strip()
        fam = families[q["family"]]
        fam["questions"] += 1
        fam["correct"] += is_match(got, q["answer"])
        if len(fam["samples"]) < samples:
            fam["samples"].append({"prompt": q["messages"][-1]["content"], "expected": q["answer"], "got": got,
                                   "match": is_match(got, q["answer"])})
    for fam in families.values():
        fam["accuracy"] = fam["correct"] / fam["questions"]
    correct = sum(f["correct"] for f in families.values())
    return {"questions": len(questions), "correct": correct, "accuracy": correct / len(questions),
            "families": dict(sorted(families.items()))}


def format_table(report: dict) -> str:
    """The report as text: a line per family (accuracy, n) followed by its samples."""
    lines = []
    for name, fam in report["families"].items():
        lines.append(f"{name:<18} {fam['accuracy']:6.1%}  ({fam['correct']}/{fam['questions']})")
        for s in fam["samples"]:
            mark = "ok" if s["match"] else "no"
            lines.append(f"    {mark}  {_cell(s['prompt'], 44)}  expected: {_cell(s['expected'], 32)}  "
                         f"got: {_cell(s['got'], 40).rstrip()}")
    return "\n".join(lines)


def _cell(text: str, width: int) -> str:
    """`text` on one line, cut or padded to `width` terminal columns (CJK characters take two)."""
    out, used = "", 0
    for ch in " ".join(text.split()):
        w = 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        if used + w > width - 1:
            return out + "…" + " " * (width - used - 1)
        out, used = out + ch, used + w
    return out + " " * (width - used)


def run(args) -> int:
    from infer.engine import Engine

    try:
        check_report_path(args.report)
        check_report(args, [("--data", args.data)])
        questions = read_questions(args.data)
        engine = Engine.from_checkpoint(args.ckpt, device=pick_device(args.device), dtype=args.dtype,
                                        max_batch=args.batch_size, allow_nonfinite=args.allow_nonfinite)
        report = evaluate(engine, questions, max_new_tokens=args.max_new_tokens, samples=args.samples)
    except (EvalDataError, CheckpointError, TokenizerError, OutputError, OSError) as e:
        print(f"minimind eval answers: {e}", file=sys.stderr)
        return 2
    print(format_table(report), file=sys.stderr)
    report.update(ckpt=str(args.ckpt), data=str(args.data))
    write_report(report, args.report)
    return 0
