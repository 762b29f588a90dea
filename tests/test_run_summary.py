"""What a run records of its cost: metrics.jsonl rows carry the run's wall-clock and tokens so far, and
DIR/summary.json says what the run was (model, device, dtype, code, data) and where its time went, at
every save (unfinished) and at its end; a resumed run goes on counting. Real `tiny` runs on 40
documents, as tests/test_budget.py makes them."""

import json
import math
import re
import shutil
import signal
import subprocess

import pytest
import torch

from minimind import summary
from minimind.checkpoint import CheckpointError, read_trainer_state
from tests.conftest import ROOT
from tests.test_budget import small_pretrain, step_clock  # noqa: F401 (fixtures)
from tests.test_train import FAST, metrics, train_inproc

PER_STEP = 8 * 64  # FAST: batch 8 x seq_len 64, packed: every position a token
KEYS = ["format", "stage", "finished", "model", "device", "device_name", "world_size", "dtype", "optim", "code",
        "data", "steps", "tokens_seen", "elapsed_s", "tokens_per_s", "mfu", "spent_s"]


def read_summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def assert_adds_up(s: dict):
    assert list(s["spent_s"]) == list(summary.PARTS)
    assert all(v >= 0 for v in s["spent_s"].values()), s["spent_s"]
    assert math.isclose(sum(s["spent_s"].values()), s["elapsed_s"], abs_tol=1e-2), s["spent_s"]


@pytest.fixture(scope="module")
def raw_run(synth_dir, tokenizer_dir, small_pretrain, tmp_path_factory):  # noqa: F811
    """4 steps on raw jsonl (prepared by the run), saved at step 2 and 4, held-out loss at the end; every
    summary.json written, as (finished, steps)."""
    d = tmp_path_factory.mktemp("raw")
    lines = (synth_dir / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    (d / "small.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    written, write = [], summary.write

    def recorded(out, record):
        written.append((record["finished"], record["steps"]))
        write(out, record)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(summary, "write", recorded)
        rc, err = train_inproc("--stage", "pretrain", *FAST, "--data", d / "small.jsonl", "--tokenizer", tokenizer_dir,
                               "--val-data", small_pretrain, "--max-steps", 4, "--save-every", 2, "--out", d / "run")
    assert rc == 0, err[-2000:]
    return d / "run", d / "small.jsonl", written


def test_rows_carry_the_wall_clock_and_the_tokens_so_far(raw_run):
    out, _, _ = raw_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["tokens"] for r in rows] == [r["step"] * PER_STEP for r in rows]
    clock = [r["elapsed_s"] for r in rows]
    assert all(a < b for a, b in zip(clock, clock[1:])), clock
    assert 0 < clock[-1] <= read_summary(out)["elapsed_s"]


def test_the_summary_of_a_finished_run(raw_run, small_pretrain):  # noqa: F811
    out, data, written = raw_run
    s, last = read_summary(out), metrics(out)[-1]
    assert list(s) == KEYS and s["format"] == 1 and s["stage"] == "pretrain"
    assert s["finished"] is True and s["steps"] == last["step"] == 4 and s["tokens_seen"] == last["tokens"]
    assert_adds_up(s)
    spent = s["spent_s"]
    assert spent["data preparation"] > 0 and spent["checkpoints"] > 0 and spent["evaluation"] > 0
    assert spent["compile"] == 0 and spent["dtype timing"] == 0 and spent["training"] > 0
    assert s["tokens_per_s"] == pytest.approx(s["tokens_seen"] / spent["training"], rel=1e-3)
    assert s["mfu"] is None and s["device"] == "cpu" and s["device_name"] and s["world_size"] == 1
    assert s["dtype"] == "float32" and s["optim"] == json.loads((out / "run.json").read_text())["optim"]
    from minimind.config import ModelConfig
    from minimind.model import MiniMindForCausalLM

    params = MiniMindForCausalLM(ModelConfig.from_preset("tiny", kernels="torch")).num_params()
    assert s["model"] == {"params_total": params, "params_active": params, "preset": "tiny"}
    state = json.loads((out / "step-4" / "trainer_state" / "state.json").read_text())
    meta = json.loads((next((out.parent / ".minimind-cache").iterdir()) / "meta.json").read_text())
    assert s["data"] == {"path": str(data), "source": str(data.resolve()), "documents": 40,
                         "tokens": meta["num_tokens"], "fingerprint": state["data_fingerprint"]}
    assert written[0] == (False, 2) and written[-1] == (True, 4)  # at every save, then once more at the end
    assert all(finished is False for finished, _ in written[:-1]) and {n for _, n in written} == {2, 4}


def test_the_code_is_named_by_its_commit(raw_run):
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no git checkout here")
    code = read_summary(raw_run[0])["code"]
    assert re.fullmatch(r"[0-9a-f]{40}", code["commit"]) and code["commit"] == head
    assert isinstance(code["dirty"], bool)


def test_code_outside_a_checkout_or_untracked_in_one_is_none(tmp_path):
    assert summary.code_version(tmp_path) == {"commit": None, "dirty": None}
    if shutil.which("git") is None:
        pytest.skip("git is missing")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "empty"], check=True)
    (tmp_path / "venv" / "minimind").mkdir(parents=True)
    (tmp_path / "venv" / "minimind" / "__init__.py").write_text("")
    assert summary.code_version(tmp_path / "venv" / "minimind") == {"commit": None, "dirty": None}
    subprocess.run([*git, "add", "venv"], check=True)
    code = summary.code_version(tmp_path / "venv" / "minimind")
    assert re.fullmatch(r"[0-9a-f]{40}", code["commit"]) and code["dirty"] is True


