"""The parts the Trainer is built from, each on its own: the Schedule (lr and the run's end, revised by the
measured pace), the FiniteWatch, Metrics, the plain PyTorch Backend and the Checkpointer. The whole loop
is tests/test_train.py's; these check each part's small interface without a run."""

import dataclasses
import json
import math
import random

import pytest
import torch

from minimind import objectives, schedule
from minimind.backend import Step, TorchBackend, make_backend
from minimind.checkpoint import OPTIMIZER_FILE, RNG_JSON, STATE_FILE, TRAINER_STATE, write_model_files
from minimind.checkpointer import Checkpointer, last_good, saved_any
from minimind.config import ModelConfig
from minimind.data.loader import Batch
from minimind.distributed import Dist
from minimind.metrics import Metrics
from minimind.model import MiniMindForCausalLM
from minimind.schedule import Schedule, Stopwatch
from minimind.trainconfig import TrainConfig, resolve
from minimind.watch import FiniteWatch, nonfinite_weights


class Log:
    """What the parts tell the run's log, kept."""

    def __init__(self):
        self.messages, self.rows, self.totals, self.saved, self.truncated = [], [], [], [], []

    def message(self, text):
        self.messages.append(text)

    def row(self, row, eta_s):
        self.rows.append((row, eta_s))

    def set_total(self, n):
        self.totals.append(n)

    def save(self, step, path):
        self.saved.append(step)

    def truncate_after(self, step):
        self.truncated.append(step)


@pytest.fixture
def fake_clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(schedule, "clock", lambda: now[0])
    return now


