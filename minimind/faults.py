"""Faults that come from outside a command: a full disk while it writes, and signals asking it to stop.

Every writer wraps its writes in `writing(what, path, need=...)`: a write that fails for lack of space
(ENOSPC or EDQUOT, also where safetensors or torch wrap the OS error in their own exception) becomes
DiskFull, which names what was being written, where, about how much it needed and how much is free.
Commands print it like their other errors and exit 1: a runtime fault, not a usage error. Writers
remove their partial output on the way out, so the free space the message reports (measured when it
is printed) is what the user has to work with.

`stop_signals()` makes SIGTERM raise Interrupted, as SIGINT raises KeyboardInterrupt, so the `finally`
blocks that remove temp directories and end worker processes also run when a command is killed
politely; `interrupted_exit` turns either into one line on stderr and the exit code 128 + signal.
"""

import ctypes
import errno
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

# libc for prctl, loaded here, before any fork: dlopen in a child forked from a threaded parent can deadlock
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# how safetensors (Rust's io::Error) and torch's C++ writer spell the same errno in their own exceptions
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


class DiskFull(Exception):
    """A write that failed because its file system is full (or the user's quota is spent)."""

    def __init__(self, what: str, path, need: int | None = None, at_least: bool = False):
        self.what, self.path, self.need, self.at_least = what, Path(path), need, at_least
        super().__init__(what, str(path), need)

    def __str__(self) -> str:
        # free space measured now, when the error is shown: after the writer removed its partial output
        need = ""
        if self.need:
            need = (f" needs more than {human_bytes(self.need)} (what it had written when the disk filled)"
                    if self.at_least else f" needs about {human_bytes(self.need)}")
        return f"disk full: writing {self.what} to {self.path}{need}; {human_bytes(free_bytes(self.path))} free there"


class Interrupted(BaseException):
    """SIGTERM (or a second Ctrl-C in a run that traps the first) as an exception: `finally` blocks run.
    Not a KeyboardInterrupt, so code that treats Ctrl-C as 'stop this reply' does not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signum)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from or during, says the disk or quota is full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        if any(text in str(exc) for text in _NO_SPACE_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def writing(what: str, path, need: int | Callable[[], int | None] | None = None, at_least: bool = False):
    """Turns a full disk inside the block into DiskFull(what, path, need). `need` is the write's size in
    bytes, or a function giving it (an estimate is fine), called only when the disk was full; `at_least`:
    it is only what was written before the disk filled."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise DiskFull(what, path, need() if callable(need) else need, at_least=at_least) from None


@contextmanager
def partial_output(out: Path):
    """-> a list to which a writer adds each file before it writes it. When the block fails (a full disk,
    a signal, anything) those files go, and `out` too if this call created it and it is left empty, so
    the same command then runs again without --force."""
    out = Path(out)
    created = not out.exists()
    files: list[Path] = []
    try:
        yield files
    except BaseException:
        for f in files:
            Path(f).unlink(missing_ok=True)
        if created:
            try:
                out.rmdir()
            except OSError:  # absent, or something else appeared in it: leave it
                pass
        raise


def free_bytes(path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def tree_bytes(path) -> int:
    """Bytes in the files under `path` (a file: its size; missing: 0)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def human_bytes(n: float) -> str:
    """Three significant figures: 0 B, 812 B, 4.77 MB, 12.5 MB, 1.02 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 999.5 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} GB"


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextmanager
def stop_signals():
    """SIGTERM raises Interrupted inside the block (in the main thread; elsewhere signals are not ours
    to set). SIGINT keeps Python's KeyboardInterrupt."""
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def signal_number(exc: BaseException) -> int:
    return exc.signum if isinstance(exc, Interrupted) else signal.SIGINT


def interrupted_exit(prog: str, exc: BaseException, what: str = "") -> int:
    """Reports a KeyboardInterrupt or Interrupted as one line (no traceback). -> 128 + the signal."""
    signum = signal_number(exc)
    print(f"{prog}: interrupted by {signal.Signals(signum).name}{what}", file=sys.stderr, flush=True)
    return 128 + signum


def exit_now(code: int) -> None:
    """Ends the process with `code` after flushing stdout and stderr, skipping the interpreter's teardown
    (atexit handlers, module and object finalizers): for a program whose cleanup has already run."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def die_with_parent(parent: int) -> None:
    """In a worker process: end when `parent` ends, however it ends (SIGKILL included). Linux has the
    kernel do it (PR_SET_PDEATHSIG); elsewhere a daemon thread watches the parent's pid."""
    if _LIBC is not None:
        PR_SET_PDEATHSIG = 1
        if _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent:  # the parent died before the prctl: nobody will send the signal
                os._exit(1)
            return

    def watch():
        import time

        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()
