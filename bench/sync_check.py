"""Host syncs in the training step, on a real GPU: non-logging optimizer steps of each run given, after a
few warm-up steps, under `torch.cuda.set_sync_debug_mode("error")`, which raises at any operation that
makes the host wait for the GPU (`.item()`, `float()` of a device value, a pageable copy, a
synchronize). The CPU test of the same step is tests/test_fake_cuda.py; this is its real-device twin.

    python bench/sync_check.py [--warmup 2] [--steps 4] -- TRAIN.PY ARGS [:: TRAIN.PY ARGS ...]

Each group is what train.py would take (with its own --out); a line per group: "ok NAME: N steps,
no host sync", or "SYNC NAME: ..." with the line of ours that synced. Exit 1 if any group synced or
failed. Without CUDA the steps run and the line says the check was not made.
"""

import argparse
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def our_frame(tb) -> str:
    """The innermost frame of this project's code in a traceback: where the sync was asked for."""
    ours = [f for f in traceback.extract_tb(tb) if str(ROOT) in f.filename and "sync_check" not in f.filename]
    f = ours[-1] if ours else traceback.extract_tb(tb)[-1]
    return f"{Path(f.filename).relative_to(ROOT) if str(ROOT) in f.filename else f.filename}:{f.lineno} {f.line}"


def check(argv: list[str], warmup: int, steps: int) -> tuple[bool, str]:
    from minimind.cli import add_train_arguments
    from minimind.train import Trainer
    from minimind.trainconfig import resolve

    parser = argparse.ArgumentParser(prog="train.py")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    args.command = "train"
    name = args.stage + (f" ({' '.join(argv[argv.index('--set'):argv.index('--set') + 2])})" if "--set" in argv
                         else "") + (f" {args.dtype}" if args.dtype else "") + (f" --optim {args.optim}"
                                                                               if args.optim else "")
    trainer = Trainer(resolve(args))
    cuda = trainer.device.type == "cuda"
    try:
        for i in range(warmup + steps):
            if i == warmup and cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                trainer.train_step()
            except RuntimeError as e:
                if "synchroniz" not in str(e):
                    raise
                return False, f"SYNC {name}: step {i + 1}: {our_frame(e.__traceback__)} ({str(e).splitlines()[0]})"
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
            trainer.step += 1
        trainer.check_finite()
    finally:
        trainer.close()
    if not cuda:
        return True, f"ok {name}: {steps} steps ran; no CUDA, so syncs were not checked"
    return True, f"ok {name}: {steps} steps after {warmup} warm-up steps, no host sync"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("train_args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    rest = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    groups, cur = [], []
    for x in rest + ["::"]:
        if x == "::":
            groups.append(cur) if cur else None
            cur = []
        else:
            cur.append(x)
    if not groups:
        ap.error("give train.py arguments after --")
    ok = True
    for argv in groups:
        try:
            good, line = check(argv, a.warmup, a.steps)
        except Exception as e:  # a failure that is not a sync: name it and go on with the next group
            good, line = False, f"FAILED {' '.join(argv[:2])}: {type(e).__name__}: {e} at {our_frame(e.__traceback__)}"
        ok &= good
        print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
