"""`minimind report`: the card's figures against the `minimind eval` commands run alone, repetition on
models scripted to loop and not to, two recipes side by side, and refused input.

The runs are real (train.py on the synthetic corpus, `tiny`, a few steps); the scripted models are real
checkpoints whose weights make greedy decoding walk a fixed cycle of tokens.
"""

import json
import shutil

import pytest
import torch

from minimind.cli import main as cli
from minimind.cli import train_main
from minimind.data.synth import held_out_prompts
from minimind.eval.repetition import distinct_n, loop_period, measure

COMMON = ["--model", "tiny", "--set", "vocab_size=auto", "--seq-len", "64", "--batch-size", "4", "--log-every", "4",
          "--dtype", "float32", "--save-every", "1000"]


def _train(*args) -> None:
    assert train_main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def walkthrough(synth_dir, tokenizer_dir, tmp_path_factory):
    """The README's walkthrough, short: runs/pre (pretrain) and runs/sft (SFT from it) on the synthetic corpus."""
    runs = tmp_path_factory.mktemp("runs")
    _train("--stage", "pretrain", *COMMON, "--data", synth_dir / "pretrain.jsonl", "--tokenizer", tokenizer_dir,
           "--out", runs / "pre", "--max-steps", 12)
    _train("--stage", "sft", "--init", runs / "pre", "--data", synth_dir / "sft.jsonl", "--out", runs / "sft",
           "--seq-len", 64, "--batch-size", 4, "--log-every", 3, "--dtype", "float32", "--max-steps", 6)
    return runs


@pytest.fixture(scope="module")
def card(walkthrough, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "card"
    assert cli(["report", str(walkthrough / "pre"), str(walkthrough / "sft"), "--out", str(out)]) == 0
    return out


def _eval(*args, tmp_path) -> dict:
    report = tmp_path / f"eval-{len(list(tmp_path.iterdir()))}.json"
    assert cli(["eval", *map(str, args), "--report", str(report)]) == 0
    return json.loads(report.read_text())


def test_the_card_has_every_section_and_its_pictures(card):
    text = (card / "report.md").read_text()
    for heading in ("## What it was", "## What it cost", "## What it learned", "## How it answers", "## Repetition",
                    "## Replies"):
        assert heading in text
    assert "![curves.png](curves.png)" in text and "![time.png](time.png)" in text
    for png in ("curves.png", "time.png"):
        assert (card / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in (card / "report.html").read_text()
    assert "| | `pre` | `sft` |" in text


def test_held_out_loss_equals_eval_ppl_on_the_same_file(card, walkthrough, tmp_path):
    record = json.loads((card / "report.json").read_text())
    for run in record["runs"]:
        held = run["heldout"][0]
        alone = _eval("ppl", "--ckpt", run["path"], "--data", held["file"], tmp_path=tmp_path)
        assert held["nll_per_token"] == pytest.approx(alone["nll_per_token"], rel=1e-9)
        assert held["bits_per_byte"] == pytest.approx(alone["bits_per_byte"], rel=1e-9)
        assert held["tokens"] == alone["tokens"]


def test_exact_match_equals_eval_answers(card, tmp_path):
    record = json.loads((card / "report.json").read_text())
    pre, sft = record["runs"]
    assert pre["answers"] == []  # a pretrained model is not scored on chat prompts
    ours = sft["answers"][0]
    alone = _eval("answers", "--ckpt", sft["path"], "--data", ours["file"], tmp_path=tmp_path)
    assert (ours["correct"], ours["questions"]) == (alone["correct"], alone["questions"])
    by_family = {k: v["correct"] for k, v in ours["families"].items()}
    assert by_family == {k: v["correct"] for k, v in alone["families"].items()}
    assert ours["questions"] == len(held_out_prompts(seed=0))  # every held-out prompt of the synthetic world


def _row(record: dict, label: str) -> list:
    return next(r for r in record["table"] if r["label"] == label)["values"]


def test_what_it_was_and_cost_equal_the_runs_own_records(card, walkthrough):
    record = json.loads((card / "report.json").read_text())
    runs = [walkthrough / "pre", walkthrough / "sft"]
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    last_rows = [json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) for run in runs]
    assert _row(record, "tokens seen") == [s["tokens_seen"] for s in summaries] == [r["tokens"] for r in last_rows]
    assert _row(record, "optimizer steps") == [s["steps"] for s in summaries] == [r["step"] for r in last_rows]
    assert _row(record, "wall-clock") == [s["elapsed_s"] for s in summaries]
    assert _row(record, "tokens/s") == [s["tokens_per_s"] for s in summaries]
    assert _row(record, "cost at $2/h") == pytest.approx([s["elapsed_s"] / 3600 * 2.0 for s in summaries])
    assert _row(record, "stage") == ["pretrain", "sft"] and _row(record, "optimizer") == ["muon", "adamw"]
    assert _row(record, "last training loss") == [r["loss"] for r in last_rows]


def test_multiple_choice_equals_eval_choice(walkthrough, synth_dir, tmp_path):
    csv = synth_dir / "eval_choice.csv"
    assert cli(["report", str(walkthrough / "pre"), "--eval", str(csv), "--out", str(tmp_path / "card")]) == 0
    ours = json.loads((tmp_path / "card" / "report.json").read_text())["runs"][0]["choice"][0]
    alone = _eval("choice", "--ckpt", walkthrough / "pre", "--data", csv, tmp_path=tmp_path)
    assert (ours["correct"], ours["total"]) == (alone["overall"]["correct"], alone["overall"]["total"])


def test_the_synthetic_worlds_held_out_files_are_held_out(card, synth_dir):
    """What the card wrote as held-out is in none of the corpus's files."""
    corpus = "".join((synth_dir / f).read_text() for f in ("pretrain.jsonl", "sft.jsonl"))
    prompts = [json.loads(line) for line in (card / "synth-0-held-out.jsonl").read_text().splitlines()]
    arithmetic = [p["conversations"][0]["content"] for p in prompts if p["family"].startswith("arithmetic")]
    assert arithmetic and not any(json.dumps(q, ensure_ascii=False) in corpus for q in arithmetic)  # whole turns


def _copy_run(run, to):
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".lock"))
    return to


