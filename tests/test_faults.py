"""Faults from outside (issue 25, items 4 and 5): a full disk under every writer, and a command killed
or interrupted. A full disk is a named error (what, where, the space needed and free; exit 1, no
traceback) that leaves the previous checkpoint resumable and no partial output, so the same command
then works; a stopped `prepare` leaves no worker and no temp dir; Ctrl-C never prints a traceback, and a
second one ends a run (GRPO included) at once.

The full disk is real where this machine lets root mount a small tmpfs, and faked everywhere (CI
included): `FakeFullDisk` makes the writers' own calls fail the way a full file system fails them."""

import errno
import fnmatch
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_train import FAST, TRAIN, train_inproc

CLI = [sys.executable, "-m", "minimind.cli"]
NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' words


# --------------------------------------------------------------------- a disk that fills up, faked
class FakeFullDisk:
    """Writes to files under `root` whose name matches `pattern` fail once `free` bytes are spent, as on
    a full file system: what fits is written, then OSError(ENOSPC), or safetensors' own SafetensorError.
    Patched where the writers write: open (builtins, io: Path.write_text), safetensors' save_file, and
    the os.write metrics.jsonl is appended with."""

    def __init__(self, monkeypatch, root: Path, free: int, pattern: str = "*"):
        self.root, self.free, self.pattern = Path(root).resolve(), free, pattern
        self.failed = 0
        self.real_open = real_open = io.open

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax") and self.hit(file):
                return _Budgeted(f, self)
            return f

        for target in (__import__("builtins"), io):
            monkeypatch.setattr(target, "open", fake_open)
        import safetensors.torch

        import minimind.checkpoint
        import minimind.interop.export
        import minimind.trainlog

        real_save_file = safetensors.torch.save_file
        for module in (safetensors.torch, minimind.checkpoint, minimind.interop.export):
            monkeypatch.setattr(module, "save_file", lambda t, path, metadata=None: self.save_file(
                real_save_file, t, path, metadata))
        fake_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
        fake_os.write = self.os_write
        monkeypatch.setattr(minimind.trainlog, "os", fake_os)

    def hit(self, path) -> bool:
        path = Path(path).resolve()
        return self.root in path.parents and fnmatch.fnmatch(path.name, self.pattern)

    def spend(self, n: int) -> int:
        """-> how many of n bytes fit; fewer means the write then fails."""
        fits = max(0, min(n, self.free))
        self.free -= fits
        self.failed += fits < n
        return fits

    def full(self):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save_file(self, real, tensors, path, metadata):
        if not self.hit(path):
            return real(tensors, path, metadata=metadata)
        from safetensors import SafetensorError
        from safetensors.torch import save

        data = save(tensors, metadata=metadata)
        fits = self.spend(len(data))
        with self.real_open(path, "wb") as f:  # the budget is spent above: not through the patched open again
            f.write(data[:fits])
        if fits < len(data):
            raise SafetensorError(NO_SPACE)

    def os_write(self, fd: int, data) -> int:
        if not self.hit(os.readlink(f"/proc/self/fd/{fd}")):
            return os.write(fd, data)
        fits = self.spend(len(data))
        if fits < len(data):
            os.write(fd, bytes(data[:fits]))
            raise self.full()
        return os.write(fd, data)


class _Budgeted:
    """A file whose writes spend a FakeFullDisk's free bytes."""

    def __init__(self, f, disk: FakeFullDisk):
        self._f, self._disk = f, disk

    def write(self, data):
        fits = self._disk.spend(len(data))
        if fits < len(data):
            self._f.write(data[:fits])
            self._f.flush()
            raise self._disk.full()
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def cli_inproc(*args) -> tuple[int, str]:
    """-> (exit code, stderr) of `minimind ARGS`, run in this process."""
    import contextlib

    from minimind.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in args])
    return rc, err.getvalue()


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if ".tmp" in p.name or ".old" in p.name)


# --------------------------------------------------------------------- shared inputs
@pytest.fixture(scope="module")
def data(synth_dir, tokenizer_dir, tmp_path_factory):
    """Prepared pretrain and grpo data, a small text file for `eval ppl`, and a 22 MB pretrain jsonl
    (the synthetic corpus 30 times) that `prepare` takes seconds on."""
    from minimind.data.prepare import prepare

    out = tmp_path_factory.mktemp("faults-data")
    text = (synth_dir / "pretrain.jsonl").read_text()
    (out / "big.jsonl").write_text(text * 30)
    (out / "few.jsonl").write_text("".join(text.splitlines(keepends=True)[:8]))
    return {"pretrain": prepare("pretrain", synth_dir / "pretrain.jsonl", tokenizer_dir, out / "pretrain",
                                max_seq_len=512),
            "grpo": prepare("grpo", synth_dir / "rlaif.jsonl", tokenizer_dir, out / "grpo", max_seq_len=64),
            "big": out / "big.jsonl", "few": out / "few.jsonl"}


