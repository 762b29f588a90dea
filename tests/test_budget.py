"""Budgeted runs (`--max-tokens`, `--max-time`): the schedule is sized to the budget, so the run ends
there with the learning rate at its floor, then evaluates (with --val-data) and saves; the data repeats
when the budget is longer than an epoch; a resumed run keeps counting its budget."""

import json
import shutil

import pytest

from minimind.schedule import lr_at
from tests.test_train import FAST, train_inproc

LR, MIN_LR = 1e-3, 1e-5


@pytest.fixture(scope="module")
def small_pretrain(synth_dir, tokenizer_dir, tmp_path_factory):
    """The first 40 pretrain documents: an epoch is a few steps, so a budget outlasts it."""
    from minimind.data.prepare import prepare

    d = tmp_path_factory.mktemp("budget")
    lines = (synth_dir / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    (d / "small.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return prepare("pretrain", d / "small.jsonl", tokenizer_dir, d / "prepared", max_seq_len=512)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_wsd_is_flat_then_falls_linearly_to_the_floor():
    lrs = [lr_at(s, s / 100, lr=LR, min_lr=MIN_LR, warmup=5, schedule="wsd", decay_frac=0.2) for s in range(101)]
    assert lrs[0] == pytest.approx(LR / 5) and lrs[4] == pytest.approx(LR)
    assert all(v == LR for v in lrs[5:80]) and lrs[80] == pytest.approx(LR)
    decay = lrs[80:]
    assert all(a > b for a, b in zip(decay, decay[1:])) and decay[-1] == pytest.approx(MIN_LR)
    assert decay[10] == pytest.approx(MIN_LR + (LR - MIN_LR) / 2)  # linear: halfway at the middle
    cos = [lr_at(s, s / 100, lr=LR, min_lr=MIN_LR, warmup=0, schedule="cosine") for s in range(101)]
    assert cos[0] == LR and cos[50] == pytest.approx((LR + MIN_LR) / 2) and cos[100] == pytest.approx(MIN_LR)


def test_a_token_budget_ends_at_the_floor_evaluates_and_repeats_the_data(small_pretrain, tmp_path, capsys):
    out = tmp_path / "tokens"
    per_step = 8 * 64  # FAST: batch 8 x 64
    rc, err = train_inproc("--stage", "pretrain", *FAST, "--data", small_pretrain, "--max-tokens", 20 * per_step,
                           "--lr", LR, "--min-lr", MIN_LR, "--warmup-steps", 2, "--val-data", small_pretrain,
                           "--log-every", 5, "--out", out)
    assert rc == 0, err[-2000:]
    printed = capsys.readouterr().out
    r = rows(out)
    assert [x["step"] for x in r] == [5, 10, 15, 20]
    assert "val_loss" in r[-1] and all("val_loss" not in x for x in r[:-1])  # held-out loss at the end only
    assert [x["lr"] for x in r[:3]] == [LR] * 3  # wsd with a budget: stable until the last 20% (steps 17-20)
    assert r[-1]["lr"] == pytest.approx(MIN_LR)  # the last step at the floor
    assert "the data repeats" in printed and "lr schedule wsd sized to the budget --max-tokens" in printed
    assert json.loads((out / "run.json").read_text())["schedule"] == "wsd"
    assert (out / "step-20").is_dir()


@pytest.fixture
def step_clock(monkeypatch):
    """The trainer's clock made to advance half a second per forward and by nothing else: a time budget
    then buys the same steps on a quiet or a loaded machine (the real clock made this test fail when
    other work shared the cores)."""
    import minimind.model
    import minimind.schedule

    now = [0.0]
    forward = minimind.model.MiniMindForCausalLM.forward

    def timed_forward(self, *args, **kwargs):
        now[0] += 0.5
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(minimind.model.MiniMindForCausalLM, "forward", timed_forward)
    monkeypatch.setattr(minimind.schedule, "clock", lambda: now[0])
    return now


def test_a_time_budget_ends_on_time_at_the_floor_and_resumes_with_what_is_left(small_pretrain, tmp_path, capsys,
                                                                                step_clock):
    out = tmp_path / "time"
    args = ["--stage", "pretrain", *FAST, "--data", small_pretrain, "--max-time", 12, "--lr", LR, "--min-lr", MIN_LR,
            "--warmup-steps", 2, "--log-every", 1, "--save-every", 1000, "--out", out]
    rc, err = train_inproc(*args)
    assert rc == 0, err[-2000:]
    assert "--max-time 12 reached" in capsys.readouterr().out
    r = rows(out)
    assert len(r) == 24, len(r)  # 12 s of 0.5 s steps: the 24th ends on the deadline
    assert all(x["tokens_per_s"] == pytest.approx(8 * 64 / 0.5) for x in r)
    lrs = [x["lr"] for x in r[2:]]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # after warm-up: stable, then only down
    # the last step began at most one step before the deadline, so its lr is at most that step's share
    # of the decay above the floor: the decay happened before the deadline, not cut off by it
    assert lrs[-1] <= MIN_LR + (LR - MIN_LR) * 1.5 * 0.5 / (0.2 * 12)
    assert lrs[-1] < LR  # the decay began
    step = max(int(p.name.split("-")[1]) for p in out.glob("step-*"))
    state = json.loads((out / f"step-{step}" / "trainer_state" / "state.json").read_text())
    assert 12 <= state["elapsed_s"] < 13
    # a resumed run whose budget is spent ends at once (its time counts across the restart)
    copy = shutil.copytree(out, tmp_path / "again")
    rc, err = train_inproc(*args[:-1], copy, "--resume")
    assert rc == 0 and f"step-{step + 1}" not in {p.name for p in copy.glob("step-*")}, err[-2000:]


def test_start_up_counts_inside_the_time_budget_and_is_logged(small_pretrain, tmp_path, capsys, monkeypatch):
    """Preparing the model and data is wall-clock a user waits for, so --max-time includes it: the first
    checkpoint's elapsed time already holds a 3-second start-up, and the log says where it went. (No
    wall-clock bound: a loaded machine only makes the steps slower, not the count different.)"""
    import time

    import minimind.train

    class SlowSetup(minimind.train.Setup):
        def __init__(self, *args, **kwargs):
            time.sleep(3.0)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(minimind.train, "Setup", SlowSetup)
    out = tmp_path / "slow"
    rc, err = train_inproc("--stage", "pretrain", *FAST, "--data", small_pretrain, "--max-time", 600,
                           "--max-steps", 2, "--save-every", 1, "--out", out)
    assert rc == 0, err[-2000:]
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if "start-up took" in x)
    assert "counted in --max-time" in line
    assert float(line.split("model and data ")[1].split("s")[0]) >= 3.0
    state = json.loads((out / "step-1" / "trainer_state" / "state.json").read_text())
    assert state["elapsed_s"] >= 3.0  # not counted, it would be one step's time
