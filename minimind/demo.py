"""`make demo`: the whole pipeline on built-in synthetic data, showing what the model learned (BENCHMARKS.md).

synth corpus -> BPE tokenizer -> prepared data -> pretrain -> SFT -> exact-match accuracy of the SFT
model on held-out prompts of each task family and language (arithmetic problems, facts and instructions
that no training file asks: `minimind.data.synth.held_out_prompts`), each beside three of its replies ->
GRPO on arithmetic prompts -> accuracy on held-out arithmetic before and after GRPO -> the report card of
the three runs (`minimind report`: out/report/report.md). Each run keeps its loss curve (loss.png); the demo
ends with the commands that re-run each evaluation and serve the model.

Its settings come from measured runs (BENCHMARKS.md, "Demo accuracy"): a tokenizer that splits digits and
CJK ideographs, pretraining sized in steps (`--pretrain-steps`, so every machine trains the same model and
only the time differs; the expected time is printed first, from 12 timed steps), 4 rows a step (more updates per
second beat bigger batches), weight decay 0.5, and GRPO at lr 1e-4 (from the same SFT model, 3 seeds each:
3e-5 gained 6-7 held-out arithmetic problems of 176, 1e-4 9-14; 3e-4 with dynamic sampling -1 to +4).
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

DEMO_MODEL = ["--model", "tiny", "--set", "hidden_size=256", "--set", "num_hidden_layers=4",
              "--set", "num_attention_heads=4", "--set", "num_key_value_heads=2", "--set", "vocab_size=auto"]
HELD_OUT_GRPO = 88  # every held-out arithmetic problem, in English and in Chinese, scored before and after GRPO


def _step(title: str):
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def _train(args: list) -> None:
    from minimind.cli import train_main

    rc = train_main([str(a) for a in args])
    if rc != 0:
        raise SystemExit(f"demo: train.py {' '.join(map(str, args))} failed with exit code {rc}")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _arithmetic_rlaif(rlaif: Path, out: Path) -> Path:
    """The rlaif lines whose answer is a number: GRPO trains on arithmetic only."""
    rows = [json.loads(line) for line in rlaif.read_text(encoding="utf-8").splitlines()]
    keep = [r for r in rows if (r.get("answer") or r["conversations"][-1]["content"]).lstrip("-").isdigit()]
    return _write_jsonl(out, keep)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minimind.demo")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--scale", type=float, default=0.5, help="synthetic corpus size")
    p.add_argument("--pretrain-steps", type=int, default=1000,
                   help="pretraining's length in optimizer steps (train.py --max-steps): the same model on every "
                        "machine, only the time differs")
    p.add_argument("--sft-epochs", type=float, default=1.0)
    p.add_argument("--grpo-steps", type=int, default=60)
    p.add_argument("--grpo-lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--pretrain-wd", type=float, default=0.5,
                   help="pretraining's weight decay: 0.5 beat 0.1, 1 and 2 on held-out arithmetic and facts")
    return p


def _data(out: Path, scale: float) -> dict[str, Path]:
    """Steps 1-3: the corpus, held-out prompts, tokenizer and prepared data, by name."""
    from minimind.data.prepare import prepare
    from minimind.data.synth import arithmetic_prompts, held_out_prompts, write_corpus
    from minimind.data.tokenizer import train_tokenizer

    t = _step("1/7 synthetic corpus (minimind synth) and held-out prompts")
    files = write_corpus(out / "data", seed=0, scale=scale)
    held_out = _write_jsonl(out / "eval" / "held_out.jsonl", held_out_prompts(seed=0))
    grpo_eval = _write_jsonl(out / "eval" / "held_out_arithmetic.jsonl", [
        {"family": "arithmetic", "conversations": [{"role": "user", "content": q}], "answer": a}
        for q, a in arithmetic_prompts(seed=0, n=HELD_OUT_GRPO, both_languages=True)])
    rlaif = _arithmetic_rlaif(files["rlaif"], out / "data" / "rlaif_arithmetic.jsonl")
    print(f"wrote {len(files)} files to {out / 'data'}, held-out prompts to {out / 'eval'} "
          f"in {time.perf_counter() - t:.1f}s")

    t = _step("2/7 tokenizer (minimind tokenizer)")
    # digits and ideographs split: a sum or a Chinese sentence the model never saw is made of pieces it did see
    tok = train_tokenizer([files["pretrain"], files["sft"]], vocab_size=6400, out=out / "tokenizer",
                          split_digits=True, split_cjk=True)
    print(f"tokenizer in {tok} ({time.perf_counter() - t:.1f}s)")

    t = _step("3/7 prepare (minimind prepare)")
    pre = prepare("pretrain", files["pretrain"], tok, out / "prepared" / "pretrain")
    sft = prepare("sft", files["sft"], tok, out / "prepared" / "sft", max_seq_len=256)
    grpo = prepare("grpo", rlaif, tok, out / "prepared" / "grpo", max_seq_len=256)
    print(f"prepared in {time.perf_counter() - t:.1f}s")
    return {"held_out": held_out, "grpo_eval": grpo_eval, "tokenizer": tok, "pretrain": pre, "sft": sft,
            "grpo": grpo}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    t_all = time.perf_counter()
    data = _data(out, args.scale)
    held_out, grpo_eval, tok = data["held_out"], data["grpo_eval"], data["tokenizer"]
    pre, sft, grpo = data["pretrain"], data["sft"], data["grpo"]

    # float32 pinned (not --dtype auto, which times bf16 at start): the demo's accuracies are then the same
    # on every machine, whether or not its CPU multiplies bf16 fast
    common = ["--seq-len", "256", "--batch-size", args.batch_size, "--log-every", "20", "--save-every", "1000",
              "--dtype", "float32"]
    t = _step("4/7 pretrain")
    pretrain = ["--stage", "pretrain", *DEMO_MODEL, "--data", pre, "--tokenizer", tok, "--lr", args.pretrain_lr,
                "--weight-decay", args.pretrain_wd, "--warmup-steps", "20", "--schedule", "wsd", *common]
    print(f"pretraining: {args.pretrain_steps} steps of {args.batch_size} x 256 tokens, about "
          f"{_expected_seconds(pretrain, out / 'probe', args.pretrain_steps):.0f}s on this machine "
          "(from 12 timed steps)", flush=True)
    _train([*pretrain, "--out", out / "pretrain", "--max-steps", args.pretrain_steps])
    print(f"pretrain in {time.perf_counter() - t:.0f}s")

    t = _step("5/7 SFT")
    _train(["--stage", "sft", "--init", out / "pretrain", "--data", sft, "--out", out / "sft", "--epochs",
            args.sft_epochs, "--lr", "1e-3", "--warmup-steps", "10", *common])
    print(f"SFT in {time.perf_counter() - t:.0f}s")

    t = _step("6/7 the SFT model on held-out prompts (minimind eval answers, greedy, exact match)")
    _evaluate(out / "sft", held_out, out / "eval" / "sft.json", show=True)
    before = _evaluate(out / "sft", grpo_eval, out / "eval" / "grpo_before.json")
    print(f"evaluated in {time.perf_counter() - t:.0f}s")

    t = _step("7/7 GRPO on arithmetic prompts")
    _train(["--stage", "grpo", "--init", out / "sft", "--data", grpo, "--out", out / "grpo", "--max-steps",
            args.grpo_steps, "--batch-size", "8", "--group-size", "8", "--max-new-tokens", "24", "--seq-len", "64",
            "--lr", args.grpo_lr, "--log-every", "5", "--save-every", "1000", "--dtype", "float32"])
    after = _evaluate(out / "grpo", grpo_eval, out / "eval" / "grpo_after.json")
    print(f"GRPO in {time.perf_counter() - t:.0f}s")
    print(f"held-out arithmetic ({HELD_OUT_GRPO} problems never in any training file, each in English and "
          f"Chinese, '... Write the equation and its result.'): {before['correct']}/{before['questions']} = "
          f"{before['accuracy']:.1%} after SFT -> {after['correct']}/{after['questions']} = {after['accuracy']:.1%} "
          "after GRPO")

    t = _step("report card (minimind report)")
    _report(out, held_out)
    print(f"report card in {time.perf_counter() - t:.0f}s")

    print(f"\nloss curves: {out / 'pretrain' / 'loss.png'}  {out / 'sft' / 'loss.png'}  {out / 'grpo' / 'loss.png'}")
    print(f"evaluate:    minimind eval answers --ckpt {out / 'sft'} --data {held_out}")
    print(f"             minimind eval answers --ckpt {out / 'grpo'} --data {grpo_eval}")
    print(f"serve it:    minimind serve --ckpt {out / 'sft'} --port 8000")
    print(f"chat:        minimind chat --ckpt {out / 'sft'}")
    print(f"demo done in {time.perf_counter() - t_all:.0f}s")
    return 0


def _expected_seconds(pretrain: list, probe: Path, steps: int) -> float:
    """The pretraining's wall-clock on this machine, from a 12-step run of the same command (its summary.json:
    start-up plus steps at the measured pace). The probe run is removed."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        _train([*pretrain, "--out", probe, "--max-steps", "12", "--log-every", "6"])
    summary = json.loads((probe / "summary.json").read_text())
    shutil.rmtree(probe)
    startup = summary["elapsed_s"] - summary["spent_s"]["training"]
    return startup + steps * summary["spent_s"]["training"] / summary["steps"]


def _report(out: Path, held_out: Path) -> None:
    """The report card of the three runs, side by side, in out/report (`minimind report`)."""
    from minimind.report import write_report
    from minimind.report.measure import EvalFiles
    from minimind.report.runs import read_run

    write_report([read_run(out / name) for name in ("pretrain", "sft", "grpo")], EvalFiles(answers=[held_out]),
                 out / "report", device="cpu", price=2.0)


def _evaluate(ckpt: Path, data: Path, report: Path, show: bool = False) -> dict:
    from infer.engine import Engine
    from minimind.eval.answers import evaluate, format_table, read_questions

    engine = Engine.from_checkpoint(ckpt, max_batch=64)
    result = evaluate(engine, read_questions(data), max_new_tokens=48)
    if show:
        print(format_table(result))
    result.update(ckpt=str(ckpt), data=str(data))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    sys.exit(main())
