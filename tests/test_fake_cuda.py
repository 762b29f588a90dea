"""The training step on CUDA, checked on a CPU-only machine with torch's FakeTensorMode: `device="cuda"`
tensors that carry shapes, dtypes and devices but no data. Under it, mixing a CPU tensor into a CUDA
one raises (the crash of the first GPU run, 2026-12-04: `loss_total` was created on the CPU) and so
does any read of a value back to the host (`.item()`, `float()`, `bool()`: a sync on a real GPU).

What runs here, per stage objective: the forward and loss of a micro-batch (`Backend.micro_loss`),
the step's sums (`backend.accumulate`), clipping and the fused AdamW step with hand-set gradients
(`Backend.update`), and the divergence watch (`FiniteWatch.watch`): a whole non-logging step but two parts.
- `backward()`: autograd on fake CUDA tensors aborts the process on a CPU-only torch.
- the batch transfer (`Setup.next_step` -> `batches.to_device`: pinned memory, non-blocking copies, a
  step ahead): `.pin_memory()` has no fake implementation and `.to("cuda")` needs CUDA even under fake
  mode on a CPU-only torch, so the batches here are made on the fake device directly. On a GPU,
  bench/sync_check.py runs whole steps, transfer and backward included, under
  `torch.cuda.set_sync_debug_mode("error")`.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from minimind import objectives
from minimind.backend import Step, TorchBackend, accumulate
from minimind.config import ModelConfig
from minimind.data.loader import Batch, PairBatch
from minimind.distributed import Dist
from minimind.lora import apply_lora
from minimind.model import MiniMindForCausalLM
from minimind.optim import param_groups
from minimind.watch import FiniteWatch

B, T = 2, 16


def fake_cuda(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and buffer replaced by a fake CUDA tensor of its shape and dtype (tied weights
    stay tied). Call inside the FakeTensorMode."""
    made = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in made:
                    made[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cuda"),
                                                     requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="cuda")
    return model


def tiny(lora: bool = False) -> MiniMindForCausalLM:
    model = MiniMindForCausalLM(ModelConfig.from_preset("tiny", kernels="torch"))
    if lora:
        apply_lora(model, rank=4, alpha=8.0)
    return model


def batch() -> Batch:
    ids = torch.zeros(B, T, dtype=torch.long, device="cuda")
    return Batch(ids, ids.clone(), torch.ones(B, T, device="cuda"),
                 torch.arange(T, device="cuda").repeat(B, 1))


def rollouts() -> objectives.RolloutBatch:
    ids = torch.zeros(B, T, dtype=torch.long, device="cuda")
    zeros = torch.zeros(B, T, device="cuda")
    return objectives.RolloutBatch(ids, ids.clone(), torch.ones(B, T, device="cuda"), None,
                                   torch.zeros(B, device="cuda"), zeros, zeros.clone(), torch.zeros(B, device="cuda"))


# stage -> (the objective for a fake model, a batch, LoRA adapters on the policy)
STAGES = {
    "pretrain": (lambda: objectives.CausalLM(), batch, False),
    "sft": (lambda: objectives.CausalLM(), batch, False),
    "lora": (lambda: objectives.CausalLM(), batch, True),
    "reason": (lambda: objectives.Reason(), batch, False),
    "dpo": (lambda: objectives.DPO(fake_cuda(tiny()).eval(), beta=0.1), lambda: PairBatch(batch(), batch()), False),
    "distill": (lambda: objectives.Distill(fake_cuda(tiny()).eval(), temperature=1.5, alpha=0.5), batch, False),
    "grpo": (lambda: objectives.GRPO(beta=0.04), rollouts, False),
}


def backend_on(model) -> TorchBackend:
    """The plain PyTorch backend of a one-process run, on the fake device."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return TorchBackend(
        model, device=torch.device("cuda"), dtype=torch.float32, dist=Dist(), trainable=trainable, grad_clip=1.0,
        scaler=torch.amp.GradScaler("cpu", enabled=False),  # fp16 only; it syncs by design (its inf check)
        optimizer=torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, fused=True),
    )


@pytest.mark.parametrize("stage", STAGES)
def test_a_non_logging_step_runs_on_cuda_without_a_host_sync(stage):
    make_objective, make_batch, lora = STAGES[stage]
    policy = tiny(lora=lora)
    if lora:
        for name, p in policy.named_parameters():
            p.requires_grad_("lora_" in name)
    with FakeTensorMode(allow_non_fake_inputs=False):
        model = fake_cuda(policy).train()
        backend, objective, watch = backend_on(model), make_objective(), FiniteWatch()
        sums = None
        with torch.no_grad():  # stands in for forward + backward: autograd cannot run on fake CUDA here
            for _ in range(2):  # two micro-batches (--grad-accum 2)
                loss, parts = backend.micro_loss(make_batch(), objective, scale=0.5, n_micro=2)
                sums = accumulate(sums, parts, 2)
        for p in backend.trainable:
            p.grad = torch.zeros_like(p)
        grad_norm = backend.update()
        step = Step(sums=sums, grad_norm=grad_norm, weight=1.0, tokens=B * T, useful=B * T)
        watch.watch(step)
        watch.watch(step)  # a second step: the run of non-finite steps goes on counting
        assert loss.device.type == "cuda" and grad_norm.device.type == "cuda"
        assert all(v.device.type == "cuda" for v in sums.values())
        assert watch.worst_run.device.type == "cuda" and watch.bad_run.device.type == "cuda"
        # and the mode does see a read back: data-dependent, or a copy that needs a real device
        with pytest.raises((DataDependentOutputException, RuntimeError)):
            float(sums["loss"])


def test_the_first_gpu_runs_crash_is_caught_here():
    """2026-12-04: `loss_total = torch.zeros((), dtype=torch.float64)` (on the CPU) plus a CUDA loss."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = fake_cuda(tiny())
        with torch.no_grad():
            loss_sum, _, _ = objectives.CausalLM()(model, batch())
        loss_total = torch.zeros((), dtype=torch.float64)
        with pytest.raises(Exception, match="device"):
            loss_total += loss_sum.detach().double()
