"""`minimind report RUN [RUN...] [--eval FILE...] --out DIR`: a report card for runs, side by side.

For each run (a train.py `--out` directory): what it was (stage, model, data, optimizer, dtype, device, code
commit), what it cost (wall-clock and where it went, tokens/s, MFU, a price), what it learned (held-out
loss and bits per byte, the curves against wall-clock and tokens), how it answers (exact match on held-out
prompts, multiple choice) and how often it repeats itself. Writes DIR/report.md with the pictures it
shows (curves.png, time.png), DIR/report.html (the same page for a browser) and DIR/report.json (every
figure), and prints the table. It reads runs and never writes into one.
"""

import json
import os
import sys
import time
from pathlib import Path

from minimind.checkpoint import CheckpointError
from minimind.data.tokenizer import TokenizerError
from minimind.report import card
from minimind.report.measure import EvalFiles, classify, files_for, measure
from minimind.report.runs import ReportError, read_run

OUTPUTS = ("report.md", "report.html", "report.json", "curves.png", "time.png")


def run(args) -> int:
    try:
        runs = [read_run(p) for p in args.runs]
        check_out(args.out, [r.path for r in runs], force=args.force)
        given = classify(args.eval or [])
        write_report(runs, given, args.out, device=_device(args.device), price=args.price_per_hour)
    except (ReportError, CheckpointError, TokenizerError) as e:
        print(f"minimind report: {e}", file=sys.stderr)
        return 2
    return 0


def _device(device: str) -> str:
    from minimind.eval import pick_device

    return pick_device(device)


def check_out(out: Path, run_dirs: list[Path], force: bool) -> None:
    """--out must not be, hold, or sit inside a run directory (a report never writes into a run), and
    replaces an earlier report only with --force."""
    out = Path(out).resolve()
    for run_dir in map(Path.resolve, run_dirs):
        if out == run_dir or run_dir in out.parents or out in run_dir.parents:
            raise ReportError(f"--out {out}: inside or around the run directory {run_dir}; a report never writes "
                              "into a run: pick a directory of its own")
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: a file; expected a directory")
    if (out / "run.json").exists():
        raise ReportError(f"--out {out}: a run directory; a report never writes into a run")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not force:
        raise ReportError(f"--out {out}: holds a report already ({', '.join(existing)}); pass --force to replace it")


def write_report(runs, given: EvalFiles, out: Path, *, device: str, price: float) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    measured, notes, commands = [], [], []
    for i, run in enumerate(runs, 1):
        files, where = files_for(run, given, out)
        print(f"[{i}/{len(runs)}] {run.path}: evaluating {run.checkpoint.name}", file=sys.stderr, flush=True)
        measured.append(measure(run, files, device=device))
        notes += [f"`{run.name}`: {n}" for n in run.notes + where]
        commands += _commands(run, files)
        print(f"[{i}/{len(runs)}] {run.path}: done in {measured[-1]['seconds']:.0f}s", file=sys.stderr, flush=True)
    table = card.rows(runs, measured, price)
    images = ["curves.png", "time.png"]
    _write_png(card.plot_curves, runs, out / "curves.png")
    _write_png(card.plot_time, runs, out / "time.png")
    title = "Report card: " + ", ".join(r.name for r in runs)
    text = card.markdown(runs, table, measured, images=images, notes=notes, commands=commands, title=title)
    _write_text(out / "report.md", text)
    _write_text(out / "report.html", card.html(text, title))
    record = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "price_per_hour": price,
              "runs": [{"path": str(r.path), "stage": r.stage, "elapsed_s": r.elapsed_s, "tokens_seen": r.tokens_seen,
                        "summary": r.summary, **m} for r, m in zip(runs, measured)],
              "table": [{"section": row.section, "label": row.label, "values": row.values} for row in table]}
    _write_text(out / "report.json", json.dumps(_finite(record), indent=2, ensure_ascii=False) + "\n")
    print(card.terminal(runs, table))
    print(f"\nreport card: {out / 'report.md'} (and report.html, curves.png, time.png, report.json)")
    return record


def _commands(run, files: EvalFiles) -> list[str]:
    ckpt = run.checkpoint
    out = [f"minimind eval ppl --ckpt {ckpt} --data {f}" for f in files.text]
    out += [f"minimind eval answers --ckpt {ckpt} --data {f}" for f in files.answers if run.is_chat]
    out += [f"minimind eval choice --ckpt {ckpt} --data {f}" for f in files.choice]
    return out


def _finite(value):
    from minimind.eval import finite_or_none

    return finite_or_none(value)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_png(plot, runs, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        plot(runs, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