@pytest.fixture(scope="module")
def prepared_run(small_pretrain, tmp_path_factory):  # noqa: F811
    """3 steps on a prepared directory, saved at the end only, held-out loss at the end."""
    out = tmp_path_factory.mktemp("prepared") / "run"
    rc, err = train_inproc("--stage", "pretrain", *FAST, "--data", small_pretrain, "--val-data", small_pretrain,
                           "--max-steps", 3, "--save-every", 1000, "--out", out)
    assert rc == 0, err[-2000:]
    return out


def test_prepared_data_takes_no_preparation(prepared_run):
    s = read_summary(prepared_run)
    assert s["spent_s"]["data preparation"] == 0 and s["spent_s"]["model and data"] > 0
    assert s["finished"] is True and s["data"]["source"] is not None
    assert_adds_up(s)


def test_a_resumed_run_goes_on_counting(prepared_run, small_pretrain, tmp_path):  # noqa: F811
    """From what its checkpoint recorded: the first run's summary also holds the writing of that checkpoint,
    which the checkpoint cannot (nor its elapsed_s), so the resumed run's checkpoints are compared with the
    checkpoint's; the exact sums are the next test's."""
    first = read_summary(prepared_run)
    saved = json.loads((prepared_run / "step-3" / "trainer_state" / "state.json").read_text())["spent_s"]
    assert saved["evaluation"] == first["spent_s"]["evaluation"]  # the held-out loss came before the save
    out = shutil.copytree(prepared_run, tmp_path / "run")
    rc, err = train_inproc("--stage", "pretrain", *FAST, "--data", small_pretrain, "--val-data", small_pretrain,
                           "--max-steps", 6, "--save-every", 1, "--out", out, "--resume")
    assert rc == 0, err[-2000:]
    s = read_summary(out)
    assert s["finished"] is True and s["steps"] == 6 and s["tokens_seen"] == 6 * PER_STEP
    assert_adds_up(s)
    assert s["elapsed_s"] > first["elapsed_s"]
    for part in ("model and data", "checkpoints", "evaluation", "training"):  # the first run's, then more
        assert s["spent_s"][part] > saved[part], part
    assert all(s["spent_s"][part] > first["spent_s"][part] for part in ("model and data", "evaluation", "training"))
    assert [r["tokens"] for r in metrics(out)] == [n * PER_STEP for n in range(1, 7)]


def test_a_resumed_run_adds_its_time_to_the_first_runs_by_part(small_pretrain, tmp_path, monkeypatch,  # noqa: F811
                                                                step_clock):  # noqa: F811
    """On a clock that moves 0.5 s per forward and 0.25 s per checkpoint written, every part is known: the
    resumed run's is the first run's (as its checkpoint recorded it) plus its own."""
    import minimind.checkpointer

    write_rng_state = minimind.checkpointer.write_rng_state

    def slow_write(*args, **kwargs):
        step_clock[0] += 0.25
        return write_rng_state(*args, **kwargs)

    monkeypatch.setattr(minimind.checkpointer, "write_rng_state", slow_write)
    out = tmp_path / "run"
    args = ["--stage", "pretrain", *FAST, "--data", small_pretrain, "--val-data", small_pretrain, "--out", out]
    rc, err = train_inproc(*args, "--max-steps", 3, "--save-every", 1000)
    assert rc == 0, err[-2000:]
    first = read_summary(out)["spent_s"]
    evaluation = first["evaluation"]
    assert evaluation > 0 and first == {**dict.fromkeys(summary.PARTS, 0.0), "checkpoints": 0.25,
                                        "evaluation": evaluation, "training": 1.5}
    rc, err = train_inproc(*args, "--max-steps", 6, "--save-every", 1, "--resume")  # saves steps 4, 5 and 6
    assert rc == 0, err[-2000:]
    s = read_summary(out)
    assert s["spent_s"] == {**first, "checkpoints": 0.75, "evaluation": 2 * evaluation, "training": 3.0}
    assert s["elapsed_s"] == 3.75 + 2 * evaluation  # step-3's own writing is in neither run's clock