def cfg(tmp_path, **knobs) -> TrainConfig:
    (tmp_path / "data").mkdir(exist_ok=True)
    return resolve(TrainConfig(**{"stage": "pretrain", "data": str(tmp_path / "data"), "out": str(tmp_path / "run"),
                                  "device": "cpu", "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, **knobs}))


# ----------------------------------------------------------------- Schedule
def test_the_schedule_is_sized_by_the_first_end_and_decays_to_the_floor(tmp_path, fake_clock):
    c = cfg(tmp_path, max_steps=50, max_tokens=10_000, schedule="wsd")
    s = Schedule(c, batches_per_epoch=1000, tokens_per_step=400, stopwatch=Stopwatch(), log=Log())
    assert s.total_steps == 25  # 10 000 tokens at 400 a step end before 50 steps
    lrs = [s.lr(step) for step in range(25)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)  # warm-up, then flat
    assert lrs[-1] == pytest.approx(1e-4) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert "sized to the budget --max-tokens 10000" in s.describe() and not s.estimated


def test_a_time_budget_revises_the_length_from_the_pace_and_ends_the_run(tmp_path, fake_clock):
    log = Log()
    s = Schedule(cfg(tmp_path, max_time=10.0), batches_per_epoch=4, tokens_per_step=64, stopwatch=Stopwatch(), log=log)
    assert s.estimated and s.cfg.schedule == "wsd"
    fake_clock[0] += 2.0  # 4 steps in 2 s: 20 steps in the budget
    s.lr(4)
    assert s.total_steps == 20 and log.totals == [20]
    assert s.eta(4, 0.5) == pytest.approx(8.0)  # the budget's 8 s left, not 16 steps' pace
    assert not s.done(4, tokens=0, epoch=lambda: 0.0)
    fake_clock[0] += 8.0
    assert s.done(20, tokens=0, epoch=lambda: 0.0) and log.messages == ["--max-time 10 reached at step 20"]
    assert s.state_dict() == {"total_steps": 20, "elapsed_s": 10.0}
    again = Schedule(s.cfg, batches_per_epoch=4, tokens_per_step=64, stopwatch=Stopwatch(), log=Log())
    again.load_state_dict({"elapsed_s": 10.0})  # a resumed run has spent its budget already
    assert again.done(20, tokens=0, epoch=lambda: 0.0)


def test_epochs_end_the_run_by_the_data(tmp_path, fake_clock):
    s = Schedule(cfg(tmp_path, epochs=2.0), batches_per_epoch=10, tokens_per_step=1, stopwatch=Stopwatch(), log=Log())
    assert s.total_steps == 20
    assert not s.done(5, tokens=0, epoch=lambda: 1.5) and s.done(5, tokens=0, epoch=lambda: 2.0)


# ----------------------------------------------------------------- FiniteWatch
def step_of(loss, grad_norm=1.0, weight=1.0) -> Step:
    return Step(sums={"loss": torch.tensor(loss, dtype=torch.float64)}, grad_norm=torch.tensor(grad_norm),
                weight=weight, tokens=8, useful=8)


def read(step):
    return {"loss": float(step.sums["loss"]), "grad_norm": float(step.grad_norm)}


def test_the_watch_names_a_non_finite_step_once_enough_come_in_a_row():
    watch = FiniteWatch()
    assert watch.check(read) is None  # nothing watched yet
    watch.watch(step_of(2.0))
    assert watch.check(read) is None
    watch.watch(step_of(math.nan))
    watch.watch(step_of(1.0, grad_norm=math.inf))
    assert watch.check(read) == "non-finite grad_norm (grad_norm inf); 2 such steps in a row"
    watch.watch(step_of(2.0))
    watch.watch(step_of(math.nan))
    assert watch.check(read) == "non-finite loss (loss nan)"
    tolerant = FiniteWatch(tolerated=5)  # fp16: GradScaler skips a few such steps by design
    for _ in range(4):
        tolerant.watch(step_of(math.nan))
    assert tolerant.check(read) is None
    for _ in range(5):
        tolerant.watch(step_of(math.nan))
    assert tolerant.check(read) == "non-finite loss (loss nan); 9 such steps in a row"


def test_nonfinite_weights_names_them():
    model = torch.nn.Linear(2, 2)
    assert nonfinite_weights(model) == []
    with torch.no_grad():
        model.bias[0] = math.nan
    assert nonfinite_weights(model) == ["bias"]


# ----------------------------------------------------------------- Metrics
def tiny() -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(ModelConfig.from_preset("tiny", kernels="torch"))


def test_metrics_count_tokens_read_a_step_and_write_a_row():
    log = Log()
    m = Metrics(log=log, dist=Dist(), model=tiny(), seq_len=16, device=torch.device("cpu"), dtype=torch.float32)
    step = Step(sums={"loss": torch.tensor(6.0, dtype=torch.float64), "aux_loss": torch.tensor(0.0),
                      "accuracy": torch.tensor(0.5, dtype=torch.float64)},
                grad_norm=torch.tensor(0.25), weight=3.0, tokens=32, useful=24)
    m.count(step)
    m.count(step)
    assert m.tokens_so_far() == 64 and m.tokens_seen == 0
    row = m.row(step, number=2, lr=1e-3, seconds=2.0, elapsed=7.12345)
    assert row == {"loss": 2.0, "grad_norm": 0.25, "accuracy": 0.5, "step": 2, "lr": 1e-3, "tokens_per_s": 32.0,
                   "useful_tokens_per_s": 24.0, "tokens": 64, "elapsed_s": 7.123}
    assert list(row)[:2] == ["loss", "grad_norm"]  # metrics.jsonl's key order
    m.write(row, eta_s=5.0)
    assert log.rows == [(row, 5.0)] and row["mfu"] is None  # no peak known on a CPU
    assert m.state_dict() == {"tokens_seen": 64}


# ----------------------------------------------------------------- Backend
def batch(vocab: int, b: int = 2, t: int = 16) -> Batch:
    ids = torch.randint(vocab, (b, t + 1), generator=torch.Generator().manual_seed(1))
    return Batch(ids[:, :-1], ids[:, 1:], torch.ones(b, t), None)


def test_the_torch_backend_steps_sets_the_lr_and_round_trips_its_state(tmp_path):
    model = tiny()
    c = cfg(tmp_path, optim="adamw", dtype="float32")
    backend = make_backend(model, cfg=c, trainable=list(model.parameters()), device=torch.device("cpu"),
                           dtype=torch.float32, dist=Dist(), log=Log())
    assert isinstance(backend, TorchBackend) and backend.model is model
    backend.set_lr(5e-4)
    assert {g["lr"] for g in backend.optimizer.param_groups} == {5e-4 * g.get("lr_scale", 1.0)
                                                                 for g in backend.optimizer.param_groups}
    before = [p.detach().clone() for p in model.parameters()]
    b = batch(model.config.vocab_size)
    step = backend.step([(b, b), (b, b)], objectives.CausalLM())  # two micro-batches
    assert step.tokens == 64 and step.useful == 64 and float(step.weight) == 64.0
    assert torch.isfinite(step.sums["loss"]) and float(step.grad_norm) > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step
    state = backend.state_dict()
    fresh = make_backend(tiny(), cfg=c, trainable=list(model.parameters()), device=torch.device("cpu"),
                         dtype=torch.float32, dist=Dist(), log=Log())
    fresh.load_state_dict({"optimizer": state["optimizer"], "scaler": state["scaler"], "deepspeed": None})
    assert fresh.optimizer.state_dict()["state"].keys() == state["optimizer"]["state"].keys()
    assert backend.nonfinite_weights() == []


# ----------------------------------------------------------------- Checkpointer
class Setup:
    """What the Checkpointer asks of a stages.Setup."""

    def __init__(self, model):
        self.model, self.device, self.tokenizer_dir = model, torch.device("cpu"), None
        self.position = {"epoch": 0, "row": 5}

    def data_fingerprint(self):
        return "abc"

    def write_weights(self, tmp):
        write_model_files(tmp, self.model)

    def load_weights(self, ckpt):
        from minimind.checkpoint import load_state_into, load_weights

        load_state_into(self.model, load_weights(ckpt), ckpt)

    def checkpoint_tensors(self):
        return list(self.model.state_dict().values())

    def loader_state(self):
        return self.position

    def load_loader_state(self, state):
        self.position = state


def test_the_checkpointer_saves_keeps_the_newest_and_resumes(tmp_path):
    c = dataclasses.replace(cfg(tmp_path, optim="adamw"), keep=2)
    (tmp_path / "run").mkdir()
    model = tiny()
    backend = TorchBackend(model, optimizer=torch.optim.AdamW(model.parameters()), dist=Dist(),
                           scaler=torch.amp.GradScaler("cpu", enabled=False), trainable=list(model.parameters()),
                           device=torch.device("cpu"), dtype=torch.float32, grad_clip=1.0)
    log = Log()
    ckpt = Checkpointer(c, setup=Setup(model), dist=Dist(), log=log)
    assert not saved_any(tmp_path / "run") and last_good(tmp_path / "run") == "No checkpoint was written."
    random.seed(7)
    for step in (1, 2, 3):
        ckpt.save(step, {"step": step, "tokens_seen": 64 * step, "total_steps": 9, "elapsed_s": 1.5}, backend)
    ckpt.save(3, {"step": 3}, backend)  # the same step again: nothing written
    kept = sorted(p.name for p in (tmp_path / "run").glob("step-*"))
    assert kept == ["step-2", "step-3"] and log.saved == [1, 2, 3]
    state_dir = tmp_path / "run" / "step-3" / TRAINER_STATE
    state = json.loads((state_dir / STATE_FILE).read_text())
    assert list(state) == ["step", "tokens_seen", "total_steps", "elapsed_s", "world_size", "data", "stage",
                           "data_fingerprint"]
    assert (state_dir / OPTIMIZER_FILE).is_file() and (state_dir / RNG_JSON).is_file()
    assert last_good(tmp_path / "run") == f"The last good checkpoint is {tmp_path / 'run' / 'step-3'}."
    expected = random.random()

    other = tiny()
    torch.nn.init.zeros_(other.model.embed_tokens.weight)
    setup = Setup(other)
    setup.position = None
    log = Log()
    again = Checkpointer(c, setup=setup, dist=Dist(), log=log)
    random.seed(0)
    resumed = again.resume()
    assert random.random() == expected  # the random state as it was when step 3 was saved
    assert resumed.trainer["step"] == 3 and resumed.trainer["tokens_seen"] == 192
    assert resumed.backend["optimizer"] is not None and resumed.backend["deepspeed"] is None
    assert torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert setup.position == {"epoch": 0, "row": 5} and again.saved_step == 3
    again.announce(resumed)
    assert log.truncated == [3] and log.messages[-1].startswith("resumed from")


def test_the_checkpointer_refuses_another_stage_data_or_optimizer(tmp_path):
    c = cfg(tmp_path, optim="adamw")
    (tmp_path / "run").mkdir()
    model = tiny()
    backend = TorchBackend(model, optimizer=torch.optim.AdamW(model.parameters()), dist=Dist(),
                           scaler=torch.amp.GradScaler("cpu", enabled=False), trainable=list(model.parameters()),
                           device=torch.device("cpu"), dtype=torch.float32, grad_clip=1.0)
    Checkpointer(c, setup=Setup(model), dist=Dist(), log=Log()).save(
        1, {"step": 1, "tokens_seen": 0, "total_steps": 2, "elapsed_s": 0.0}, backend)
    from minimind.errors import UsageError

    for changed, needle in ((dict(stage="sft"), "is a 'pretrain' run"), (dict(optim="muon"), "--optim adamw")):
        with pytest.raises(UsageError, match=needle):
            Checkpointer(dataclasses.replace(c, **changed), setup=Setup(tiny()), dist=Dist(), log=Log()).resume()
    moved = Setup(tiny())
    moved.data_fingerprint = lambda: "other"
    with pytest.raises(UsageError, match="not the data this run was trained on"):
        Checkpointer(c, setup=moved, dist=Dist(), log=Log()).resume()


def test_a_trainer_is_built_from_a_config_and_bench_calls_no_private_method():
    import inspect
    import re

    from minimind.train import Trainer
    from tests.conftest import ROOT

    assert list(inspect.signature(Trainer).parameters) == ["cfg"]
    bench = (ROOT / "bench" / "bench_train.py").read_text()
    assert "add_train_arguments" not in bench and "TrainConfig(" in bench
    for name in ("bench_train.py", "sync_check.py"):
        assert not re.search(r"\b(trainer|tr)\._", (ROOT / "bench" / name).read_text()), name