def pretrain(data, *extra):
    return ["--stage", "pretrain", *FAST, "--data", data["pretrain"], "--lr", "3e-3", "--keep", "5", *extra]


def commands(synth_dir, tokenizer_dir, tiny_ckpt, data, out: Path) -> dict[str, tuple[list, str]]:
    """Each writer's command with its output in `out` (on the disk that fills up), and what its error
    names: {name: (argv, what)}."""
    return {
        "synth": (["synth", "--out", out / "synth", "--scale", "0.2"], "the synthetic corpus"),
        "tokenizer": (["tokenizer", "--input", synth_dir / "sft.jsonl", "--vocab-size", "400", "--out",
                       out / "tok"], "the tokenizer"),
        "prepare": (["prepare", "--stage", "pretrain", "--input", synth_dir / "pretrain.jsonl", "--tokenizer",
                     tokenizer_dir, "--out", out / "prepared", "--workers", "2"], "prepared data"),
        "export": (["export", "--ckpt", tiny_ckpt, "--out", out / "hf"], "the export"),
        "report": (["eval", "ppl", "--ckpt", tiny_ckpt, "--data", data["few"], "--seq-len", "32", "--report",
                    out / "report.json"], "the report"),
    }


# which file of each command the fake disk fills on (the others write as usual), and the bytes that fit
FAKE_FULL_AT = {"synth": ("sft.jsonl", 1000), "tokenizer": ("tokenizer_config.json", 100),
                "prepare": ("tokens.bin", 100_000), "export": ("model.safetensors", 1000),
                "report": ("*report*", 10)}


def assert_named_and_clean(rc: int, err: str, what: str, out: Path):
    assert rc == 1, err[-3000:]
    assert "disk full" in err and what in err and "free there" in err and "Traceback" not in err, err[-3000:]
    assert "needs" in err, err[-3000:]  # how much space the write needed
    assert not any(out.iterdir()), sorted(p.name for p in out.iterdir())  # no partial output, no temp


# --------------------------------------------------------------------- item 4: a full disk, faked
@pytest.mark.parametrize("name", sorted(FAKE_FULL_AT))
def test_a_full_disk_is_named_and_leaves_nothing_faked(name, synth_dir, tokenizer_dir, tiny_ckpt, data, tmp_path,
                                                       monkeypatch):
    out = tmp_path / "disk"
    out.mkdir()
    argv, what = commands(synth_dir, tokenizer_dir, tiny_ckpt, data, out)[name]
    pattern, free = FAKE_FULL_AT[name]
    with monkeypatch.context() as m:
        disk = FakeFullDisk(m, out, free=free, pattern=pattern)
        rc, err = cli_inproc(*argv)
    assert disk.failed, "the fake disk never filled: the test tests nothing"
    assert_named_and_clean(rc, err, what, out)
    rc, err = cli_inproc(*argv)  # the same command, without --force, once there is space
    assert rc == 0, err[-3000:]


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_one_resumable_faked(data, tmp_path, monkeypatch):
    from minimind.checkpoint import load_checkpoint

    run = tmp_path / "run"
    args = pretrain(data, "--max-steps", 4, "--save-every", 2)
    with monkeypatch.context() as m:  # step-2's weights fit (about 4.9 MB), step-4's do not
        disk = FakeFullDisk(m, run, free=7_000_000, pattern="model.safetensors")
        rc, err = train_inproc(*args, "--out", run)
    assert disk.failed
    assert rc == 1 and "disk full" in err and "checkpoint step-4" in err and "needs about" in err, err[-3000:]
    assert "Traceback" not in err and f"{run / 'step-2'}" in err and "--resume" in err, err[-3000:]
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".lock")) == [
        "loss.png", "metrics.jsonl", "run.json", "step-2", "summary.json"]
    assert leftovers(run) == []
    load_checkpoint(run / "step-2")
    rc, err = train_inproc(*args, "--out", run, "--resume")
    assert rc == 0, err[-3000:]
    assert (run / "step-4" / "model.safetensors").is_file()