def test_a_run_stopped_by_a_signal_has_not_finished(small_pretrain, tmp_path, monkeypatch):  # noqa: F811
    import minimind.train

    train_step = minimind.train.Trainer.train_step

    def interrupted_at_step_2(self):
        if self.step == 1:
            signal.raise_signal(signal.SIGINT)  # SaveOnSignal's: step 2 ends, is saved, the run exits
        return train_step(self)

    monkeypatch.setattr(minimind.train.Trainer, "train_step", interrupted_at_step_2)
    out = tmp_path / "run"
    rc, err = train_inproc("--stage", "pretrain", *FAST, "--data", small_pretrain, "--max-steps", 5, "--out", out)
    assert rc == 128 + signal.SIGINT, err[-2000:]
    s = read_summary(out)
    assert s["finished"] is False and s["steps"] == 2 and s["tokens_seen"] == 2 * PER_STEP
    assert (out / "step-2").is_dir()
    assert_adds_up(s)


def test_the_first_step_of_a_compiled_run_counts_as_compile(small_pretrain, tmp_path, monkeypatch,  # noqa: F811
                                                            step_clock):  # noqa: F811
    """torch.compile left out (compiling on a CPU takes minutes); the clock moves half a second per
    forward, so every part's time is known: the first step's 0.5 s is compilation."""
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    out = tmp_path / "run"
    rc, err = train_inproc("--stage", "pretrain", *FAST, "--data", small_pretrain, "--max-steps", 3,
                           "--save-every", 1000, "--compile", "--out", out)
    assert rc == 0, err[-2000:]
    assert [r["elapsed_s"] for r in metrics(out)] == [0.5, 1.0, 1.5]
    s = read_summary(out)
    assert s["elapsed_s"] == 1.5 and s["spent_s"]["compile"] == 0.5 and s["spent_s"]["training"] == 1.0
    assert s["tokens_per_s"] == 3 * PER_STEP / 1.0
    assert_adds_up(s)


def test_spent_counts_on_top_of_an_earlier_runs_and_training_is_the_rest():
    spent = summary.Spent()
    spent.load_state_dict({})  # a checkpoint from before spent_s: zeros
    spent.add("checkpoints", 2.0)
    spent.started(5.0)
    assert spent.split(10.0) == {**dict.fromkeys(summary.PARTS, 0.0), "model and data": 5.0, "checkpoints": 2.0,
                                 "training": 3.0}
    spent.load_state_dict({"checkpoints": 1.0, "evaluation": 4.0, "training": 99.0})  # training: what is left
    assert spent.split(20.0)["checkpoints"] == 3.0 and spent.split(20.0)["training"] == 20.0 - 5 - 3 - 4
    assert spent.split(1.0)["training"] == 0.0  # never negative


def test_the_writer_writes_an_unfinished_summary_whole(tmp_path):
    summary.write(tmp_path, {"format": 1, "finished": False})
    assert json.loads((tmp_path / "summary.json").read_text())["finished"] is False
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left


@pytest.mark.parametrize("spent, ok", [({"training": 1.5, "compile": 0}, True), ({"training": -1.0}, False),
                                       ({"training": float("nan")}, False), ([1.0], False),
                                       ({"training": "1"}, False), ({"training": True}, False)])
def test_state_json_spent_s_is_checked(tmp_path, spent, ok):
    state = {"step": 1, "tokens_seen": 0, "world_size": 1, "stage": "pretrain", "data": {}, "spent_s": spent}
    (tmp_path / "state.json").write_text(json.dumps(state))
    if ok:
        assert read_trainer_state(tmp_path)["spent_s"] == spent
    else:
        with pytest.raises(CheckpointError, match="'spent_s'"):
            read_trainer_state(tmp_path)
