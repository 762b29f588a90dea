"""`minimind eval choice`: multiple-choice accuracy on C-Eval / CMMLU CSV files.

A file is `id,question,A,B,C,D,answer` (C-Eval; CMMLU's `,Question,A,B,C,D,Answer` header reads
the same: names are matched case-insensitively and an empty first name is the id). `--data` is one
file or a directory of subject files, one subject per file (`_dev`/`_val`/`_test` suffixes dropped).
The prompt is C-Eval's: a header naming the subject, K worked examples (`--shots`, taken from the
`--dev` file of the same subject, else from the other questions of the file), then the question
ending in "答案：". The model's choice is the argmax of its next-token logits over the tokens A, B,
C, D, scored in padded batches. Reports per-subject and overall accuracy as JSON.
"""

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from minimind.checkpoint import CheckpointError
from minimind.eval import EvalDataError, check_report, check_report_path, load_for_eval, write_report
from minimind.outputs import OutputError

LETTERS = ("A", "B", "C", "D")
COLUMNS = ("id", "question", *LETTERS, "answer")
SPLIT_SUFFIXES = ("_dev", "_val", "_test")


@dataclass
class Question:
    id: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # one of LETTERS
    where: str  # FILE:LINE, for messages


def run(args) -> int:
    if args.shots < 0:
        print(f"minimind eval choice: --shots: expected an integer >= 0, got {args.shots}", file=sys.stderr)
        return 2
    try:
        check_report_path(args.report)
        check_report(args, [("--data", args.data), ("--dev", args.dev)])
        subjects = read_subjects(args.data)
        dev = read_subjects(args.dev) if args.dev is not None else {}
        model, tokenizer, _ = load_for_eval(args.ckpt, device=args.device, dtype=args.dtype,
                                            allow_nonfinite=args.allow_nonfinite)
        report = evaluate(model, tokenizer, subjects, dev=dev, shots=args.shots, batch_size=args.batch_size)
    except (EvalDataError, CheckpointError, OutputError) as e:
        print(f"minimind eval choice: {e}", file=sys.stderr)
        return 2
    report.update(ckpt=str(args.ckpt), data=str(args.data))
    write_report(report, args.report)
    return 0


def read_subjects(path) -> dict[str, list[Question]]:
    """A CSV file or a directory of them -> {subject: questions}."""
    path = Path(path)
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files:
        raise EvalDataError(f"{path}: no .csv files in this directory (C-Eval: pass its val/ or dev/ directory)")
    out, source = {}, {}
    for file in files:
        subject = subject_of(file)
        if subject in source:
            raise EvalDataError(f"{file}: subject {subject!r} again (also {source[subject].name}); "
                                "pass one split's directory")
        out[subject], source[subject] = read_csv(file), file
    return out


def subject_of(file: Path) -> str:
    stem = file.stem
    for suffix in SPLIT_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return stem


def read_csv(file: Path) -> list[Question]:
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise EvalDataError(f"{file}: cannot read ({e})") from None
    if not rows:
        raise EvalDataError(f"{file}: empty file (expected a header {','.join(COLUMNS)})")
    col = _columns(rows[0], file)
    questions = []
    for line, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(rows[0]):
            raise EvalDataError(f"{file}:{line}: {len(row)} fields, the header has {len(rows[0])}")
        answer = row[col["answer"]].strip().upper()
        if answer not in LETTERS:
            raise EvalDataError(f"{file}:{line}: answer {row[col['answer']]!r} is not one of A, B, C, D")
        questions.append(Question(
            id=row[col["id"]] if "id" in col else str(line - 1), question=row[col["question"]],
            choices=tuple(row[col[c]] for c in LETTERS), answer=answer, where=f"{file}:{line}",
        ))
    if not questions:
        raise EvalDataError(f"{file}: no questions after the header")
    return questions


def _columns(header: list[str], file: Path) -> dict[str, int]:
    names = [h.strip() for h in header]
    if names and names[0] == "":
        names[0] = "id"  # CMMLU's unnamed index column
    index = {}
    for i, name in enumerate(names):
        key = name if name in LETTERS else name.lower()
        index.setdefault(key, i)
    missing = [c for c in COLUMNS if c not in index and c != "id"]
    if missing:
        raise EvalDataError(f"{file}: missing column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
    return index


def format_question(q: Question, with_answer: bool) -> str:
    body = q.question + "\n" + "".join(f"{c}. {text}\n" for c, text in zip(LETTERS, q.choices)) + "答案："
    return body + q.answer + "\n\n" if with_answer else body


def build_prompt(subject: str, q: Question, examples: list[Question]) -> str:
    header = f"以下是中国关于{subject.replace('_', ' ')}考试的单项选择题，请选出其中的正确答案。\n\n"
    return header + "".join(format_question(e, True) for e in examples) + format_question(q, False)


def shots_for(q: Question, pool: list[Question], k: int) -> list[Question]:
    return [e for e in pool if e is not q][:k]


def letter_ids(tokenizer) -> list[int]:
    ids = []
    for letter in LETTERS:
        enc = tokenizer.encode(letter, add_special_tokens=False).ids
        if len(enc) != 1:
            raise EvalDataError(f"the tokenizer splits answer letter {letter!r} into {len(enc)} tokens; need one")
        ids.append(enc[0])
    return ids


def evaluate(model, tokenizer, subjects: dict[str, list[Question]], dev=None, shots: int = 0,
             batch_size: int = 16) -> dict:
    """Accuracy per subject and overall; each question scored by next-token logits of A-D."""
    dev = dev or {}
    items = []  # (subject, question, prompt ids)
    for subject, questions in subjects.items():
        pool = dev.get(subject, questions)
        for q in questions:
            text = build_prompt(subject, q, shots_for(q, pool, shots) if shots else [])
            items.append((subject, q, tokenizer.encode(text, add_special_tokens=False).ids))
    predictions = predict(model, [ids for _, _, ids in items], letter_ids(tokenizer), batch_size)
    per_subject: dict[str, dict] = {}
    for (subject, q, _), pred in zip(items, predictions):
        s = per_subject.setdefault(subject, {"correct": 0, "total": 0})
        s["correct"] += int(LETTERS[pred] == q.answer)
        s["total"] += 1
    for s in per_subject.values():
        s["accuracy"] = s["correct"] / s["total"]
    correct, total = sum(s["correct"] for s in per_subject.values()), len(items)
    return {"overall": {"accuracy": correct / total, "correct": correct, "total": total},
            "subjects": per_subject, "shots": shots}


@torch.no_grad()
def predict(model, prompts: list[list[int]], choice_ids: list[int], batch_size: int) -> list[int]:
    """Index of the highest next-token logit among choice_ids, per prompt (longest prompts first)."""
    max_len = model.config.max_position_embeddings
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [0] * len(prompts)
    choice = torch.tensor(choice_ids, device=device)
    for start in tqdm(range(0, len(order), batch_size), desc="eval choice", unit="batch", leave=False):
        rows = [prompts[i][-max_len:] for i in order[start : start + batch_size]]  # keep the question's end
        lengths = torch.tensor([len(r) for r in rows], device=device)
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row, device=device)
        # right padding: causal attention keeps each row's real tokens blind to the pad after them
        hidden = model(ids, return_hidden=True).hidden  # (B, T, D)
        last = hidden[torch.arange(len(rows), device=device), lengths - 1]  # (B, D)
        logits = model.lm_head(last)[:, choice]  # (B, 4)
        for r, pred in enumerate(logits.argmax(dim=-1).tolist()):
            out[order[start + r]] = pred
    return out
