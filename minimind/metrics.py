"""A run's numbers: the tokens it has seen, each logged step's loss, gradient norm and metrics read back
from the device and reduced over ranks, throughput and MFU, written as a metrics.jsonl row through the
run's log (trainlog.RunLog). Each step's counts come from the batches' host copies; what lives on the
device is read once per logged step.
"""

import torch


class Metrics:
    """Counts tokens (`count` per step; `sync` adds all ranks' counts, the one all-reduce of them, at a
    log line and before a save) and makes the log's rows (`row`, then `write`)."""

    def __init__(self, *, log, dist, model, seq_len: int, device: torch.device, dtype: torch.dtype):
        c = model.config
        self.log, self.dist = log, dist
        self.moe = c.use_moe
        self.flops_per_token = 6 * model.num_params(active=True) + 12 * c.num_hidden_layers * c.hidden_size * seq_len
        self.peak = device_peak_flops(device, dtype)
        self.tokens_seen = 0
        self._tokens = self._useful = 0  # this rank's counts since the last sync()
        self._window = (0, 0)  # all ranks' (tokens, useful tokens) since the last row

    def count(self, step) -> None:
        """Adds one optimizer step's (a backend.Step's) token counts, host numbers."""
        self._tokens += step.tokens
        self._useful += step.useful

    def tokens_so_far(self) -> int:
        """All ranks' tokens, those since the last sync estimated from this rank's (what --max-tokens reads)."""
        return self.tokens_seen + self._tokens * self.dist.world_size

    def sync(self) -> None:
        """Adds all ranks' tokens and useful (loss-bearing) tokens since the last call to tokens_seen and to
        the row window. Called when a step is logged and before a save: the one all-reduce of them."""
        tokens, useful = self.dist.all_reduce_sums([self._tokens, self._useful])
        self._tokens = self._useful = 0
        self.tokens_seen += int(tokens)
        self._window = (self._window[0] + int(tokens), self._window[1] + int(useful))

    def read(self, step) -> dict:
        """A step's numbers as Python floats, reduced over ranks: the one read back per logged step."""
        sums, weight = step.sums, float(step.weight)
        out = {"loss": self.dist.all_reduce_sum(float(sums["loss"])) / max(weight, 1e-12),
               "grad_norm": float(step.grad_norm)}
        if self.moe:
            out["aux_loss"] = self.dist.all_reduce_sum(float(sums["aux_loss"])) / self.dist.world_size
        for k, v in sums.items():
            if k not in ("loss", "aux_loss"):
                out[k] = self.dist.all_reduce_sum(float(v)) / self.dist.world_size
        return out

    def row(self, step, *, number: int, lr: float, seconds: float, elapsed: float) -> dict:
        """The row of step `number` (its Step `step`), with the throughput of the `seconds` since the last row,
        the run's wall-clock `elapsed` (--max-time's, resumed runs' earlier time included) and all ranks'
        tokens so far: what a report plots cost against."""
        row = self.read(step)
        self.sync()
        (tokens, useful), self._window = self._window, (0, 0)
        row.update(step=number, lr=lr, tokens_per_s=tokens / seconds, useful_tokens_per_s=useful / seconds,
                   tokens=self.tokens_seen, elapsed_s=round(elapsed, 3))
        return row

    def write(self, row: dict, *, eta_s: float) -> None:
        """Adds MFU to `row` and hands it to the log: a line, and a line of metrics.jsonl."""
        row["mfu"] = self.mfu(row["tokens_per_s"])
        self.log.row(row, eta_s=eta_s)

    def mfu(self, tokens_per_s: float) -> float | None:
        if self.peak is None:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak * self.dist.world_size)

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_seen = state["tokens_seen"]


# dense bf16 peak FLOP/s by device name fragment (vendor datasheets)
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12, "A10": 125e12}


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAKS.items():
        if key in name:
            return peak if dtype != torch.float32 else peak / 2
    return None