def _scripted(run, period: int, base: int = 300):
    """Adds a newest checkpoint to `run` whose greedy decoding, from any token, walks base, base+1, ...,
    base+period-1 and round again: the blocks add nothing (o_proj, down_proj zero), so the last hidden state is
    the current token's embedding, a one-hot of its id mod D; the untied head maps that to the next token."""
    from minimind.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint, tokenizer_dir
    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM

    ckpt = resolve_checkpoint(run)
    trained, _ = load_checkpoint(ckpt)
    config = ModelConfig.from_dict({**trained.config.to_dict(), "tie_word_embeddings": False}, kernels="torch")
    model = MiniMindForCausalLM(config)
    d, v = config.hidden_size, config.vocab_size
    assert base + period <= v and period <= d
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(d)[torch.arange(v) % d])
        head = torch.zeros(v, d)
        for residue in range(d):  # the token whose id has this residue goes to ...
            offset = (residue - base) % d
            head[base + (offset + 1) % period if offset < period else base, residue] = 10.0
        model.lm_head.weight.copy_(head)
    step = int(ckpt.name.split("-")[1]) + 1
    save_checkpoint(run / f"step-{step}", model, tokenizer_dir=tokenizer_dir(ckpt))
    return run


@pytest.mark.parametrize("period, share", [(3, 1.0), (128, 0.0)])
def test_repetition_of_scripted_models(walkthrough, tmp_path, period, share):
    """A model scripted to cycle through 3 tokens loops in every reply; one cycling through 128 (more than a
    reply's 64 tokens) never does."""
    run = _scripted(_copy_run(walkthrough / "pre", tmp_path / "scripted"), period)
    assert cli(["report", str(run), "--out", str(tmp_path / "card")]) == 0
    rep = json.loads((tmp_path / "card" / "report.json").read_text())["runs"][0]["repetition"]
    assert rep["greedy"]["loop_share"] == share
    assert rep["greedy"]["replies"] == 32 and rep["greedy"]["mean_tokens"] == 64
    bigrams = 32 * 63
    distinct = round(rep["greedy"]["distinct_2"] * bigrams)  # each reply's 63 bigrams are edges of the cycle
    assert distinct == 3 if period == 3 else 63 <= distinct <= 128