def test_a_full_disk_on_the_first_save_leaves_no_run_and_the_same_command_works_faked(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = [*pretrain(data, "--max-steps", 2), "--out", run]
    with monkeypatch.context() as m:
        FakeFullDisk(m, run, free=0, pattern="optimizer.pt")  # torch's writer: its error hides the errno
        rc, err = train_inproc(*args)
    assert rc == 1 and "disk full" in err and "checkpoint step-2" in err and "Traceback" not in err, err[-3000:]
    assert not run.exists()
    rc, err = train_inproc(*args)
    assert rc == 0, err[-3000:]


def test_a_full_disk_while_logging_metrics_keeps_whole_lines_faked(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = pretrain(data, "--max-steps", 3, "--save-every", 1)
    with monkeypatch.context() as m:  # the first row (~200 bytes) fits, the second is cut short
        disk = FakeFullDisk(m, run, free=300, pattern="metrics.jsonl")
        rc, err = train_inproc(*args, "--out", run)
    assert disk.failed
    assert rc == 1 and "disk full" in err and "metrics.jsonl" in err and "Traceback" not in err, err[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # each line whole
    assert [r["step"] for r in rows] == [1]
    rc, err = train_inproc(*args, "--out", run, "--resume")
    assert rc == 0, err[-3000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_disk_full_is_recognised_in_every_shape_writers_raise_it():
    from safetensors import SafetensorError

    from minimind.faults import DiskFull, is_disk_full, writing

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
    except RuntimeError as e:  # torch.save through a Python file: the OSError is the context
        torch_error = e
    for e in (OSError(errno.ENOSPC, "x"), OSError(errno.EDQUOT, "x"), SafetensorError(NO_SPACE), torch_error):
        assert is_disk_full(e), e
    for e in (OSError(errno.EACCES, "Permission denied"), RuntimeError("unexpected pos"), ValueError("x")):
        assert not is_disk_full(e), e
    with pytest.raises(DiskFull, match=r"writing the thing to /x/y needs about 1.5 KB; .* free there"):
        with writing("the thing", "/x/y", need=1536):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError):
        with writing("the thing", "/x/y"):
            raise PermissionError(errno.EACCES, "Permission denied")


# --------------------------------------------------------------------- item 4: a full disk, for real
@pytest.fixture
def small_disk(tmp_path):
    """-> mount(size) -> a fresh tmpfs of that size: a file system that really fills. Needs root and a
    kernel that lets it mount; where it cannot, the test skips (the faked tests above still run)."""
    mounted = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"disk{len(mounted)}"
        mnt.mkdir()
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                               capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"cannot mount a tmpfs here ({e})")
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def fill(disk: Path, leave: int) -> Path:
    """Fills `disk` with one file until `leave` bytes are free."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        todo = shutil.disk_usage(disk).free - leave
        try:
            while todo > 0:
                todo -= f.write(b"\0" * min(todo, 1 << 20))
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("name", ["synth", "tokenizer", "prepare", "export", "report"])
def test_a_full_tmpfs_is_named_and_leaves_nothing(name, small_disk, synth_dir, tokenizer_dir, tiny_ckpt, data):
    disk = small_disk("16m")
    out = disk / "out"
    out.mkdir()
    argv, what = commands(synth_dir, tokenizer_dir, tiny_ckpt, data, out)[name]
    filler = fill(disk, leave=0 if name == "report" else 4096)  # the report is one page; the rest need more
    r = run_cli(*argv)
    assert_named_and_clean(r.returncode, r.stderr, what, out)
    filler.unlink()
    r = run_cli(*argv)  # the same command, without --force, once there is space
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_full_tmpfs_while_saving_a_checkpoint_keeps_the_last_one_resumable(small_disk, data):
    disk = small_disk("20m")  # one tiny checkpoint (~13 MB with its optimizer state) fits, two do not
    run = disk / "run"
    args = [*map(str, pretrain(data, "--max-steps", 4, "--save-every", 2)), "--out", str(run)]
    r = subprocess.run([*TRAIN, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 1 and "disk full" in r.stderr and "checkpoint step-4" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "needs about" in r.stderr, r.stderr[-3000:]
    assert (run / "step-2").is_dir() and not (run / "step-4").exists() and leftovers(run) == []
    r = subprocess.run([*TRAIN, *args, "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 1 and "disk full" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    subprocess.run(["mount", "-o", "remount,size=40m", str(disk)], check=True, timeout=30)
    r = subprocess.run([*TRAIN, *args, "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "step-4" / "model.safetensors").is_file() and leftovers(run) == []


# --------------------------------------------------------------------- item 5: a stopped prepare
def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    """Running (a zombie, or a pid now reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_for(condition, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def _sigint_as_in_a_terminal():
    """A command started from a terminal has SIGINT at its default; one started under a shell's background
    job (`make test &`, how CI may run) inherits it ignored, and Python then installs no KeyboardInterrupt:
    such a prepare ran to the end through the test's SIGINT and exited 0."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_prepare(data, tokenizer_dir, out: Path) -> tuple[subprocess.Popen, list[int]]:
    """A 3-worker prepare of the big input, once its workers are encoding. -> (process, worker pids)."""
    proc = subprocess.Popen([*CLI, "prepare", "--stage", "pretrain", "--input", str(data["big"]), "--tokenizer",
                             str(tokenizer_dir), "--out", str(out), "--workers", "3"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    assert wait_for(lambda: len(children(proc.pid)) >= 3 or proc.poll() is not None, timeout=120), "no workers"
    workers = children(proc.pid)
    assert wait_for(lambda: any(out.parent.glob(f".{out.name}.tmp-*")), timeout=60)
    return proc, workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_prepare_ends_its_workers_and_removes_its_temp_dir(sig, data, tokenizer_dir, tmp_path):
    out = tmp_path / "prepared"
    proc, workers = start_prepare(data, tokenizer_dir, out)
    try:
        time.sleep(0.5)  # well into the input (it takes the workers seconds)
        assert proc.poll() is None, "prepare ended before it was stopped: make the input bigger"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig and "interrupted" in err and "Traceback" not in err, err[-3000:]
    assert_gone(workers)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def assert_gone(workers: list[int]):
    """The workers end within 10 s; any left are killed, so a failing test leaves none behind either."""
    ended = wait_for(lambda: not any(alive(w) for w in workers), timeout=10)
    left = [w for w in workers if alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert ended, f"workers {left} outlived their prepare"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_sigkilled_prepares_workers_die_and_the_next_prepare_removes_its_temp_dir(data, tokenizer_dir, synth_dir,
                                                                                   tmp_path):
    out = tmp_path / "prepared"
    proc, workers = start_prepare(data, tokenizer_dir, out)
    proc.kill()
    proc.wait()
    assert_gone(workers)
    assert [p.name for p in tmp_path.iterdir()] == [f".prepared.tmp-{proc.pid}"]  # SIGKILL: nothing could run
    rc, err = cli_inproc("prepare", "--stage", "pretrain", "--input", synth_dir / "pretrain.jsonl", "--tokenizer",
                         tokenizer_dir, "--out", out, "--workers", "1")
    assert rc == 0, err[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]


# --------------------------------------------------------------------- item 5: Ctrl-C
@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0])
def test_ctrl_c_while_train_starts_prints_no_traceback(delay, data, tmp_path):
    """At these moments train.py is importing torch or building the run (it takes seconds)."""
    out = tmp_path / "run"
    proc = subprocess.Popen([*TRAIN, *map(str, pretrain(data, "--max-steps", 2)), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    if "training steps" in stdout:
        pytest.skip("the run was already training (a fast machine): another test covers that")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert proc.returncode == 128 + signal.SIGINT, (proc.returncode, err[-3000:])
    assert not out.exists()  # a fresh run stopped before its first step leaves nothing


def test_a_second_ctrl_c_ends_grpo_at_once(data, tiny_ckpt, tmp_path):
    out = tmp_path / "grpo"
    # long rollouts: on the trainer of e630cdd a second Ctrl-C waited for the step to end
    args = ["--stage", "grpo", "--init", tiny_ckpt, "--data", data["grpo"], "--batch-size", "8", "--group-size", "4",
            "--max-new-tokens", "2000", "--seq-len", "64", "--log-every", "1", "--max-steps", "50", "--device",
            "cpu", "--out", out]
    proc = subprocess.Popen([*TRAIN, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:
            if "training steps" in line:
                break
        time.sleep(1.0)  # inside the first step's rollouts
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None, "the first Ctrl-C ended the run: " + proc.stderr.read()[-3000:]
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        took = time.monotonic() - start
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < 5.0, f"the second Ctrl-C took {took:.1f}s to end the run"
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err[-3000:]
    assert "without saving" in err, err[-3000:]
