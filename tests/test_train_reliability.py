"""What a run directory survives: a checkpoint that tries to run code, two runs on one --out, a run that
diverges, a resume onto other data, a run killed mid-write, and the inputs that used to end in a
traceback or in a directory the same command then refused. Each test fails on the trainer of 6dd74fc."""

import json
import math
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_train import FAST, TRAIN, train, train_inproc


@pytest.fixture(scope="module")
def data(synth_dir, tokenizer_dir, tmp_path_factory):
    """The synthetic pretrain corpus and, as 'other data', its first 200 documents, both prepared."""
    from minimind.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    lines = (synth_dir / "pretrain.jsonl").read_text().splitlines()
    (out / "half.jsonl").write_text("\n".join(lines[:200]) + "\n")
    return {"pretrain": prepare("pretrain", synth_dir / "pretrain.jsonl", tokenizer_dir, out / "pretrain",
                                max_seq_len=512),
            "other": prepare("pretrain", out / "half.jsonl", tokenizer_dir, out / "other", max_seq_len=512),
            "lora": prepare("lora", synth_dir / "lora_identity.jsonl", tokenizer_dir, out / "lora", max_seq_len=64)}


def pretrain(data, *extra):
    return ["--stage", "pretrain", *FAST, "--data", data["pretrain"], "--lr", "3e-3", *extra]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished 6-step pretrain run with checkpoints at steps 3 and 6; tests copy it before touching it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    train(*pretrain(data, "--max-steps", 6, "--save-every", 3, "--keep", 5), "--out", out)
    return out


