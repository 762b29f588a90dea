"""`--dtype auto` for training on a CPU (minimind/dtype_choice.py): the candidates are timed taking
turns, bf16 is kept only when 10% faster, the choice and both figures are logged and recorded in
run.json, a resumed run keeps it, and Muon's iteration follows it. Timings are faked where the
choice is checked: this machine's real speeds must not decide what a test expects."""

import json

import pytest
import torch

from minimind import dtype_choice
from minimind.dtype_choice import choose, fastest
from tests.test_train import train_inproc

AUTO = ["--stage", "pretrain", "--model", "tiny", "--batch-size", "4", "--seq-len", "32", "--log-every", "1",
        "--device", "cpu", "--max-steps", "2", "--save-every", "2"]


def test_fastest_takes_turns_and_keeps_each_ones_best():
    calls, now = [], [0.0]
    cost = {torch.float32: 1.0, torch.bfloat16: 0.5}

    def run(dtype):
        calls.append(dtype)
        now[0] += cost[dtype] * (2.0 if len(calls) == 4 else 1.0)  # one slow turn (a busy machine) is forgotten

    dtype, times = fastest(run, rounds=2, clock=lambda: now[0])
    assert calls == [torch.float32, torch.bfloat16] * 3  # a warm-up each, then turns
    assert times == {torch.float32: 1.0, torch.bfloat16: 0.5} and dtype == torch.bfloat16


@pytest.mark.parametrize("fp32, bf16, chosen", [(1.0, 0.5, torch.bfloat16), (1.0, 0.95, torch.float32),
                                               (1.0, 30.0, torch.float32), (1.0, 1.0 / 1.1, torch.bfloat16)])
def test_bf16_only_when_ten_percent_faster(fp32, bf16, chosen):
    assert choose({torch.float32: fp32, torch.bfloat16: bf16}) == chosen


def _fake_timings(monkeypatch, fp32: float, bf16: float, seen: list):
    real = dtype_choice.train_dtype

    def timed(loss_of, params, device, rounds=1):
        real(loss_of, params, device, rounds=1)  # the real passes run (and must leave no gradients behind)
        seen.append(all(p.grad is None for p in params))
        return None, {torch.float32: fp32, torch.bfloat16: bf16}

    monkeypatch.setattr(dtype_choice, "train_dtype", timed)


def _muon_dtype(monkeypatch) -> list:
    """Records the dtype Muon's iteration runs in, step by step."""
    from minimind import optim

    used, real = [], optim.newton_schulz

    def recording(g, steps=5, eps=1e-7, dtype=None):
        used.append(dtype)
        return real(g, steps, eps, dtype)

    monkeypatch.setattr(optim, "newton_schulz", recording)
    return used


@pytest.mark.parametrize("fp32, bf16, chosen", [(0.9, 0.4, "bfloat16"), (0.4, 12.0, "float32")])
def test_auto_picks_the_faster_logs_both_and_records_it(pretrain_data, tmp_path, monkeypatch, capsys, fp32, bf16,
                                                       chosen):
    seen = []
    _fake_timings(monkeypatch, fp32, bf16, seen)
    used = _muon_dtype(monkeypatch)
    rc, err = train_inproc(*AUTO, "--data", pretrain_data, "--out", tmp_path / "run")
    assert rc == 0, err[-2000:]
    assert seen == [True]
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "--dtype auto, a forward and backward at 2 x 32" in x)
    assert f"float32 {fp32 * 1e3:.0f} ms, bfloat16 {bf16 * 1e3:.0f} ms" in line and f"{chosen} chosen" in line, line
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["dtype_chosen"] == chosen and run["dtype_timing"] == {"float32": fp32, "bfloat16": bf16}
    assert used and set(used) == {torch.bfloat16 if chosen == "bfloat16" else torch.float32}


def test_a_resumed_run_keeps_its_dtype_and_an_asked_one_is_not_timed(pretrain_data, tmp_path, monkeypatch, capsys):
    seen = []
    _fake_timings(monkeypatch, 0.9, 0.4, seen)
    out = tmp_path / "run"
    assert train_inproc(*AUTO, "--data", pretrain_data, "--out", out)[0] == 0
    _fake_timings(monkeypatch, 0.4, 12.0, seen)  # the machine changed its mind: the run must not
    used = _muon_dtype(monkeypatch)
    capsys.readouterr()
    rc, err = train_inproc(*AUTO, "--data", pretrain_data, "--out", out, "--resume", "--max-steps", "4")
    assert rc == 0, err[-2000:]
    assert "--dtype auto: bfloat16, as this run chose when it started" in capsys.readouterr().out and len(seen) == 1
    assert used and set(used) == {torch.bfloat16}
    rc, err = train_inproc(*AUTO, "--data", pretrain_data, "--out", tmp_path / "fp32", "--dtype", "float32")
    assert rc == 0 and "--dtype auto" not in capsys.readouterr().out and len(seen) == 1, err[-2000:]
    assert "dtype_chosen" not in json.loads((tmp_path / "fp32" / "run.json").read_text())


@pytest.fixture(scope="module")
def pretrain_data(synth_dir, tokenizer_dir, tmp_path_factory):
    from minimind.data.prepare import prepare

    return prepare("pretrain", synth_dir / "pretrain.jsonl", tokenizer_dir, tmp_path_factory.mktemp("auto") / "pre",
                   max_seq_len=256)
