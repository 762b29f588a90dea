"""Where a step's batches come from (a stage record's `batches`): `DataBatches` reads them from prepared
data, a step ahead; grpo.Rollouts samples them from the policy. The loop asks the one its Setup holds
for a step's micro-batches, the epoch it is in and its position in the data (for a checkpoint).
"""

import torch


def to_device(x, device):
    """A batch (a NamedTuple of tensors, nested or not) on `device`. To CUDA the copies leave from pinned
    memory without blocking the host; a pageable copy would wait for the GPU to drain (a host sync)."""
    if x is None or isinstance(x, (list, str, int, float)):
        return x
    if isinstance(x, torch.Tensor):
        if device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory()
        return x.to(device, non_blocking=True)
    if hasattr(x, "_fields"):  # NamedTuple batches
        return type(x)(*(to_device(v, device) for v in x))
    return x


class DataBatches:
    """Batches of the data loader (data.loader.Loader), each step's read and sent to `device` a step early."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        self._iter = iter(loader)
        self._ahead = None  # the next step's batches, read and sent to the device a step early
        self._handed = None  # (loader state, epoch) after the batches handed out so far

    def next_step(self, n: int) -> list[tuple]:
        """The n micro-batches of one optimizer step, each as (host batch, device batch). The next step's
        are read and their copies issued right after, a step ahead: the loader and the pinned copies
        run while the GPU still works through this step's queued kernels, so a step never waits for its
        data. The copies go on the compute stream: a few hundred KB a step is microseconds of copy
        engine time, too little to pay for a second stream's events. Resume and epoch accounting see
        only the batches handed out (`state`, `epoch`)."""
        step = self._ahead or self._read(n)
        self._handed = (self.loader.state_dict(), self.loader.epoch)
        self._ahead = self._read(n)
        return step

    def _read(self, n: int) -> list[tuple]:
        host = [next(self._iter) for _ in range(n)]
        return [(b, to_device(b, self.device)) for b in host]

    def epoch(self) -> float:
        return self._handed[1] if self._handed else self.loader.epoch

    def state(self) -> dict:
        return self._handed[0] if self._handed else self.loader.state_dict()

    def load_state(self, state: dict):
        self.loader.load_state_dict(state)
        self._iter = iter(self.loader)
        self._ahead = self._handed = None