def test_two_recipes_share_one_table_and_one_plot(walkthrough, synth_dir, tokenizer_dir, tmp_path):
    from minimind.report import card as card_module
    from minimind.report.runs import read_run

    _train("--stage", "pretrain", *COMMON, "--data", synth_dir / "pretrain.jsonl", "--tokenizer", tokenizer_dir,
           "--out", tmp_path / "adamw", "--max-steps", 12, "--optim", "adamw", "--lr", "3e-3")
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": f"{a} + {b} = {a + b}."}) + "\n" for a in range(5) for b in range(4)))
    out = tmp_path / "card"
    runs = [str(walkthrough / "pre"), str(tmp_path / "adamw")]
    assert cli(["report", *runs, "--eval", str(held), "--out", str(out)]) == 0
    record = json.loads((out / "report.json").read_text())
    row = next(r for r in record["table"] if r["label"].startswith("held-out loss") and "held.jsonl" in r["label"])
    assert len(row["values"]) == 2 and all(isinstance(v, float) for v in row["values"])
    assert row["values"][0] != row["values"][1]
    assert next(r for r in record["table"] if r["label"] == "optimizer")["values"] == ["muon", "adamw"]
    labels = card_module.plot_curves([read_run(walkthrough / "pre"), read_run(tmp_path / "adamw")], tmp_path / "c.png")
    assert labels == ["pre", "adamw"]
    text = (out / "report.md").read_text()
    assert "**" in text  # the better run of a row is marked


# ------------------------------------------------------------------------------------------- refused input
def _refused(capsys, *argv) -> str:
    assert cli(["report", *map(str, argv)]) == 2
    return capsys.readouterr().err


def test_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _refused(capsys, tmp_path / "empty", "--out", tmp_path / "card")
    assert "not a run directory (no run.json)" in err and str(tmp_path / "empty") in err
    assert not (tmp_path / "card").exists()


def test_a_run_without_metrics(walkthrough, tmp_path, capsys):
    run = _copy_run(walkthrough / "pre", tmp_path / "run")
    (run / "metrics.jsonl").write_text("")
    assert "has no metrics" in _refused(capsys, run, "--out", tmp_path / "card")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    assert f"{run / 'metrics.jsonl'}:2: not valid JSON" in _refused(capsys, run, "--out", tmp_path / "card")


def test_an_eval_file_in_the_wrong_format(walkthrough, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('\n{"question": "?"}\n')
    assert f"--eval {bad}:2: neither held-out text" in _refused(capsys, walkthrough / "pre", "--eval", bad, "--out",
                                                                 tmp_path / "card")
    csv = tmp_path / "bad.csv"
    csv.write_text("id,question\n1,what\n")
    assert "bad.csv" in _refused(capsys, walkthrough / "pre", "--eval", csv, "--out", tmp_path / "card")


def test_a_report_never_writes_into_a_run(walkthrough, tmp_path, capsys):
    run = _copy_run(walkthrough / "pre", tmp_path / "run")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for out in (run, run / "report", tmp_path):
        assert "never writes into a run" in _refused(capsys, run, "--out", out)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_an_earlier_report_is_replaced_only_with_force(card, walkthrough, capsys):
    stamp = (card / "report.md").stat().st_mtime_ns
    assert "holds a report already" in _refused(capsys, walkthrough / "pre", "--out", card)
    assert (card / "report.md").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------------------- the measures
def test_loop_period_on_fixed_replies():
    assert loop_period([5] * 12) == 1
    assert loop_period([1, 2, 3] * 4) == 3
    assert loop_period([9, 8] + [1, 2, 3, 4] * 3 + [7]) == 4
    assert loop_period([1, 2] * 5) is None  # 10 tokens: under the 12-token span
    assert loop_period(list(range(64))) is None
    assert loop_period([1, 2, 3, 1, 2, 3, 4, 1, 2, 3, 1, 2, 3, 4]) is None  # never 3 times back to back


def test_distinct_2_and_measure():
    assert distinct_n([[1, 2, 3], [1, 2, 4]]) == pytest.approx(3 / 4)
    assert distinct_n([[1]]) is None
    got = measure([[7] * 20, list(range(20))])
    assert got["looping"] == 1 and got["loop_share"] == 0.5 and got["mean_tokens"] == 20


def test_runs_without_a_clock_get_one_from_tokens_per_s():
    from minimind.report.runs import fill_clock

    rows = [{"step": 10, "tokens_per_s": 100.0}, {"step": 20, "tokens_per_s": 50.0}]
    assert fill_clock(rows, tokens_per_step=10)
    assert [(r["tokens"], r["elapsed_s"]) for r in rows] == [(100, 1.0), (200, 3.0)]
    logged = [{"step": 1, "tokens": 5, "elapsed_s": 2.5}]
    assert not fill_clock(logged, tokens_per_step=10) and logged[0]["elapsed_s"] == 2.5
