"""Where a command may write: never over one of its inputs, never over what a user kept (issue 25, item 1).

Every command that writes a report, a directory or prepared data calls `check_output` before it does any
work: the output must not be, contain or sit inside a path the command reads (compared after resolving
symlinks and `..`, so `CK/../CK` and a link to the data are caught), and an existing output is replaced
only with `--force`. `--force` replaces what the command writes and nothing else: `carry_over` links the
old directory's other entries into the new one before it is renamed into place, so a user's own files in
`--out` survive and the replacement stays a single rename.
"""

import os
import shutil
from collections.abc import Iterable
from pathlib import Path


class OutputError(ValueError):
    """An output path that would replace an input or existing data; the message names the flag and the paths."""


def check_output(out, *, flag: str, inputs: Iterable[tuple[str, Path | None]], force: bool = False,
                 directory: bool = False) -> None:
    """Raises OutputError unless writing `out` (given as `flag`) is safe.

    `inputs` are (label, path) pairs, the label naming where the path came from ("--data", "the tokenizer
    of --ckpt"); None paths are skipped. An input is never replaced, even with `force`; an existing output
    (for a directory: a non-empty one) only with `force`.
    """
    out = Path(out)
    check_apart(out, flag=flag, inputs=inputs)
    if not out.exists() and not out.is_symlink():
        return
    if directory and not out.is_dir():
        raise OutputError(f"{flag} {out}: exists and is not a directory")
    if not directory and out.is_dir():
        raise OutputError(f"{flag} {out}: is a directory; give a file name")
    if directory and not any(out.iterdir()):
        return
    if not force:
        raise OutputError(f"{flag} {out}: already exists; pass --force to replace it")


def check_apart(out, *, flag: str, inputs: Iterable[tuple[str, Path | None]]) -> None:
    """Raises OutputError when `out` is, sits inside or holds one of `inputs` ((label, path) pairs)."""
    target = Path(out).resolve()
    for label, path in inputs:
        if path is None:
            continue
        src = Path(path).resolve()
        how = "is" if target == src else "is inside" if src in target.parents else "contains" if (
            target in src.parents) else None
        if how is not None:
            raise OutputError(f"{flag} {out}: {how} {label} {path}, which this command reads; "
                              "pick a path outside it (--force never replaces an input)")


def carry_over(old: Path, new: Path, *, owned: Iterable[str]) -> list[str]:
    """Links into `new` every entry of the directory `old` that this command does not write (its name is
    not in `owned` and not already in `new`), so that renaming `new` over `old` keeps them. -> their names.

    Hard links where the file system allows (no copy of a user's large files), else copies.
    """
    old, new, owned = Path(old), Path(new), set(owned)
    if not old.is_dir():
        return []
    kept = []
    for entry in sorted(old.iterdir()):
        if entry.name in owned or os.path.lexists(new / entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)
        kept.append(entry.name)
    return kept


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)
