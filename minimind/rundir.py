"""A run directory while a run owns it: an exclusive lock, leftovers of killed runs, and undoing a
fresh run that failed before it wrote anything worth keeping.

The lock is `flock` on `<run dir>/.lock`, so the kernel releases it when its process dies however it
dies; the file itself stays and names the last owner, which is how a stale lock is recognised and
taken over. Only the main rank of a distributed run claims the directory.
"""

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"
# what atomic_dir and the DeepSpeed saver leave behind when killed mid-write (checkpoint.py, train.py)
LEFTOVER_PREFIXES = (".tmp-step-", ".old-step-")


class RunDirBusy(Exception):
    """Another live process owns the run directory."""


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.created = False  # did this run create the directory (so undo may remove it)
        self.created_lock = False  # ... or only the lock file
        self._fd = None

    def claim(self) -> list[str]:
        """Creates the directory if needed and takes its lock. -> notes worth logging (a stale lock taken
        over, leftovers removed). Raises RunDirBusy naming the owner when a live run holds it."""
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"--out {self.path} is a file, not a run directory")
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self.created_lock = not (self.path / LOCK_FILE).exists()
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunDirBusy(f"--out {self.path} is in use by another run ({owner}); wait for it to finish "
                             "or pick another DIR") from None
        notes = []
        previous = _read_owner(fd)
        if previous:
            notes.append(f"took over the lock of a run that no longer holds it ({previous})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        removed = remove_leftovers(self.path)
        if removed:
            notes.append(f"removed {len(removed)} unfinished checkpoint dir(s) of a killed run: {', '.join(removed)}")
        return notes

    def is_empty(self) -> bool:
        """Nothing in it but our lock file."""
        return all(p.name == LOCK_FILE for p in self.path.iterdir())

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def abandon(self):
        """Lets go of a directory this run was refused or failed to resume: releases the lock and removes
        only what claim() added (the lock file, the directory if it was created empty)."""
        self.release()
        if self.created_lock:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
        if self.created:
            try:
                self.path.rmdir()
            except OSError:  # something appeared meanwhile: leave it
                pass

    def undo(self):
        """A fresh run that stops before its first checkpoint leaves nothing behind: no run.json that would
        make the same command fail 'not empty', no metrics of a run that did not happen."""
        for p in self.path.iterdir():
            if p.name != LOCK_FILE:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        self.abandon()


def remove_leftovers(path: Path) -> list[str]:
    """Removes unfinished checkpoint dirs; a `.old-step-N-*` whose `step-N` is missing (killed between
    atomic_dir's two renames) is the only copy of that checkpoint, so it is put back instead."""
    removed = []
    for p in sorted(Path(path).iterdir()):
        if not p.is_dir() or not p.name.startswith(LEFTOVER_PREFIXES):
            continue
        if p.name.startswith(".old-"):
            target = p.with_name(p.name[len(".old-"):].rsplit("-", 1)[0])
            if not target.exists():
                os.rename(p, target)
                continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def _read_owner(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"null")
    except ValueError:
        return ""
    if not isinstance(owner, dict):
        return ""
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
