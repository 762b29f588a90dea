"""What the report card measures on a run's newest checkpoint, each through the code of the `minimind eval`
command that measures it alone, with that command's defaults, so a figure on the card equals the command's:

- held-out loss and bits per byte: `eval ppl` (minimind.eval.ppl.perplexity);
- exact match on held-out prompts: `eval answers` (minimind.eval.answers.evaluate), chat stages only;
- multiple-choice accuracy: `eval choice` (minimind.eval.choice.evaluate), zero-shot;
- repetition (minimind.eval.repetition) over continuations of held-out prompts, greedy and at the
  server's default sampling; and a few of the greedy replies.

The files each run is scored on (`EvalFiles`) come from `--eval`, else from the run: its `--val-data`,
or, when it trained on the built-in synthetic corpus, text and prompts held out of that corpus's world,
written into the report's directory so each figure can be re-run with `minimind eval`.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from minimind.eval import EvalDataError, json_lines, load_for_eval, repetition, special_token
from minimind.eval import answers as answers_eval
from minimind.eval import choice as choice_eval
from minimind.eval import ppl as ppl_eval
from minimind.report.runs import ReportError, Run

# `minimind eval`'s defaults (minimind/cli.py), so the card's figures equal the commands'
PPL_SEQ_LEN, BATCH_SIZE, ANSWER_TOKENS = 512, 16, 64
REPETITION_PROMPTS, REPETITION_TOKENS, TEXT_PREFIX_TOKENS = 32, 64, 8
SAMPLES = 4


@dataclass
class EvalFiles:
    text: list[Path] = field(default_factory=list)  # held-out text: eval ppl
    answers: list[Path] = field(default_factory=list)  # rlaif jsonl with answers: eval answers
    choice: list[Path] = field(default_factory=list)  # C-Eval CSV files or directories: eval choice

    def __bool__(self) -> bool:
        return bool(self.text or self.answers or self.choice)


def classify(paths: list[Path]) -> EvalFiles:
    """--eval files by kind: a CSV or a directory is multiple choice; a jsonl is held-out text when its first
    line has "text", held-out prompts when it has "conversations"; any other file is text (as eval ppl reads it)."""
    files = EvalFiles()
    for path in map(Path, paths):
        if not path.exists():
            raise ReportError(f"--eval {path}: no such file or directory")
        if path.is_dir() or path.suffix.lower() == ".csv":
            try:
                choice_eval.read_subjects(path)  # a malformed file is refused before any model is loaded
            except EvalDataError as e:
                raise ReportError(f"--eval {e}") from None
            files.choice.append(path)
        elif path.suffix == ".jsonl":
            kind = _jsonl_kind(path)
            (files.text if kind == "text" else files.answers).append(path)
        else:
            files.text.append(path)
    return files


def _jsonl_kind(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"--eval {path}: unreadable ({e})") from None
    for number, obj in json_lines(lines, f"--eval {path}", ReportError):
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            return "text"
        if isinstance(obj, dict) and isinstance(obj.get("conversations"), list):
            return "answers"
        raise ReportError(f"--eval {path}:{number}: neither held-out text ({{\"text\": ...}}) nor held-out "
                          "prompts ({\"conversations\": [...], \"answer\": ...})")
    raise ReportError(f"--eval {path}: empty file")


def files_for(run: Run, given: EvalFiles, out: Path) -> tuple[EvalFiles, list[str]]:
    """The files `run` is scored on, and notes saying where they came from: --eval's where given, else the
    run's --val-data (a file, or the source of a prepared directory), else its synthetic world's held-out
    text and prompts (written to `out` once per world)."""
    from minimind.data import synth

    files, notes = EvalFiles(list(given.text), list(given.answers), list(given.choice)), []
    if not files.text:
        val = _val_file(run)
        if val is not None:
            files.text.append(val)
            notes.append(f"held-out text: the run's --val-data {val}")
    seed = synth.identify(run.data_file) if run.data_file is not None and not (files.text and files.answers) else None
    if seed is not None:
        if not files.text:
            files.text.append(_write_once(out / f"synth-{seed}-validation.jsonl", synth.validation_docs(seed)))
            notes.append(f"held-out text: fresh draws of the synthetic world of seed {seed}")
        if not files.answers:
            files.answers.append(_write_once(out / f"synth-{seed}-held-out.jsonl", synth.held_out_prompts(seed)))
            notes.append(f"held-out prompts: those of the synthetic world of seed {seed} (never in its corpus)")
    return files, notes


def _val_file(run: Run) -> Path | None:
    value = run.config.get("val_data")
    if not value:
        return None
    path = Path(value)
    if path.is_dir():
        try:
            source = json.loads((path / "meta.json").read_text(encoding="utf-8")).get("source")
        except (OSError, ValueError):
            return None
        path = Path(source) if isinstance(source, str) else None
    return path if path is not None and path.is_file() else None


def _write_once(path: Path, rows: list[dict]) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
    return path


def measure(run: Run, files: EvalFiles, device: str) -> dict:
    """Every measurement of the card for `run`, as JSON-ready values; `seconds` is how long they took."""
    from infer.engine import Engine

    began = time.perf_counter()
    model, tokenizer, tok_config = load_for_eval(run.checkpoint, device=device)
    out = {"checkpoint": str(run.checkpoint), "params": model.num_params(),
           "heldout": [_heldout(model, tokenizer, tok_config, f) for f in files.text],
           "choice": [_choice(model, tokenizer, f) for f in files.choice]}
    del model
    engine = Engine.from_checkpoint(run.checkpoint, device=device, max_batch=BATCH_SIZE)
    out["answers"] = [_answers(engine, f) for f in files.answers] if run.is_chat else []
    prompts = _repetition_prompts(engine, run, files)
    out["repetition"], out["samples"] = _repetition(engine, prompts) if prompts else (None, [])
    out["seconds"] = round(time.perf_counter() - began, 1)
    return out


def _heldout(model, tokenizer, tok_config, file: Path) -> dict:
    seq_len = min(PPL_SEQ_LEN, model.config.max_position_embeddings)
    try:
        docs = ppl_eval.read_documents(file)
        result = ppl_eval.perplexity(model, tokenizer, docs, bos=special_token(tok_config, "bos"), seq_len=seq_len,
                                     batch_size=BATCH_SIZE)
    except EvalDataError as e:
        raise ReportError(str(e)) from None
    return {"file": str(file), **result}


def _choice(model, tokenizer, path: Path) -> dict:
    try:
        result = choice_eval.evaluate(model, tokenizer, choice_eval.read_subjects(path), batch_size=BATCH_SIZE)
    except EvalDataError as e:
        raise ReportError(str(e)) from None
    return {"file": str(path), **result["overall"], "subjects": result["subjects"]}


def _answers(engine, file: Path) -> dict:
    try:
        questions = answers_eval.read_questions(file)
        result = answers_eval.evaluate(engine, questions, max_new_tokens=ANSWER_TOKENS, progress=f"answers {file.name}")
    except EvalDataError as e:
        raise ReportError(str(e)) from None
    return {"file": str(file), **result}


def _repetition_prompts(engine, run: Run, files: EvalFiles) -> list[tuple[str, list[int]]]:
    """(shown text, token ids) of up to REPETITION_PROMPTS held-out prompts, spread over the file: a chat
    stage's questions in its chat format; a pretrained model's held-out documents cut to their first tokens."""
    if run.is_chat and files.answers:
        questions = _spread(answers_eval.read_questions(files.answers[0]), REPETITION_PROMPTS)
        return [(q["messages"][-1]["content"], engine.encode_chat(q["messages"])) for q in questions]
    if files.text:
        docs = _spread(ppl_eval.read_documents(files.text[0]), REPETITION_PROMPTS)
        bos = engine.tokenizer.bos_token_id
        prompts = []
        for doc in docs:
            ids = engine.tokenizer.encode(doc, add_special_tokens=False)[:TEXT_PREFIX_TOKENS]
            ids = ([bos] if bos is not None else []) + ids
            prompts.append((engine.tokenizer.decode(ids, skip_special_tokens=True), ids))
        return [p for p in prompts if len(p[1]) > 1]
    return []


def _spread(items: list, n: int) -> list:
    """n items evenly spaced over `items` (all of them if fewer): every family of a file grouped by family."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