def copy_run(run, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# --------------------------------------------------------------------- item 2: no code from a checkpoint
class Payload:
    """Unpickling this calls os.system, which writes the marker file: what a crafted checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("victim", ["rng.pt", "optimizer.pt"])
def test_resume_runs_no_code_from_the_trainer_state(run, data, tmp_path, victim):
    import torch

    resumed = copy_run(run, tmp_path)
    marker = tmp_path / "pwned"
    state = resumed / "step-6" / "trainer_state"
    torch.save({"scaler": {}, "rng": Payload(marker)}, state / victim)  # rng.pt: the file older trainers wrote
    try:
        rc, err = train_inproc(*pretrain(data, "--max-steps", 7), "--out", resumed, "--resume")
    except Exception as e:  # whatever follows, the question is whether the payload ran
        rc, err = None, repr(e)
    assert not marker.exists(), "resume executed code planted in " + victim
    if victim == "optimizer.pt":  # the optimizer state is needed: refused, by name
        assert rc == 2 and "optimizer.pt" in err and "cannot resume" in err, err[-2000:]
    else:  # no longer read at all: random state lives in rng.safetensors + rng.json
        assert rc == 0, err[-2000:]
        assert (resumed / "step-7").is_dir()


def test_trainer_state_holds_no_pickle_but_the_weights_only_optimizer(run):
    state = run / "step-6" / "trainer_state"
    assert sorted(p.name for p in state.iterdir()) == ["optimizer.pt", "rng.json", "rng.safetensors", "state.json"]
    import torch

    torch.load(state / "optimizer.pt", weights_only=True)  # loads under the tensor-only unpickler
    rng = json.loads((state / "rng.json").read_text())
    assert {"python", "numpy", "scaler"} <= set(rng)


# --------------------------------------------------------------------- item 3: one run per directory
def test_a_second_run_on_a_busy_out_is_refused_and_a_killed_runs_lock_is_taken_over(data, tmp_path, capsys):
    out = tmp_path / "busy"
    args = pretrain(data, "--max-steps", 100000, "--save-every", 2)
    first = subprocess.Popen([*TRAIN, *map(str, args), "--out", str(out)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "step-2").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (out / "step-2").exists(), "the first run wrote no checkpoint"
        for extra in ([], ["--resume"]):  # neither a fresh run nor a resume may write into it
            rc, err = train_inproc(*args, "--out", out, *extra)
            assert rc == 2 and "in use" in err and f"pid {first.pid}" in err, err[-2000:]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resumed = pretrain(data, "--max-steps", 3)
    capsys.readouterr()
    rc, err = train_inproc(*resumed, "--out", out, "--resume")
    assert rc == 0, err[-2000:]
    assert "took over the lock" in capsys.readouterr().out and (out / "step-3").is_dir()


# --------------------------------------------------------------------- item 4: silent wrong results
def test_infinite_or_negative_numbers_are_refused(data, tmp_path):
    for flag, value in (("--lr", "inf"), ("--lr", "nan"), ("--grad-clip", "-1"), ("--max-time", "0")):
        rc, err = train_inproc(*pretrain(data, "--max-steps", 2), "--out", tmp_path / "x", flag, value)
        assert rc == 2 and flag in err, (flag, value, err[-2000:])
        assert not (tmp_path / "x").exists()


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(data, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "diverged"
    rc, err = train_inproc(*pretrain(data, "--max-steps", 20, "--save-every", 1, "--warmup-steps", 0,
                                     "--keep", 20), "--lr", "1e30", "--out", out)
    assert rc == 1 and "non-finite" in err and "last good checkpoint" in err, err[-2000:]
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("step-*"))
    assert steps and steps[-1] < 20, steps
    assert f"step-{steps[-1]}" in err
    for name, t in load_file(out / f"step-{steps[-1]}" / "model.safetensors").items():
        assert t.isfinite().all(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_resume_on_other_data_is_refused_but_a_moved_copy_resumes(run, data, tmp_path):
    resumed = copy_run(run, tmp_path)
    other = ["--stage", "pretrain", *FAST, "--data", data["other"], "--max-steps", 7]
    rc, err = train_inproc(*other, "--out", resumed, "--resume")
    assert rc == 2 and "not the data this run was trained on" in err and "--init" in err, err[-2000:]
    moved = Path(shutil.copytree(data["pretrain"], tmp_path / "moved"))
    rc, err = train_inproc("--stage", "pretrain", *FAST, "--data", moved, "--max-steps", 7, "--out", resumed,
                           "--resume")
    assert rc == 0, err[-2000:]


# --------------------------------------------------------------------- item 5: named errors, nothing left behind
def test_shape_and_out_errors_are_named_and_leave_nothing(data, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    cases = [
        (["--seq-len", "40000", "--out", tmp_path / "long"], "--seq-len 40000 is longer than the model's context"),
        (["--set", "vocab_size=1000", "--out", tmp_path / "small"], "vocab_size is 1000"),
        (["--out", a_file], "is a file"),
    ]
    for extra, needle in cases:
        rc, err = train_inproc(*pretrain(data, "--max-steps", 1), *extra)
        assert rc == 2 and needle in err and "Traceback" not in err, (extra, err[-2000:])
    assert not (tmp_path / "long").exists() and not (tmp_path / "small").exists()
    assert a_file.read_text() == "keep me\n"
    mine = tmp_path / "mine"  # a directory of the user's: refused, and nothing in it touched
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "todo.txt").write_text("keep me too\n")
    rc, err = train_inproc(*pretrain(data, "--max-steps", 1), "--out", mine)
    assert rc == 2 and "not empty" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes"]
    assert (mine / "notes" / "todo.txt").read_text() == "keep me too\n"


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_run_behind(data, tmp_path, monkeypatch):
    from minimind.train import Trainer

    out = tmp_path / "fresh"
    args = [*pretrain(data, "--max-steps", 2), "--out", out]

    def crash(self):
        raise RuntimeError("CUDA out of memory (simulated)")

    with monkeypatch.context() as m:  # a failure in the first step, after run.json and metrics.jsonl exist
        m.setattr(Trainer, "train_step", crash)
        with pytest.raises(RuntimeError, match="out of memory"):
            train(*args)
    assert not out.exists()
    late = tmp_path / "late.bin"  # a failure while building: --data appears only after the first try
    rc, err = train_inproc(*pretrain(data, "--max-steps", 2), "--data", late, "--out", out)
    assert rc == 2 and str(late) in err
    assert not out.exists()
    train(*args)  # the same command now simply works
    assert (out / "step-2").is_dir() and (out / "run.json").is_file()


def test_resume_names_a_corrupt_config_json(run, data, tmp_path):
    resumed = copy_run(run, tmp_path)
    (resumed / "step-6" / "config.json").write_text('{"hidden_size": 64,')
    rc, err = train_inproc(*pretrain(data, "--max-steps", 7), "--out", resumed, "--resume")
    assert rc == 2 and "step-6/config.json" in err and "Traceback" not in err, err[-2000:]
    (resumed / "step-6" / "config.json").write_text((run / "step-6" / "config.json").read_text())
    (resumed / "run.json").write_text("[]")  # without --model, resume rebuilds the model from run.json
    no_model = [a for a in pretrain(data, "--max-steps", 7) if a not in ("--model", "tiny")]
    rc, err = train_inproc(*no_model, "--out", resumed, "--resume")
    assert rc == 2 and "run.json" in err and "Traceback" not in err, err[-2000:]


# --------------------------------------------------------------------- item 8: leftovers of killed runs
def test_resume_cleans_what_a_killed_checkpoint_write_left(run, data, tmp_path, capsys):
    resumed = copy_run(run, tmp_path)
    (resumed / ".tmp-step-7-4242" / "trainer_state").mkdir(parents=True)
    (resumed / ".tmp-step-7-4242" / "model.safetensors").write_bytes(b"\0" * 1024)
    # killed between atomic_dir's two renames: the old copy of step-3 is the only one left
    (resumed / "step-3").rename(resumed / ".old-step-3-4242")
    rc, err = train_inproc(*pretrain(data, "--max-steps", 7, "--keep", 5), "--out", resumed, "--resume")
    assert rc == 0, err[-2000:]
    assert "removed 1 unfinished checkpoint" in capsys.readouterr().out
    names = sorted(p.name for p in resumed.iterdir() if p.name.startswith((".tmp", ".old", "step-")))
    assert names == ["step-3", "step-6", "step-7"], names


# --------------------------------------------------------------------- issue 25: an incomplete newest step
def test_resume_replaces_an_incomplete_newest_step_with_what_it_trained(run, data, tmp_path):
    """e630cdd resumed from step-3, trained 4-6, found step-6/ there, saved nothing and exited 0."""
    from safetensors.torch import load_file

    from minimind.checkpoint import load_checkpoint

    resumed = copy_run(run, tmp_path)
    (resumed / "step-6" / "model.safetensors").unlink()
    rc, err = train_inproc(*pretrain(data, "--max-steps", 6, "--keep", 5), "--out", resumed, "--resume")
    assert rc == 0, err[-2000:]
    _, ckpt = load_checkpoint(resumed)
    assert ckpt == resumed / "step-6"
    assert json.loads((ckpt / "trainer_state" / "state.json").read_text())["step"] == 6
    want, got = load_file(run / "step-6" / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:  # CPU fp32 runs resume bit for bit: steps 4-6 again give the same weights
        assert got[name].equal(want[name]), name


def test_an_incomplete_newer_step_never_pushes_out_a_good_checkpoint(run, data, tmp_path):
    """--keep 1 counted the broken step-6 as the newest and deleted the step-5 just saved."""
    from minimind.checkpoint import resolve_checkpoint

    resumed = copy_run(run, tmp_path)
    (resumed / "step-6" / "model.safetensors").unlink()
    rc, err = train_inproc(*pretrain(data, "--max-steps", 5, "--keep", 1), "--out", resumed, "--resume")
    assert rc == 0, err[-2000:]
    assert resolve_checkpoint(resumed) == resumed / "step-5"
    assert not (resumed / "step-3").exists()


# --------------------------------------------------------------------- papercuts
def test_vocab_size_auto_fits_the_tokenizer_and_resumes(data, tokenizer_dir, tmp_path):
    from minimind.data.tokenizer import load_tokenizer

    n = len(load_tokenizer(tokenizer_dir))
    out = tmp_path / "auto"
    rc, err = train_inproc(*pretrain(data, "--max-steps", 2, "--save-every", 1), "--set", "vocab_size=auto",
                           "--out", out)
    assert rc == 0, err[-2000:]
    vocab = json.loads((out / "step-2" / "config.json").read_text())["vocab_size"]
    assert vocab % 64 == 0 and n <= vocab < n + 64, (n, vocab)
    assert f"vocab_size={vocab}" in json.loads((out / "run.json").read_text())["overrides"]
    rc, err = train_inproc(*pretrain(data, "--max-steps", 3), "--set", "vocab_size=auto", "--out", out, "--resume")
    assert rc == 0, err[-2000:]
    assert json.loads((out / "step-3" / "config.json").read_text())["vocab_size"] == vocab


def test_a_smaller_tokenizer_than_the_model_is_reported(data, tmp_path, capsys):
    rc, err = train_inproc(*pretrain(data, "--max-steps", 1), "--out", tmp_path / "r")
    log = capsys.readouterr().out
    assert rc == 0 and "embedding rows will never be used" in log and "vocab_size=auto" in log, err[-2000:]


def test_lora_accepts_a_run_directory_like_ckpt(run, data, tmp_path):
    import torch

    from minimind.checkpoint import load_checkpoint

    lora = tmp_path / "lora"
    no_model = [a for a in FAST if a not in ("--model", "tiny")]
    train("--stage", "lora", *no_model, "--init", run, "--data", data["lora"], "--max-steps", 2, "--lr", "1e-2",
          "--out", lora)
    by_dir, _ = load_checkpoint(run, lora=lora)
    by_step, _ = load_checkpoint(run, lora=lora / "step-2")
    plain, _ = load_checkpoint(run)
    a, b, c = (m.state_dict() for m in (by_dir, by_step, plain))
    assert any(not torch.equal(a[k], c[k]) for k in a), "the adapter changed nothing"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_pickle_payload_helper_really_runs_code(tmp_path):
    """The payload tests above mean something only if unpickling the payload does run code."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_loading_a_checkpoint_does_not_warn_about_rope_scaling(tiny_ckpt):
    import warnings

    from infer.engine import Engine
    from minimind.checkpoint import load_checkpoint
    from minimind.data.tokenizer import load_tokenizer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(tiny_ckpt)
        load_tokenizer(tiny_ckpt)
        Engine.from_checkpoint(tiny_ckpt)
    assert not [w for w in caught if "rope_scaling" in str(w.message)], [str(w.message) for w in caught]
