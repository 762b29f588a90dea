"""Run observability: a log line per --log-every, a progress bar, metrics.jsonl, loss.png and
optional wandb (offline unless WANDB_API_KEY is set). Only rank 0 writes.
"""

import datetime
import json
import os
import sys
from pathlib import Path

from minimind.faults import tree_bytes, writing


class RunLog:
    def __init__(self, out: Path, enabled: bool, wandb: bool = False, config: dict | None = None):
        self.out, self.enabled = Path(out), enabled
        self.wandb_requested, self.config = wandb, config or {}
        self.wandb = None
        self.bar = None
        self.rows: list[dict] = []

    @property
    def metrics_file(self) -> Path:
        return self.out / "metrics.jsonl"

    def start(self, total_steps: int, step: int):
        if not self.enabled:
            return
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        if self.metrics_file.exists():
            self.rows = [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]
        self.bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
                        disable=not sys.stderr.isatty())
        if self.wandb_requested:
            self._start_wandb()

    def _start_wandb(self):
        import wandb

        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")
        self.wandb = wandb.init(project="minimind", dir=str(self.out), config=self.config,
                                name=self.out.name, resume="allow")

    def set_total(self, total_steps: int):
        """A run sized by a time budget learns its length as it goes."""
        if self.bar is not None and self.bar.total != total_steps:
            self.bar.total = total_steps
            self.bar.refresh()

    def advance(self):
        if self.bar is not None:
            self.bar.update(1)

    def message(self, text: str):
        if self.enabled:
            line = f"[{datetime.datetime.now():%H:%M:%S}] {text}"
            if self.bar is not None:
                self.bar.write(line, file=sys.stdout)
            else:
                print(line, flush=True)

    def row(self, row: dict, eta_s: float):
        if not self.enabled:
            return
        row = {k: v for k, v in row.items() if v is not None}
        line = json.dumps(row) + "\n"
        with writing("metrics.jsonl", self.metrics_file, need=len(line)):
            _append_whole(self.metrics_file, line.encode())
        self.rows.append(row)
        # the line's fixed part, and what only metrics.jsonl needs (the eta says more than the clock)
        shown = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "useful_tokens_per_s", "mfu", "tokens", "elapsed_s")
        extras = " | ".join(f"{k} {_fmt(row[k])}" for k in row if k not in shown)
        mfu = f" | mfu {row['mfu'] * 100:.1f}%" if "mfu" in row else ""
        self.message(
            f"step {row['step']} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | grad {row['grad_norm']:.3f} | "
            f"{row['tokens_per_s']:.0f} tok/s{mfu} | eta {datetime.timedelta(seconds=int(eta_s))}"
            + (f" | {extras}" if extras else "")
        )
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def truncate_after(self, step: int):
        """A resumed run rewrites the rows logged after its checkpoint."""
        if not self.enabled or not self.metrics_file.exists():
            return
        keep = [line for line in self.metrics_file.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.metrics_file.write_text("".join(line + "\n" for line in keep))

    def save(self, step: int, path: Path):
        self.message(f"saved {path}")
        self.plot()

    def plot(self):
        if not self.enabled or not self.rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if "loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
        val = [r for r in rows if "val_loss" in r]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(self.out.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp, png = self.out / ".loss.png.tmp", self.out / "loss.png"
        try:
            with writing("loss.png", png, need=lambda: max(tree_bytes(tmp), tree_bytes(png))):
                fig.savefig(tmp, format="png")
            os.replace(tmp, png)
        finally:
            plt.close(fig)
            tmp.unlink(missing_ok=True)  # what a full disk left of it

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _append_whole(file: Path, data: bytes) -> None:
    """Appends `data` whole or not at all: a line cut short by a full disk would be one no reader parses."""
    fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)