def server_default_sampling(max_new_tokens: int, seed: int):
    """The SamplingParams `minimind serve` uses for a chat request that sets nothing but `seed`."""
    from infer.protocol import ChatRequest

    request = ChatRequest(model="report", messages=[{"role": "user", "content": "-"}], seed=seed)
    return request.sampling(max_new_tokens, None)


def _repetition(engine, prompts: list[tuple[str, list[int]]]) -> tuple[dict, list[dict]]:
    from infer.engine import SamplingParams

    ids = [p for _, p in prompts]
    greedy = engine.generate(ids, SamplingParams(max_new_tokens=REPETITION_TOKENS, temperature=0.0),
                             progress="repetition, greedy")
    sampled = engine.generate(ids, [server_default_sampling(REPETITION_TOKENS, seed=i) for i in range(len(ids))],
                              progress="repetition, sampled")
    ends, default = set(engine.end_ids), server_default_sampling(1, 0)
    report = {"prompts": len(ids), "max_new_tokens": REPETITION_TOKENS,
              "greedy": repetition.measure([_generated(c, ends) for c in greedy]),
              "sampled": repetition.measure([_generated(c, ends) for c in sampled]),
              "sampling": {"temperature": default.temperature, "top_p": default.top_p, "top_k": default.top_k}}
    samples = [{"prompt": text, "reply": c.text, "tokens": len(c.token_ids), "loops":
                repetition.loop_period(_generated(c, ends)) is not None}
               for (text, _), c in zip(_spread(prompts, SAMPLES), _spread(greedy, SAMPLES))]
    return report, samples


def _generated(completion, ends: set[int]) -> list[int]:
    """The generated ids without the end token that stopped them."""
    ids = list(completion.token_ids)
    return ids[:-1] if ids and completion.finish_reason == "stop" and ids[-1] in ends else ids
